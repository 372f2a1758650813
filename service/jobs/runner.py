"""The job runner: pulls jobs from the store while the engine has room, runs each as a /generate
request would run (the same preparation, lease, engine and events), and writes its one result.

Capacity is the engine's (:meth:`Engine.free_rows`: the cost model's knee less the rows in flight
and waiting), so a replica with a long batch running takes no more work and an idle one takes it:
work spreads by capacity, not round-robin. Jobs come in two lanes, as the engine's own admission
sees requests: short ones (at most ``short_request_evaluations`` per image) are claimed first and
into the rows the engine reserves for them; long ones only beyond that reserve. Jobs run as bulk work (no deadline, yielding to
requests that have one) unless their body gives ``timeout_s``.

Faults: every claim is a lease renewed each third of ``visibility_timeout_s`` (with the cancel
flags read back); a job still running when the process drains goes back to the queue; a store that
is down is retried (the result stays in memory until it is written); webhooks go out on their own
tasks (:class:`service.jobs.webhooks.Deliverer`) and never hold the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import os
import time
from dataclasses import dataclass

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool

from service import render
from service.api.jobs import charged, hold, submit, wait_s
from service.api.streaming import _OUTCOME, EventBuffer, Failed, Finished, outcome
from service.engine import Engine, Job, Preview, Progress
from service.generation import FieldErrors, prepare_async
from service.images import TooLarge
from service.jobs.store import JobRecord, JobStore, StoreUnavailable
from service.metrics import Metrics
from service.registry import ModelRegistry, UnknownModel
from service.schemas import GenerateRequest, GenerateResponse, Timings
from service.settings import Settings

log = logging.getLogger("service.jobs")

POLL_S = 0.25  # how often the queue is looked at when nothing wakes the runner
MAX_ATTEMPTS = 20  # claims of one job that found no room (or a replica that died) before it fails
PROGRESS_S = 0.5  # progress events are stored at most this often per job (and always the last)
WEBHOOK_PROGRESS_S = 2.0  # progress webhooks, at most this often per job
GAUGES_S = 2.0
PURGE_S = 60.0


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class _Running:
    record: JobRecord
    task: asyncio.Task | None = None
    job: Job | None = None  # once submitted to the engine
    cancel: bool = False  # its owner cancelled it
    released: bool = False  # given back to the queue (drain, lost lease): no result from here


def request_body(record: JobRecord) -> GenerateRequest:
    """The stored body as /generate's request (the routes stored it without the job-only fields)."""
    return GenerateRequest.model_validate(record.request)


def field_detail(e: FieldErrors) -> list[dict]:
    return [{"field": f, "msg": m, "type": t, "loc": ["body", f]} for f, m, t in e.errors]


