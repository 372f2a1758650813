"""What every generation route does with the registry and the engine: hold its model (loading it
first when it is not on the device), submit a prepared spec, and wait for its outcome while watching
for the client's disconnect and the deadline. Registry and engine refusals become HTTP errors (the
error handlers give them the path's shape)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time

from fastapi import HTTPException, Request

from service.api.streaming import disconnected, failure
from service.engine import Engine, EngineClosed, GenerationResult, GenerationSpec, Job, QueueFull, Refused
from service.registry import Lease, LoadError, ModelRegistry, ModelUnavailable
from service.settings import Settings


async def hold(registry: ModelRegistry, name: str, wait_s: float) -> tuple[Lease, float]:
    """(a lease on model ``name``, seconds waited for it): when the model is not on the device, its
    load is awaited for up to ``wait_s`` (the request's deadline). 503 with Retry-After when it is
    still loading then, when no room can be made for it, or when its last load failed; UnknownModel
    when it is (or has just been) taken out of service."""
    started = time.monotonic()
    while True:
        try:
            got = registry.lease(name)
        except ModelUnavailable as e:
            retry = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
            raise HTTPException(503, str(e), headers=retry) from None
        if isinstance(got, Lease):
            return got, time.monotonic() - started
        left = wait_s - (time.monotonic() - started)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(got)), max(left, 0.0))
        except asyncio.TimeoutError:
            last = registry.entry(name).load_s
            raise HTTPException(503, f"model {name!r} is loading and was not ready within this request's deadline "
                                f"({wait_s:g} s)", headers={"Retry-After": str(max(1, math.ceil(last or 5.0)))}) \
                from None
        except LoadError as e:
            if e.transient:  # no room now: the model stays available
                raise HTTPException(503, str(e), headers={"Retry-After": "5"}) from None
            # a failed load: the next lease says so
        finally:
            registry.unwait(name)


def wait_s(body, settings: Settings) -> float:
    """How long a request (native or OpenAI) may wait for its model's load: its deadline (bulk: the
    longest allowed)."""
    if getattr(body, "bulk", False):
        return settings.max_timeout_s
    return min(getattr(body, "timeout_s", None) or settings.request_timeout_s, settings.max_timeout_s)


def charged(spec: GenerationSpec, waited_s: float) -> GenerationSpec:
    """The spec with the time spent waiting for its model's load taken from its deadline."""
    if waited_s <= 0.01 or spec.timeout_s is None:
        return spec
    return dataclasses.replace(spec, timeout_s=max(1e-3, spec.timeout_s - waited_s))


def submit(engine: Engine, spec: GenerationSpec, listener=None, lease: Lease | None = None) -> Job:
    """Queue ``spec``; ``lease`` (its model's) is released when the job is done, or now if it is not queued."""
    try:
        job = _submit(engine, spec, listener)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    if lease is not None:
        job.future.add_done_callback(lease.release)
    return job


def _submit(engine: Engine, spec: GenerationSpec, listener=None) -> Job:
    try:
        return engine.submit(spec, spec.timeout_s, listener)
    except QueueFull as e:
        raise HTTPException(429, str(e), headers={"Retry-After": str(e.retry_after_s)}) from None
    except Refused as e:
        if e.alone:  # retrying will not help: the request is the problem, like a field out of range
            raise HTTPException(422, [{"field": "timeout_s", "msg": str(e), "type": "value_error",
                                       "loc": ["body", "timeout_s"]}]) from None
        raise HTTPException(503, str(e), headers={"Retry-After": str(e.retry_after_s)}) from None
    except EngineClosed as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "5"}) from None


def timeout(spec: GenerationSpec, settings: Settings) -> float:
    """How long the HTTP side waits: the request's deadline, or for bulk work the longest allowed."""
    return spec.timeout_s if spec.timeout_s is not None else settings.max_timeout_s


async def wait(engine: Engine, job: Job, request: Request, settings: Settings) -> GenerationResult | None:
    """The job's result; None when the client went away first (its rows leave the engine)."""
    result_ = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(disconnected(request))
    limit = timeout(job.spec, settings)
    try:  # the engine's own deadline comes first (its 504 is counted as a missed deadline); this is a backstop
        done, _ = await asyncio.wait({result_, gone}, timeout=limit + 1.0, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.future.done():
            engine.cancel(job)  # the engine drops its rows at its next iteration
    if result_ not in done:
        if gone in done:
            return None
        raise HTTPException(504, f"deadline of {limit:g} s passed")
    try:
        return result_.result()
    except Exception as e:  # the engine's errors: 504, 503, 500
        failed = failure(e)
        raise HTTPException(failed.status, failed.message, headers=failed.headers or None) from None
