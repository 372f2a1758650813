"""What every generation route does with the engine: submit a prepared spec, and wait for its
outcome while watching for the client's disconnect and the deadline. Engine refusals become HTTP
errors (the error handlers give them the path's shape)."""

from __future__ import annotations

import asyncio

from fastapi import HTTPException, Request

from service.api.streaming import disconnected, failure
from service.engine import Engine, EngineClosed, GenerationResult, GenerationSpec, Job, QueueFull, Refused
from service.settings import Settings


def submit(engine: Engine, spec: GenerationSpec, listener=None) -> Job:
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
