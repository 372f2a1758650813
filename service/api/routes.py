"""The native routes: parse, hand to :mod:`service.generation` and the engine, answer (JSON, a PNG, or
Server-Sent Events). Nothing else."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool

from service import render
from service.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep, require_key, require_metrics_key
from service.api.jobs import charged, hold, submit, timeout, wait, wait_s
from service.api.openapi import event_stream
from service.api.streaming import KEEP_ALIVE, EventBuffer, EventStream, Finished, Heartbeat, Queued, follow, sse
from service.engine import Engine, GenerationResult, Job, Preview, Progress
from service.generation import FieldErrors, describe, prepare_async
from service.registry import UnknownModel
from service.images import TooLarge
from service.metrics import CONTENT_TYPE, Metrics
from service.schemas import (STREAM_EVENTS, ErrorResponse, GenerateRequest, GenerateResponse, ModelList, PreviewEvent,
                             ProgressEvent, QueuedEvent, StreamError, Timings)
from service.settings import Settings

router = APIRouter()

ERRORS = {401: {"model": ErrorResponse, "description": "API keys are configured and none valid was given"},
          404: {"model": ErrorResponse, "description": "Unknown model"},
          413: {"model": ErrorResponse, "description": "An image (or the body) over the service's byte limit"},
          422: {"model": ErrorResponse, "description": "Invalid fields, each named with the reason"},
          429: {"model": ErrorResponse, "description": "Queue full; see Retry-After"},
          503: {"model": ErrorResponse, "description": "Not ready, shutting down, or predicted to miss its deadline "
                "(refused at once, not accepted and timed out); see Retry-After"},
          504: {"model": ErrorResponse, "description": "The request's deadline passed"}}


EVENTS_DOC = ("Server-Sent Events: `queued` {position}, `progress` {done, total, elapsed_s} (model "
              "evaluations), `preview` {done, total, images} when asked, then `done` (the JSON answer) or "
              "`error` {detail, status}")


def wants_events(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


@router.post("/generate", response_model=GenerateResponse, dependencies=[Depends(require_key)], responses={
    **ERRORS, 200: {"content": {"image/png": {}, **event_stream(STREAM_EVENTS)},
                    "description": "JSON; with `Accept: image/png` the PNG itself (a grid when num_images > 1); "
                    "with `stream: true` or `Accept: text/event-stream`, " + EVENTS_DOC}})
async def generate(body: GenerateRequest, request: Request, settings: SettingsDep, registry: RegistryDep,
                   engine: EngineDep, metrics: MetricsDep):
    """Generate images for a prompt or a class label, or edit a given image (image, mask, strength:
    image-to-image and inpainting); see the request schema for every field."""
    start = time.perf_counter()
    info = request.state.log
    info.update(scheduler=body.scheduler or "unknown", images=body.num_images,
                kind="edit" if body.image is not None else "generation")
    if settings.log_prompts:
        info.update(prompt=body.prompt, class_label=body.class_label)
    stream = body.stream or wants_events(request)
    try:
        name = registry.resolve(body.model)
        info["model"] = name
        lease, waited = await hold(registry, name, wait_s(body, settings))
    except UnknownModel as e:
        info["model"] = "unknown"  # never a user's string as a metric label
        raise HTTPException(404, str(e)) from None
    try:
        spec, previews = await prepare_async(body.model_copy(update={"model": name}), registry, settings, stream)
    except BaseException as e:
        lease.release()
        if isinstance(e, UnknownModel):
            raise HTTPException(404, str(e)) from None
        if isinstance(e, FieldErrors):
            raise field_errors(e) from None
        if isinstance(e, TooLarge):
            raise HTTPException(413, [{"field": e.field, "msg": str(e), "type": "too_large",
                                       "loc": ["body", e.field]}]) from None
        raise
    spec = charged(spec, waited)
    info.update(steps=spec.steps, scheduler=spec.scheduler)
    if stream:
        buffer = EventBuffer(asyncio.get_running_loop(), settings.preview_buffer, previews)
        job = submit(engine, spec, buffer.listener, lease)
        info["stream"] = True
        metrics.streamed(spec.model)
        return EventStream(_events(engine, job, buffer, request, settings, metrics, start))

    job = submit(engine, spec, lease=lease)
    result = await wait(engine, job, request, settings)
    if result is None:
        info["status"] = 499  # nobody is listening; logged as such
        return Response(status_code=499)
    info.update(queue_s=round(result.queued_s, 4), generating_s=round(result.generating_s, 4))
    accept = request.headers.get("accept", "")
    if "image/png" in accept and "application/json" not in accept:
        png = await run_in_threadpool(render.grid_png, result.images)
        return Response(png, media_type="image/png", headers={
            "X-Seeds": ",".join(map(str, spec.seeds)), "X-Model": spec.model, "X-Scheduler": spec.scheduler,
            "X-Steps": str(spec.steps), "X-Guidance": f"{spec.guidance:g}", "X-Evaluations": str(job.work),
            "X-Size": f"{result.images.shape[-1]}x{result.images.shape[-2]}"})
    return await answer(job, result, request, start)


async def answer(job: Job, result: GenerationResult, request: Request, start: float) -> GenerateResponse:
    spec = job.spec
    images = await run_in_threadpool(render.b64_pngs, result.images)
    return GenerateResponse(
        images=images, seeds=list(spec.seeds), model=spec.model, scheduler=spec.scheduler, steps=spec.steps,
        guidance=spec.guidance, guidance_scale=spec.guidance + 1, width=int(result.images.shape[-1]),
        height=int(result.images.shape[-2]), evaluations=job.work, strength=spec.strength if spec.image is not None else None,
        request_id=request.state.request_id,
        timings=Timings(queued_s=result.queued_s, generating_s=result.generating_s,
                        total_s=time.perf_counter() - start))


async def _events(engine: Engine, job: Job, buffer: EventBuffer, request: Request, settings: Settings,
                  metrics: Metrics, start: float):
    """The native stream: queued, progress, preview, then done or error."""
    spec, info, sent = job.spec, request.state.log, 0
    try:
        async with aclosing(follow(engine, job, buffer, request, timeout(job.spec, settings))) as items:
            async for item in items:
                if isinstance(item, Heartbeat):
                    yield KEEP_ALIVE
                elif isinstance(item, Queued):
                    yield sse("queued", QueuedEvent(position=item.position))
                elif isinstance(item, Progress):
                    yield sse("progress", ProgressEvent(done=item.done, total=item.total,
                                                        elapsed_s=round(item.elapsed_s, 4)))
                elif isinstance(item, Preview):
                    images = await run_in_threadpool(render.b64_pngs, item.images)
                    sent += 1
                    yield sse("preview", PreviewEvent(done=item.done, total=item.total, images=images))
                elif isinstance(item, Finished):
                    result = item.result
                    info.update(queue_s=round(result.queued_s, 4), generating_s=round(result.generating_s, 4))
                    yield sse("done", await answer(job, result, request, start))
                else:
                    info["error"] = item.status
                    yield sse("error", StreamError(detail=item.message, status=item.status))
    finally:
        metrics.previews(spec.model, sent=sent, dropped=buffer.dropped)


def field_errors(e: FieldErrors) -> HTTPException:
    return HTTPException(422, [{"field": f, "msg": m, "type": t, "loc": ["body", f]} for f, m, t in e.errors])


@router.get("/models", response_model=ModelList, dependencies=[Depends(require_key)], responses=ERRORS)
async def models(registry: RegistryDep, settings: SettingsDep) -> ModelList:
    """Every model served: conditioning, class names, image and sample shapes, sizes, text encoders,
    schedule, defaults, schedulers; its state (on the device or not, a failed load's error); aliases."""
    entries = [e for e in registry.entries() if e.servable]
    return ModelList(default=registry.default, aliases=registry.aliases(),
                     models=[describe(e.name, e.card, e.name == registry.default, settings, e.state, e.error)
                             for e in entries if e.card is not None],
                     not_loaded_yet=[e.name for e in entries if e.card is None])


@router.get("/healthz")
async def healthz() -> dict:
    """Alive (answers even while the engine is busy)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Response:
    """Ready: models loaded, the engine running and the job store reachable; 503 before that, while
    shutting down, and while the job store (Redis) is unreachable."""
    engine = getattr(request.app.state, "engine", None)
    registry = getattr(request.app.state, "registry", None)
    jobs = getattr(request.app.state, "jobs", None)
    if registry is None or engine is None or not engine.running or jobs is None or not jobs.healthy:
        return Response('{"status":"not ready"}', status_code=503, media_type="application/json",
                        headers={"Retry-After": "5"})
    return Response('{"status":"ready"}', media_type="application/json")


@router.get("/metrics", dependencies=[Depends(require_metrics_key)], include_in_schema=True,
            response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(m: MetricsDep) -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(m.render(), media_type=CONTENT_TYPE)