class JobRunner:
    def __init__(self, store: JobStore, engine: Engine, registry: ModelRegistry, settings: Settings,
                 metrics: Metrics, deliverer=None, worker: str | None = None, run_jobs: bool = True):
        self.store, self.engine, self.registry, self.settings = store, engine, registry, settings
        self.metrics, self.deliverer = metrics, deliverer
        self.worker = worker or worker_name()
        self.run_jobs = run_jobs
        self.visibility_s = settings.visibility_timeout_s
        self.reserve_rows = settings.policy().reserve_rows
        self._running: dict[str, _Running] = {}
        self._preparing_rows = 0  # claimed, not yet in the engine's queue
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._backoff_until = 0.0
        self.stopping = False
        self.draining = False  # the process was told to stop: claim nothing more (set from a signal handler)
        self.healthy = True
        self._last_webhook_progress: dict[str, float] = {}
        self._watchers: dict[str, set[asyncio.Event]] = {}  # job id -> event followers waiting here

    @contextlib.contextmanager
    def watch(self, job_id: str):
        """An asyncio.Event set whenever this replica stores an event of ``job_id`` (clear it, read the
        store, then wait on it: nothing stored in between is missed). A job another replica runs is
        seen by polling."""
        event = asyncio.Event()
        self._watchers.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    del self._watchers[job_id]

    def _notify(self, job_id: str) -> None:
        for event in self._watchers.get(job_id, ()):
            event.set()

    # --- life -------------------------------------------------------------------------------------
    async def start(self) -> None:
        recovered = getattr(self.store, "recovered", 0)
        if recovered:
            self.metrics.jobs_reclaimed.inc(recovered)
            log.info({"event": "jobs_requeued", "count": recovered, "reason": "running when the service stopped"})
        loop = asyncio.get_running_loop()

        def on_event(job_id: str) -> None:
            try:
                loop.call_soon_threadsafe(self._notify, job_id)
            except RuntimeError:  # the loop has closed
                pass

        def on_new() -> None:
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                pass

        self.store.listen(on_new, on_event)
        self._task = asyncio.create_task(self._loop(), name="job-runner")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, grace_s: float) -> None:
        """Drain: claim nothing more; let running jobs finish within ``grace_s``; give the rest back."""
        self.stopping = self.draining = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        end = time.monotonic() + grace_s
        while True:  # running jobs finish within the grace, their leases renewed meanwhile
            tasks = [r.task for r in self._running.values() if r.task is not None and not r.task.done()]
            left_s = end - time.monotonic()
            if not tasks or left_s <= 0:
                break
            await asyncio.wait(tasks, timeout=min(left_s, self.visibility_s / 3))
            try:
                await self._heartbeat()
            except StoreUnavailable:
                pass
        left = list(self._running.values())
        for r in left:
            if r.job is not None:
                self.engine.cancel(r.job)
            await self._release(r)  # (store down: its lease lapses and another replica, or the restart, takes it)
        if left:
            log.info({"event": "jobs_released", "count": len(left)})
            await asyncio.wait([r.task for r in left if r.task is not None], timeout=5)
        if self.deliverer is not None:
            await self.deliverer.close(min(5.0, grace_s))

    # --- capacity ---------------------------------------------------------------------------------
    def free_rows(self) -> int:
        return self.engine.free_rows() - self._preparing_rows

    # --- the loop ---------------------------------------------------------------------------------
    async def _loop(self) -> None:
        beat = reclaim = gauges = purge = 0.0
        while not self.stopping:
            try:
                now = time.monotonic()
                if now >= beat:
                    await self._heartbeat()
                    beat = now + self.visibility_s / 3
                if now >= gauges:
                    by, age = await self.store.run("counts")
                    self.metrics.job_counts(by, age)
                    gauges = now + GAUGES_S
                if now >= purge:
                    purged = await self.store.run("purge", self.settings.job_ttl_s)
                    if purged:
                        log.info({"event": "jobs_purged", "count": purged})
                    purge = now + PURGE_S
                if self.run_jobs and not self.draining and now >= self._backoff_until:
                    if now >= reclaim:
                        await self._reclaim()
                        reclaim = now + min(self.visibility_s / 2, 5.0)
                    await self._defer()
                    await self._claim()
                self.healthy = True
            except StoreUnavailable as e:
                if self.healthy:
                    log.warning({"event": "job_store_unavailable", "error": str(e)})
                self.healthy = False
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("job runner iteration failed")
                await asyncio.sleep(1.0)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass

    async def _defer(self) -> None:
        """Replicas sharing a queue are all woken by a new job; the least loaded should take it. So a
        replica waits a fraction of a poll interval proportional to how full its engine is (an idle one
        claims at once, a full one a poll later), and the one with the most room gets there first."""
        if not self.store.shared:
            return
        capacity = max(1, self.engine.capacity())
        load = min(1.0, max(0.0, 1.0 - self.free_rows() / capacity))
        if load > 0:
            await asyncio.sleep(POLL_S * load)

    async def _reclaim(self) -> None:
        free = self.free_rows()
        if free <= 0:
            return
        for record in await self.store.run("reclaim", self.worker, self.visibility_s, max(1, free)):
            self.metrics.jobs_reclaimed.inc()
            log.info({"event": "job_reclaimed", "job": record.id})
            if record.status == "running" and record.worker == self.worker:
                self._start(record)  # Redis: taken over from a dead replica; SQLite: queued again

    async def _claim(self) -> None:
        """Short jobs while any row is free; long ones while more rows are free than the engine keeps
        for latency-sensitive work (its reserve), as the engine admits its own queue."""
        while not (self.stopping or self.draining):
            capacity = self.engine.capacity()
            # A prefetch of an eighth of the capacity keeps the next job waiting in the engine's own
            # queue, so rows a finished job frees are taken at the next iteration, not after a claim.
            free = self.free_rows() + max(1, capacity // 8)
            reserve = min(self.reserve_rows, capacity // 2)
            got = []
            if free > 0:
                got = await self.store.run("claim", self.worker, 1, self.visibility_s, "short")
            if not got and free > reserve:
                got = await self.store.run("claim", self.worker, 1, self.visibility_s, "long")
            if not got:
                return
            for record in got:
                self._start(record)

    def _start(self, record: JobRecord) -> None:
        if record.id in self._running:  # already running here (taken back from ourselves): keep that run
            return
        self.metrics.jobs_claimed.inc()
        running = _Running(record)
        self._running[record.id] = running
        self._preparing_rows += record.rows
        running.task = asyncio.create_task(self._run(running), name=f"job {record.id}")

    async def _heartbeat(self) -> None:
        if not self._running:
            return
        ids = list(self._running)
        flags = await self.store.run("extend", self.worker, ids, self.visibility_s)
        for job_id in ids:
            r = self._running.get(job_id)
            if r is None:
                continue
            if job_id not in flags:  # no longer ours (its lease lapsed and it was taken back): stop here
                r.released = True
                if r.job is not None:
                    self.engine.cancel(r.job)
            elif flags[job_id]:
                self.cancel_local(job_id)

    def cancel_local(self, job_id: str) -> bool:
        """A running job here was cancelled: its rows leave the engine; the runner writes 'cancelled'."""
        r = self._running.get(job_id)
        if r is None:
            return False
        r.cancel = True
        if r.job is not None:
            self.engine.cancel(r.job)
        return True

    # --- one job ----------------------------------------------------------------------------------
    async def _run(self, r: _Running) -> None:
        record, prepared_rows = r.record, r.record.rows
        try:
            if record.cancel_requested:
                r.cancel = True
            if r.cancel:
                await self._finish(r, "cancelled", error={"status": 499, "detail": "cancelled"})
                return
            if record.attempts <= 1:
                self._webhook(record, "start", {"id": record.id, "status": "running", "attempt": record.attempts})
            try:
                body = request_body(record)
                name = self.registry.resolve(body.model)
                lease, waited = await hold(self.registry, name, wait_s(body, self.settings))
                try:
                    prepared = await prepare_async(body.model_copy(update={"model": name}), self.registry,
                                                   self.settings, True)
                except BaseException:
                    lease.release()
                    raise
                if r.cancel or r.released:
                    lease.release()
                    await self._after(r, Failed(499, "cancelled"))
                    return
                spec = charged(prepared.spec, waited)
                buffer = EventBuffer(asyncio.get_running_loop(), self.settings.preview_buffer, prepared.previews)
                r.job = job = submit(self.engine, spec, buffer.listener, lease)
            except HTTPException as e:
                retry = (e.headers or {}).get("Retry-After")
                # No room now (queue full, a model loading, the engine closing): back in line, unless it
                # has been given back too often. A 503 without Retry-After (a model that failed to load)
                # would fail the same way again: it is the job's result.
                if e.status_code in (429, 503) and retry is not None and record.attempts < MAX_ATTEMPTS:
                    if not self.stopping:
                        self._backoff_until = time.monotonic() + min(float(retry), 5.0)
                    await self._release(r)
                    return
                await self._finish(r, "failed", error={"status": e.status_code, "detail": e.detail})
                return
            except (UnknownModel, KeyError) as e:  # (KeyError: taken out of service during preparation)
                await self._finish(r, "failed", error={"status": 404, "detail": str(e)})
                return
            except FieldErrors as e:
                await self._finish(r, "failed", error={"status": 422, "detail": field_detail(e)})
                return
            except TooLarge as e:
                await self._finish(r, "failed", error={"status": 413, "detail": str(e)})
                return
            finally:
                self._preparing_rows -= prepared_rows
                prepared_rows = 0
            await self._follow(r, job, buffer)
            await self._after(r, outcome(job.future))
        except Exception as e:
            log.exception("job %s failed", record.id)
            await self._finish(r, "failed", error={"status": 500, "detail": f"job failed: {type(e).__name__}"})
        finally:
            self._preparing_rows -= prepared_rows
            if self._running.get(record.id) is r:
                del self._running[record.id]
            self._last_webhook_progress.pop(record.id, None)
            self._wake.set()  # room again

    async def _follow(self, r: _Running, job: Job, buffer: EventBuffer) -> None:
        """Store the job's events as they come (progress at most every PROGRESS_S, and the last)."""
        buffer.watch(job)
        last = 0.0
        pending: Progress | None = None
        while True:
            item = buffer.pop()
            if item is None:
                if pending is not None and time.monotonic() - last >= PROGRESS_S:
                    await self._progress(r, pending)
                    pending, last = None, time.monotonic()
                await buffer.wait(PROGRESS_S)
                continue
            if item is _OUTCOME:
                if pending is not None:
                    await self._progress(r, pending)
                return
            if isinstance(item, Progress):
                if item.done >= item.total or time.monotonic() - last >= PROGRESS_S:
                    await self._progress(r, item)
                    pending, last = None, time.monotonic()
                else:
                    pending = item
            elif isinstance(item, Preview):
                images = await run_in_threadpool(render.b64_pngs, item.images)
                await self._store_event(r, "preview", {"done": item.done, "total": item.total, "images": images})

    async def _progress(self, r: _Running, p: Progress) -> None:
        data = {"done": p.done, "total": p.total, "elapsed_s": round(p.elapsed_s, 4)}
        await self._store_event(r, "progress", data, progress=data)
        now = time.monotonic()
        if now - self._last_webhook_progress.get(r.record.id, 0.0) >= WEBHOOK_PROGRESS_S or p.done >= p.total:
            self._last_webhook_progress[r.record.id] = now
            self._webhook(r.record, "progress", {"id": r.record.id, "status": "running", **data})

    async def _store_event(self, r: _Running, event: str, data: dict, progress: dict | None = None) -> None:
        if r.released:
            return
        try:
            await self.store.run("append", r.record.id, event, data, progress)
        except StoreUnavailable:
            return  # progress is not worth waiting for; the result is
        self._notify(r.record.id)

    async def _after(self, r: _Running, end: Finished | Failed) -> None:
        if r.released:
            return
        if r.cancel:
            await self._finish(r, "cancelled", error={"status": 499, "detail": "cancelled"})
        elif isinstance(end, Finished):
            await self._finish(r, "succeeded", result=await self._answer(r, end))
        elif end.status == 503 and self.stopping:  # the engine closed under it: another run will finish it
            await self._release(r)
        else:
            await self._finish(r, "failed", error={"status": end.status, "detail": end.message})

    async def _answer(self, r: _Running, end: Finished) -> dict:
        job, result = r.job, end.result
        spec = job.spec
        images = await run_in_threadpool(render.b64_pngs, result.images)
        started = r.record.started_at or r.record.created_at
        return GenerateResponse(
            images=images, seeds=list(spec.seeds), model=spec.model, scheduler=spec.scheduler, steps=spec.steps,
            guidance=spec.guidance, guidance_scale=spec.guidance + 1, width=int(result.images.shape[-1]),
            height=int(result.images.shape[-2]), evaluations=job.work,
            strength=spec.strength if spec.image is not None else None, request_id=r.record.id,
            timings=Timings(queued_s=result.queued_s, generating_s=result.generating_s,
                            total_s=max(0.0, time.time() - started))).model_dump(mode="json")

    async def _release(self, r: _Running) -> None:
        """Give the job back to the queue; with the store down, its lease lapses and it is taken back."""
        r.released = True
        try:
            await self.store.run("release", r.record.id, self.worker)
        except StoreUnavailable:
            pass

    async def _finish(self, r: _Running, status: str, result: dict | None = None, error: dict | None = None) -> None:
        """Write the terminal result; while the store is down, keep it and retry (a drain gives up:
        the job is still claimed, and runs again elsewhere). Nothing for a job given back."""
        if r.released:
            return
        while True:
            try:
                written = await self.store.run("finish", r.record.id, status, result, error)
                break
            except StoreUnavailable:
                if self.stopping:
                    return
                await asyncio.sleep(1.0)
        self._notify(r.record.id)
        if not written:
            return  # it already had its result (a cancel, another replica's run)
        self.metrics.jobs_finished.labels(status).inc()
        log.info({"event": "job_finished", "job": r.record.id, "status": status, "attempts": r.record.attempts})
        data = {"id": r.record.id, "status": status}
        if result is not None:
            data["result"] = result
        if error is not None:
            data["error"] = error
        self._webhook(r.record, "completed", data)

    # --- webhooks ---------------------------------------------------------------------------------
    def cancelled(self, record: JobRecord) -> None:
        """A queued job the routes cancelled (no runner saw it): its completed webhook."""
        self.metrics.jobs_finished.labels("cancelled").inc()
        self._notify(record.id)
        self._webhook(record, "completed", {"id": record.id, "status": "cancelled", "error": record.error})

    def _webhook(self, record: JobRecord, event: str, data: dict) -> None:
        hook = record.webhook
        if self.deliverer is None or not hook or event not in hook.get("events", ()):
            return
        self.deliverer.send(record.id, hook["url"], event, data, int(time.time() * 1000))
