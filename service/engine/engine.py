"""The engine: an admission queue in front of one worker thread that owns every model on a device.

The worker loops *schedule → execute → update*:

1. schedule: the pure :func:`service.engine.scheduler.plan` picks the waiting requests that join
   now and the requests to drop (caller gone, deadline passed);
2. execute: the conditions (prompts, negative prompts) of the requests that join are encoded, one
   batch per model (:meth:`diffusion.Pipeline.encode_conditions`); then for each model and image
   size with rows in flight, ONE forward pass over all of them (:meth:`ModelBatch.step`), launched
   without waiting for the device;
3. update: finished rows leave at once (the host counts evaluations, it never reads the device to
   learn it) and wait for their decode; at most one chunk of them is decoded per model per
   iteration while other rows are in flight (:mod:`service.engine.decode`); their images travel to
   the host in the background, and a request whose last image has landed is answered.

Rows of another size than a model's native one run in a batch of their own (created when a request
for that size is admitted, gone once it is idle), side by side with the model's other batches;
acceleration (compilation, CUDA graphs) applies to the native size's batch.

Models change while it runs (:meth:`Engine.install`, :meth:`Engine.remove`, driven by
:mod:`service.registry`): rows in flight finish on the weights they started with, requests admitted
after the swap run on the new ones.

Callers (the HTTP layer) only :meth:`Engine.submit` a :class:`GenerationSpec` and wait on the
returned job's future; :meth:`Job.cancel` makes the engine drop its rows at the next iteration.
The engine emits stats through an :class:`Observer` (see :mod:`service.metrics`); it knows nothing
of HTTP. Tests drive :meth:`Engine.iterate` directly, without the thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from collections.abc import Mapping
from typing import Protocol

import torch

from diffusion import Acceleration
from service.engine.batches import Batches, batch_key, belongs, network_rows
from service.engine.costs import CostModel
from service.engine.executor import Model, ModelBatch, Retired
from service.engine.job import (DeadlineExceeded, EngineClosed, GenerationFailed, GenerationResult, GenerationSpec,
                                Job, Preview, Progress, QueueFull, Refused)
from service.engine.scheduler import Policy, Ticket, plan

log = logging.getLogger("service.engine")


class Observer(Protocol):
    def queue_wait(self, model: str, seconds: float) -> None: ...

    def forward(self, model: str, rows: int, seconds: float) -> None: ...

    def images(self, model: str, count: int) -> None: ...

    def refused(self, model: str, reason: str) -> None: ...

    def finished(self, model: str, on_time: bool, predicted_s: float | None, actual_s: float) -> None: ...


class _NoObserver:
    def queue_wait(self, model, seconds): pass

    def forward(self, model, rows, seconds): pass

    def images(self, model, count): pass

    def refused(self, model, reason): pass

    def finished(self, model, on_time, predicted_s, actual_s): pass


class Engine:
    def __init__(self, models: Mapping[str, Model], *, max_rows: int = 64, max_queue: int = 256,
                 observer: Observer | None = None, clock=time.monotonic, max_steps: int | None = None,
                 accel: Acceleration = Acceleration(), policy: Policy = Policy(), latency_rows: int = 0,
                 cpu_threads: str | None = None, decode_pixels: int = 2 * 1024 * 1024, calibrate_s: float = 0.0):
        """``cpu_threads`` ("auto" or a number): the intra-op threads of iterations on the CPU
        (:mod:`service.engine.threads`); None leaves PyTorch's count alone. ``decode_pixels``: image
        pixels per decode chunk. ``calibrate_s``: seconds spent timing a model's iterations (at its
        first request, or a new size's) to seed the cost model; 0: the first iterations seed it."""
        self.costs = CostModel()  # seconds of an iteration per engine batch and network rows (measured)
        self.calibrate_s = calibrate_s
        # batch key (the model's name, or name@WxH for another size) -> its rows
        self.batches = Batches(models, max_rows, max_steps, accel, cpu_threads, decode_pixels, self.costs)
        self._backlog_s = 0.0  # the cost model's seconds until what runs has drained (Retry-After)
        self._retired: list[tuple[str, Retired]] = []  # finished rows whose images are on their way
        self.max_rows, self.max_queue = max_rows, max_queue
        self.policy = policy
        self.latency_rows = latency_rows  # >0: while latency-sensitive rows are in flight, step at most this many
        self.observer = observer or _NoObserver()
        self.clock = clock
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False  # no more submissions
        self._stop = False  # the worker exits
        self._thread: threading.Thread | None = None
        self._service_time_s = 1.0  # running mean of admitted -> done, for Retry-After
        self._changes: list = []  # model installs and removals waiting for the engine's thread (_apply)
        self._incoming: dict[str, ModelBatch] = {}  # name -> the batch an install waiting in _changes brings
        self._shapes = {name: _shape(m) for name, m in models.items()}  # what each name's costs were measured on
        self.iterations = 0

    @property
    def models(self) -> Mapping[str, Model]:
        """The models served now (a snapshot)."""
        return self.batches.models

    # --- models that change (a loader's thread) -----------------------------------------------
    def install(self, name: str, model: Model) -> Future:
        """Serve ``model`` under ``name`` (new, or new weights for a name served now) from the next
        iteration on: the swap happens on the engine's thread between two iterations, so no
        iteration sees half of it; rows in flight finish on the old weights, requests admitted after
        it run on the new. The batch is built, and when accelerated compiled and captured, here, on
        the caller's thread. The cost model keeps what it measured when the architecture is the same
        (a retrained checkpoint), starts a new name from a measured model of the same architecture,
        else measures anew. Returns a future done once the swap is made (never wait for it while
        holding a lock that a job's completion takes)."""
        batch = self.batches.build(model)
        return self._change(("install", name, model, batch))

    def remove(self, name: str) -> Future:
        """Stop serving ``name`` from the next iteration on: its rows in flight finish, its requests
        still waiting fail. Returns a future done once it is out."""
        return self._change(("remove", name, None, None))

    def _change(self, change: tuple) -> Future:
        done: Future = Future()
        kind, name, _, batch = change
        with self._cv:
            direct = self._stop or self._thread is None  # no engine thread: apply here (start-up, tests, shutdown)
            if not direct:
                self._changes.append((change, done))
                if kind == "install":  # submissions from now on see the new model
                    self._incoming[name] = batch
                else:
                    self._incoming.pop(name, None)
                self._cv.notify_all()
        if direct:
            self._apply([(change, done)])
        return done

    def _apply(self, changes) -> None:
        """(the engine's thread, or with none running; never under ``_cv``) Model changes, in order,
        between iterations."""
        orphans = []
        for (kind, name, model, batch), done in changes:
            if kind == "install":
                shape = _shape(model)
                self.batches.install(name, model, batch)
                if self._shapes.setdefault(name, shape) != shape:  # measured on other weights than these
                    self._shapes[name] = shape
                    self.costs.forget(name)
                elif not self.costs.known(name):  # a new name for a known architecture: no calibration
                    twin = next((n for n, s in self._shapes.items() if s == shape and n != name
                                 and self.costs.known(n)), None)
                    if twin is not None:
                        self.costs.copy(twin, name)
            else:
                self.batches.remove(name)  # (its costs stay: the same weights may come back)
                with self._cv:
                    orphans += [j for j in self._waiting if j.spec.model == name]
                    self._waiting = deque(j for j in self._waiting if j.spec.model != name)
            with self._cv:
                if batch is not None and self._incoming.get(name) is batch:
                    del self._incoming[name]
            done.set_result(None)
        for job in orphans:
            job.finish(error=GenerationFailed(f"model {job.spec.model!r} was unloaded before this request started"))

    def busy(self, name: str) -> bool:
        """Rows of ``name`` in flight or decoding, or requests for it waiting."""
        with self._cv:
            if any(j.spec.model == name for j in self._waiting):
                return True
        return any(b.busy for k, b in self.batches.items() if belongs(k, name))

    # --- the caller's side ------------------------------------------------------------------
    def submit(self, spec: GenerationSpec, timeout_s: float | None, listener=None) -> Job:
        """Queue a request with a deadline ``timeout_s`` from now (None: none, bulk work); raises
        QueueFull, EngineClosed, Refused (it cannot finish in time even alone, by the cost model), or
        KeyError for an unknown model. ``listener`` (see :attr:`Job.listener`) receives its progress
        and previews."""
        with self._cv:  # the weights it will run on: those being swapped in, or those served now
            batch = self._incoming.get(spec.model)
        if batch is None:
            if spec.model not in self.models:
                raise KeyError(spec.model)
            batch = self.batches[spec.model]
        if spec.num_images > self.max_rows:
            raise ValueError(f"{spec.num_images} images exceed the {self.max_rows} rows of a forward pass")
        work = batch.evaluations(spec)
        card = batch.model.card
        key = batch_key(spec, card.sample_shape)
        net = network_rows(spec.num_images, spec.guidance > 0 and card.guidable)
        if timeout_s is not None and self.policy.goodput and self.costs.known(key):
            alone = work * self.costs.cost(key, net, fastest=True)
            if alone * self.policy.margin > timeout_s:  # even alone, on an idle engine, at its fastest
                self.observer.refused(spec.model, "deadline")
                raise Refused(alone, timeout_s, self._backlog_s, alone=True)
        with self._cv:
            if self._closed:
                raise EngineClosed("the service is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.observer.refused(spec.model, "queue_full")
                raise QueueFull(len(self._waiting), self.retry_after_s())
            job = Job(spec, deadline=self.clock() + (math.inf if timeout_s is None else timeout_s), work=work,
                      submitted_at=self.clock(), listener=listener, batch=key, network_rows=net)
            self._waiting.append(job)
            self._cv.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self._cv:
            self._cv.notify_all()

    def retry_after_s(self) -> int:
        """A rough wait before the queue has room: how many waves of the queue at one service time."""
        waves = max(1, len(self._waiting)) / max(1, self.max_rows)
        return max(1, math.ceil(waves * self._service_time_s))

    def position(self, job: Job) -> int | None:
        """How many requests wait ahead of ``job`` in the queue (None once it is admitted or gone)."""
        with self._cv:
            for k, waiting in enumerate(self._waiting):
                if waiting is job:
                    return k
        return None

    def free_rows(self) -> int:
        """Image rows this engine can take now without anything waiting for room: the cost model's
        knee (the batch beyond which a larger one stops paying in images/s; ``max_rows`` while nothing
        is measured), converted from network rows at two per image (guided) for the batches that run,
        less the rows in flight and the rows waiting (negative when more wait). Pulling job runners
        claim by it."""
        with self._cv:
            waiting = sum(j.rows for j in self._waiting)
        return self.capacity() - self.rows_in_flight - waiting  # negative: rows waiting beyond the capacity

    def capacity(self) -> int:
        """The image rows :meth:`free_rows` counts from: ``max_rows``, or the smallest knee among the
        batches that run."""
        cap = self.max_rows
        for key, batch in list(self.batches.items()):
            if batch.rows:
                cap = min(cap, max(1, self.costs.knee(key, 2 * self.max_rows) // 2))
        return cap

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def rows_in_flight(self) -> int:
        return sum(b.rows for b in self.batches.values())  # (a snapshot: read from any thread)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    # --- the worker -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="diffusion-engine", daemon=True)
            self._thread.start()

    def warm_up(self) -> None:
        """Compile and capture every model's iteration variants (when accelerated), before serving."""
        for batch in self.batches.values():
            batch.warm_up()

    def _calibrate_new(self, jobs) -> None:
        """Models that requests wait for and that nothing has measured yet are calibrated first (at
        their native size: other sizes are predicted from it)."""
        for name in dict.fromkeys(j.spec.model for j in jobs):
            if self.costs.known(name) or name not in self.batches or self.batches[name].busy:
                continue
            try:
                self.batches.calibrate(name, self.calibrate_s)
            except Exception:  # measuring is never worth a request: the first iterations will
                log.exception("calibrating %s failed", name)

    def _idle(self) -> bool:
        return (not self._waiting and not any(b.busy for b in self.batches.values()) and not self._retired
                and not self._changes)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and self._idle():
                    self._cv.wait()
                if self._stop:
                    return
            try:
                self.iterate()
            except Exception:  # never let one bad iteration kill the worker
                log.exception("engine iteration failed")
            with self._cv:  # requests wait and nothing runs (their admission waits on time): no busy loop
                if self._waiting and not any(b.busy for b in self.batches.values()) and not self._retired:
                    self._cv.wait(0.02)

    def iterate(self) -> int:
        """One engine iteration over every model; returns the rows that went through a forward pass."""
        if self._changes:
            with self._cv:
                changes, self._changes = self._changes, []
            self._apply(changes)
        if self.calibrate_s > 0 and self.policy.goodput:
            with self._cv:
                cold = [j for j in self._waiting if not self.costs.known(j.batch)]
            self._calibrate_new(cold)
        now = self.clock()
        with self._cv:
            left = {job: total - done for b in self.batches.values() for job, (done, total) in b.progress().items()}
            running = {job.id: job for job in left}
            waiting = {job.id: job for job in self._waiting}
            decision = plan([_ticket(j, now) for j in self._waiting],
                            [_ticket(j, now, left[j]) for j in running.values()], self.max_rows, self.policy,
                            self.costs if self.policy.goodput else None)
            refused = {key: (predicted, retry) for key, predicted, retry in decision.refuse}
            gone = set(decision.drop_waiting) | set(decision.admit) | set(refused)
            self._waiting = deque(j for j in self._waiting if j.id not in gone)
        for key in decision.drop_waiting:
            _give_up(waiting[key], now, self.observer)
        for key, (predicted, retry) in refused.items():
            job = waiting[key]
            if job.finish(error=Refused(predicted, job.deadline - now, retry)):
                self.observer.refused(job.spec.model, "deadline")
        self._backlog_s = max((retry for _, retry in refused.values()), default=self._backlog_s if running else 0.0)
        for key, predicted in decision.predicted.items():
            waiting[key].predicted_s = predicted
        dropped = {running[k] for k in decision.drop_running}
        for job in dropped:
            _give_up(job, now, self.observer)
        if dropped:
            for b in self.batches.values():
                b.drop(dropped)
        admitted = [waiting[key] for key in decision.admit]
        vectors = self._encode(admitted)
        for job in admitted:
            self._admit(job, vectors.get(job.spec.model, {}))
        total = 0
        for name, batch in self.batches.items():
            if batch.rows:
                total += self._step(name, batch)
        for batch in self.batches.values():
            if batch.decoding:
                self._decode(batch)
        self._collect(block=self.rows_in_flight == 0)
        self._prune()
        self.iterations += 1
        return total

    def _encode(self, jobs: list[Job]) -> dict[str, dict]:
        """The conditions of the requests that join now, encoded in one batch per model (those
        already cached cost nothing): model -> condition -> vector. A failure fails that model's
        joining requests alone."""
        by_model: dict[str, list[Job]] = {}
        for job in jobs:
            by_model.setdefault(job.spec.model, []).append(job)
        out = {}
        for name, group in by_model.items():
            try:
                out[name] = self.models[name].encode_conditions([c for job in group for c in job.spec.conditions()])
            except Exception as e:
                log.exception("encoding the conditions of model %s failed", name)
                for job in group:
                    job.finish(error=GenerationFailed(f"could not encode the prompt: {type(e).__name__}"))
        return out

    def _admit(self, job: Job, vectors: Mapping) -> None:
        if job.future.done():  # its conditions could not be encoded
            return
        job.admitted_at = self.clock()
        self.observer.queue_wait(job.spec.model, job.admitted_at - job.submitted_at)
        # rows that step first: with goodput, those with a deadline (bulk rows yield to them); else the short ones
        urgent = math.isfinite(job.deadline) if self.policy.goodput else self.policy.short(_ticket(job, job.admitted_at))
        try:
            self.batches.for_job(job).admit(job, urgent=urgent, vectors=vectors)
        except Exception as e:  # a request the model cannot run fails alone
            log.exception("admitting job %s failed", job.id)
            job.finish(error=GenerationFailed(f"could not start generation: {e}"))

    def _decode(self, batch: ModelBatch) -> None:
        """One chunk of the batch's finished rows decoded (all of them when it has no rows in flight)."""
        try:
            self._retired += [(batch.model.name, r) for r in batch.decode(everything=batch.rows == 0)]
        except Exception as e:
            log.exception("decoding for model %s failed", batch.model.name)
            for job in batch.decoding.clear():
                job.finish(error=GenerationFailed(f"decoding failed: {type(e).__name__}"))

    def _prune(self) -> None:
        for key in self.batches.prune():
            if "~" in key:  # a retired batch's measurements
                self.costs.forget(key)

    def _step(self, name: str, batch: ModelBatch) -> int:
        limit = self.latency_rows or None
        if limit is None and self.policy.goodput and any(not math.isfinite(j.deadline) for j in batch.jobs()):
            # bulk rows yield: beside rows with a deadline, the iteration steps bulk rows only within the knee
            guided = batch.runner.can_guide and batch.runner.table.flags()["guided"]
            limit = max(1, self.costs.knee(name, 2 * self.max_rows) // network_rows(1, guided))
        try:
            rows, finished, timings = batch.step(limit)
            self._report(name, batch)
            if finished:
                batch.retire(finished)
        except Exception as e:
            log.exception("forward pass of model %s failed; failing its %d rows", name, batch.rows)
            for job in batch.clear():
                job.finish(error=GenerationFailed(f"generation failed: {type(e).__name__}"))
            return 0
        for (r, net), seconds in timings:
            self.observer.forward(batch.model.name, r, seconds)
            self.costs.observe(name, net, seconds)
        return rows

    def _report(self, name: str, batch: ModelBatch) -> None:
        """Progress to the requests that listen, and the previews that are due."""
        listening = [j for j in batch.jobs() if j.listener is not None]
        if not listening:
            return
        progress = batch.progress()
        now = self.clock()
        for job in listening:
            done, total = progress[job]
            _tell(job, Progress(done, total, now - job.admitted_at))
            every = job.spec.preview_every
            if every and done % every == 0 and done < total:
                retired = batch.preview(job, done, total)
                if retired is not None:
                    self._retired.append((name, retired))

    def _collect(self, block: bool) -> None:
        """Hand landed images to their requests; answer the requests that are complete. ``block``
        waits for every image in transit (the engine has nothing else to do)."""
        keep = []
        for name, retired in self._retired:
            if block:
                retired.wait()
            if not retired.ready():
                keep.append((name, retired))
                continue
            now = self.clock()
            if retired.preview is not None:
                job = retired.owners[0][0]
                if not job.future.done():
                    _tell(job, Preview(*retired.preview, retired.images))
                continue
            for (job, k), image in zip(retired.owners, retired.images):
                if job.future.done():
                    continue  # cancelled, or already failed
                job.images[k] = image
                if len(job.images) == job.rows:
                    self._complete(job, now)
        self._retired = keep

    def _complete(self, job: Job, now: float) -> None:
        generating = now - job.admitted_at
        self._service_time_s = 0.8 * self._service_time_s + 0.2 * generating
        images = torch.stack([job.images[k] for k in range(job.rows)])
        job.images = {}
        if job.finish(GenerationResult(images, job.admitted_at - job.submitted_at, generating)):
            self.observer.images(job.spec.model, job.rows)
            if math.isfinite(job.deadline):  # goodput counts requests with a deadline
                self.observer.finished(job.spec.model, now <= job.deadline, job.predicted_s, generating)

    # --- shutdown ------------------------------------------------------------------------------
    def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop admitting; let work in flight (and queued) finish for up to ``grace_s``; fail the rest."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        deadline = time.monotonic() + grace_s
        if self._thread is not None:
            while time.monotonic() < deadline and not self._idle() and self._thread.is_alive():
                time.sleep(0.01)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._collect(block=True)  # images already on their way still reach their requests
        leftover = set(self._waiting) | {j for b in self.batches.values() for j in b.clear()}
        self._waiting.clear()
        for job in leftover:
            job.finish(error=EngineClosed("the service shut down before this request finished"))


def _shape(model: Model) -> tuple:
    """What a model's iteration costs depend on."""
    card = model.card
    return card.architecture, card.parameters, tuple(card.sample_shape), str(getattr(model, "dtype", ""))


def _tell(job: Job, event) -> None:
    try:
        job.listener(event)
    except Exception:  # a listener's failure is its request's problem, never the engine's
        log.exception("listener of job %s failed", job.id)


def _ticket(job: Job, now: float, remaining: int | None = None) -> Ticket:
    return Ticket(job.id, job.spec.model, job.rows, cancelled=job.cancelled, expired=job.expired(now), batch=job.batch,
                  work=job.work, waited_s=now - job.submitted_at,
                  deadline_s=job.deadline - now if math.isfinite(job.deadline) else None, remaining=remaining,
                  net_rows=job.network_rows or None)


def _give_up(job: Job, now: float, observer: Observer) -> None:
    """A request dropped: its deadline passed (the engine answers 504), or its caller gave up, which
    counts as a missed deadline when that had passed (the HTTP side's own timeout came first)."""
    late = now >= job.deadline
    if job.cancelled:
        if late:
            observer.finished(job.spec.model, False, job.predicted_s, now - (job.admitted_at or now))
    elif job.finish(error=DeadlineExceeded(f"deadline passed after {now - job.submitted_at:.1f} s")):
        observer.finished(job.spec.model, False, job.predicted_s, now - (job.admitted_at or now))
