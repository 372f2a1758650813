"""The tensor side of the engine: the rows of one model (at one image size) in flight, and one
iteration over them.

Every image in flight is a row of the model's :class:`diffusion.Runner` (fixed-capacity buffers on
the device); beside it lies which request (and which of its images) owns each row.
:meth:`ModelBatch.step` is ONE forward pass for every row of the model, whatever their sampler,
step, guidance, condition, negative prompt or edit, with no host synchronisation;
:meth:`ModelBatch.admit`, :meth:`ModelBatch.drop` and :meth:`ModelBatch.retire` add and remove rows
between iterations. The host knows which rows finish at each step (the runner counts evaluations);
a finished row leaves the table at once and waits for its decode (:mod:`service.engine.decode`: the
identity for a pixel model, the VAE in bounded chunks for a latent one), and its image travels to
the host as a non-blocking copy that the engine collects once it has landed (:class:`Retired`).
Rows never influence each other, so a request's images do not depend on what else is in flight.
Rows of different sizes are different batches (one forward pass has one shape).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from diffusion import Acceleration, ModelCard, RowRequest, Runner
from diffusion.runner import power_of_two_buckets

from service.engine.decode import DecodeQueue, DecodeWork
from service.engine.job import GenerationSpec, Job
from service.engine.threads import CpuThreads


class Model(Protocol):
    """What the engine needs of a model: :class:`diffusion.Pipeline` has it, whatever the model's format."""
    name: str
    device: torch.device
    card: ModelCard

    def net(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor: ...

    def runner(self, capacity: int, max_steps: int | None = None, accel: Acceleration = Acceleration(),
               shape: tuple[int, int, int] | None = None) -> Runner: ...

    def row_request(self, condition, seed: int, scheduler: str, steps: int | None, guidance: float | None,
                    clip: str | None, percentile: float, spacing: str | None, **kw) -> RowRequest: ...

    def evaluations(self, scheduler: str, steps: int | None, spacing: str | None, strength: float,
                    jump_length: int, jump_n_sample: int) -> int: ...

    def encode_conditions(self, conditions) -> None: ...

    def edit_inputs(self, image: torch.Tensor, mask: torch.Tensor | None) -> tuple: ...

    def decode(self, samples: torch.Tensor, image: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def preview(self, x0: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Retired:
    """Finished rows on their way to the host: ``images`` is valid once ``ready()``."""
    owners: list[tuple[Job, int]]
    images: torch.Tensor  # [k, C, H, W] on the CPU
    event: torch.cuda.Event | None = None
    preview: tuple[int, int] | None = None  # (done, total): x̂0 of a request in flight, not finished rows

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class StepTimer:
    """Wall time of an iteration on the CPU; on a GPU, CUDA events read back once they have passed
    (so timing never blocks the engine). The same events bound how far the host runs ahead of the
    GPU: before launching an iteration it waits until at most ``run_ahead`` are still queued (the
    host would otherwise queue iterations, admissions and answers far ahead of the work itself)."""

    def __init__(self, device: torch.device, run_ahead: int = 3):
        self.cuda = device.type == "cuda"
        self.run_ahead = run_ahead
        self._open: list[tuple[int, object, object]] = []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        if len(self._open) >= self.run_ahead:
            self._open[-self.run_ahead][2].synchronize()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, rows, started) -> list[tuple[object, float]]:
        """Record the end of an iteration (``rows``: what to report with it); every (rows, seconds)
        whose end has passed by now."""
        if not self.cuda:
            return [(rows, time.perf_counter() - started)]
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._open.append((rows, started, end))
        done = []
        while self._open and self._open[0][2].query():
            r, a, b = self._open.pop(0)
            done.append((r, a.elapsed_time(b) / 1000))
        return done


class ModelBatch:
    """All rows in flight for one model."""

    def __init__(self, model: Model, capacity: int, max_steps: int | None = None,
                 accel: Acceleration = Acceleration(), threads: CpuThreads | None = None,
                 shape: tuple[int, int, int] | None = None, decode_pixels: int = 2 * 1024 * 1024):
        """``shape``: the rows' sample shape (default: the model's native one); ``decode_pixels``:
        image pixels per decode chunk (:mod:`service.engine.decode`)."""
        self.model = model
        self.shape = tuple(shape or model.card.sample_shape)
        self.runner = model.runner(capacity, max_steps, accel, shape=self.shape)
        self.owners: dict[int, tuple[Job, int]] = {}  # runner handle -> (job, image index)
        self.timer = StepTimer(torch.device(model.device))
        self.threads = threads  # None: leave the thread count alone (a GPU, or a test)
        pixels = self.shape[1] * self.shape[2] * model.card.scale ** 2
        self.decoding = DecodeQueue(self._decode, max(1, decode_pixels // pixels))

    @property
    def rows(self) -> int:
        return len(self.runner)

    @property
    def busy(self) -> bool:
        """Rows in flight or waiting for their decode."""
        return self.rows > 0 or bool(self.decoding)

    @property
    def free(self) -> int:
        return self.runner.table.free

    def jobs(self) -> set[Job]:
        """The requests with rows in flight (not those whose rows only wait for their decode)."""
        return {job for job, _ in self.owners.values()}

    def evaluations(self, spec: GenerationSpec) -> int:
        """Model evaluations one image of ``spec`` needs (ValueError for a plan the model cannot run)."""
        return self.model.evaluations(spec.scheduler, spec.steps, spec.spacing, spec.strength, spec.jump_length,
                                      spec.jump_n_sample)

    def warm_up(self) -> None:
        self.runner.warm_up()

    @torch.no_grad()
    def admit(self, job: Job, urgent: bool = False, vectors: Mapping | None = None) -> None:
        """Start a request's rows from their seeded noise; they take part in the next step.
        ``urgent`` rows are latency-sensitive: stepped first, whatever the iteration's row limit."""
        spec = job.spec
        options = {"eta": spec.eta} if spec.scheduler == "ddim" else {}
        edit = spec.edit()
        if spec.image is not None:  # into sample space once for all the request's rows (a latent model's VAE encoder)
            known, mask = self.model.edit_inputs(spec.image[None], None if spec.mask is None else spec.mask[None])
            edit.update(image=known[0], mask=None if mask is None else mask[0])
        rows = [self.model.row_request(spec.condition, seed, spec.scheduler, spec.steps, spec.guidance, spec.clip,
                                       spec.percentile, spec.spacing, negative=spec.negative, vectors=vectors, **edit,
                                       **options)
                for seed in spec.seeds]
        handles = self.runner.add(rows, priority=0 if urgent else 1)
        self.owners.update((h, (job, k)) for k, h in enumerate(handles))

    def drop(self, jobs: set[Job]) -> None:
        """Remove every row of ``jobs``."""
        gone = [h for h, (job, _) in self.owners.items() if job in jobs]
        self.runner.remove(gone)
        for h in gone:
            del self.owners[h]

    def progress(self) -> dict[Job, tuple[int, int]]:
        """(model evaluations done, needed) of every request in flight (its slowest image)."""
        out: dict[Job, tuple[int, int]] = {}
        for h, (job, _) in self.owners.items():
            d, t = self.runner.table.progress(h)
            old = out.get(job)
            out[job] = (d, t) if old is None else (min(old[0], d), max(old[1], t))
        return out

    @torch.no_grad()
    def preview(self, job: Job, done: int, total: int) -> "Retired | None":
        """The current x̂0 of a request's images as images (the model's cheap preview), on its way to
        the host like finished rows; a preview decoded in full (``spec.preview_decode``) joins the
        decode queue instead (None)."""
        handles = sorted((k, h) for h, (j, k) in self.owners.items() if j is job)
        x0 = self.runner.table.peek([h for _, h in handles])
        owners = [(job, k) for k, _ in handles]
        if job.spec.preview_decode:
            self.decoding.put(DecodeWork(owners, x0, preview=(done, total)))
            return None
        return self._to_host(owners, self.model.preview(x0), (done, total))

    @torch.no_grad()
    def step(self, latency_rows: int | None = None) -> tuple[int, list[int], list[tuple[int, float]]]:
        """One engine iteration for this model: ONE forward pass over its rows (all of them, or with
        ``latency_rows`` and urgent rows in flight, the urgent ones and bulk ones up to that many).
        Returns the rows stepped, the handles it finished, and the (rows, seconds) of iterations
        whose timing is in."""
        limit = latency_rows if latency_rows and self.runner.table.urgent else None
        rows = self.rows if limit is None else min(self.rows, max(limit, self.runner.table.urgent))
        net = rows * (2 if self.runner.table.flags(rows)["guided"] and self.runner.can_guide else 1)
        if self.threads is not None:
            self.threads.apply(net)
        started = self.timer.start()
        finished = self.runner.step(limit)
        return rows, finished, self.timer.stop((rows, net), started)

    @torch.no_grad()
    def calibrate(self, budget_s: float) -> list[tuple[int, float]]:
        """(network rows, seconds) of iterations timed on the empty table at 1, 2, 4, … rows (guided
        when the model can be), until about ``budget_s`` is spent; the iteration's variant is the
        one a full batch runs (compiled or captured where accelerated)."""
        runner, table = self.runner, self.runner.table
        if len(table) or budget_s <= 0:
            return []
        guided = runner.can_guide
        cuda = torch.device(self.model.device).type == "cuda"
        out, spent = [], 0.0
        for b in power_of_two_buckets(table.capacity):
            b = runner.bucket(b) if runner.padded else b
            net = b * (2 if guided else 1)
            if self.threads is not None:
                self.threads.apply(net)
            times = []
            for _ in range(2):  # the first one pays for allocations
                started = time.perf_counter()
                runner.run_inert(b, guided)
                if cuda:
                    torch.cuda.synchronize(self.model.device)
                times.append(time.perf_counter() - started)
            out.append((net, times[-1]))
            spent += sum(times)
            if spent >= budget_s or 4 * times[-1] > budget_s:
                break
        return out

    @torch.no_grad()
    def retire(self, handles: list[int]) -> None:
        """Take finished rows out of the table at once; they wait for their decode (:meth:`decode`)."""
        owners = [self.owners.pop(h) for h in handles]
        self.decoding.put(DecodeWork(owners, self.runner.take(handles)))

    @torch.no_grad()
    def decode(self, everything: bool = False) -> list["Retired"]:
        """Decode one chunk of the rows waiting (``everything``: all of them, chunk by chunk); what
        that completes starts its way to the host."""
        out = []
        if self.threads is not None and self.model.card.scale > 1:
            self.threads.apply_all()
        while self.decoding:
            out += [self._to_host(owners, images, preview) for owners, images, preview in self.decoding.step()]
            if not everything:
                break
        return out

    def _decode(self, owners: list[tuple[Job, int]], samples: torch.Tensor) -> torch.Tensor:
        """Images of samples; an inpainting request's kept pixels composited back exactly."""
        masked = [j for j, (job, _) in enumerate(owners) if job.spec.mask is not None]
        if not masked:
            return self.model.decode(samples)
        image = torch.stack([job.spec.image if job.spec.mask is not None else torch.zeros_like(owners[masked[0]][0]
                             .spec.image) for job, _ in owners])
        mask = torch.stack([job.spec.mask if job.spec.mask is not None else torch.ones_like(owners[masked[0]][0]
                            .spec.mask) for job, _ in owners])
        return self.model.decode(samples, image, mask)

    @staticmethod
    def _to_host(owners, images: torch.Tensor, preview: tuple[int, int] | None = None) -> "Retired":
        if images.device.type != "cuda":
            return Retired(owners, images.cpu(), preview=preview)
        host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
        host.copy_(images, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Retired(owners, host, event, preview)

    def clear(self) -> set[Job]:
        jobs = self.jobs() | self.decoding.clear()
        self.runner.table.clear()
        self.owners = {}
        return jobs
