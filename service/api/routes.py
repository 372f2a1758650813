"""The routes: parse, hand to :mod:`service.generation` and the engine, answer. Nothing else."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool

from service import render
from service.api.deps import (EngineDep, MetricsDep, RegistryDep, SettingsDep, require_key,
                              require_metrics_key)
from service.engine import DeadlineExceeded, EngineClosed, GenerationFailed, QueueFull
from service.generation import FieldErrors, UnknownModel, describe, prepare
from service.metrics import CONTENT_TYPE
from service.schemas import ErrorResponse, GenerateRequest, GenerateResponse, ModelList, Timings

router = APIRouter()

ERRORS = {401: {"model": ErrorResponse, "description": "API keys are configured and none valid was given"},
          404: {"model": ErrorResponse, "description": "Unknown model"},
          422: {"model": ErrorResponse, "description": "Invalid fields, each named with the reason"},
          429: {"model": ErrorResponse, "description": "Queue full; see Retry-After"},
          503: {"model": ErrorResponse, "description": "Not ready or shutting down; see Retry-After"},
          504: {"model": ErrorResponse, "description": "The request's deadline passed"}}


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read; what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/generate", response_model=GenerateResponse, dependencies=[Depends(require_key)], responses={
    **ERRORS, 200: {"content": {"image/png": {}}, "description": "JSON, or with `Accept: image/png` the PNG "
                    "itself (a grid when num_images > 1)"}})
async def generate(body: GenerateRequest, request: Request, settings: SettingsDep, registry: RegistryDep,
                   engine: EngineDep):
    """Generate images for a prompt or a class label (see the request schema for every field)."""
    start = time.perf_counter()
    info = request.state.log
    info.update(model=body.model or registry.default, scheduler=body.scheduler, images=body.num_images)
    if settings.log_prompts:
        info.update(prompt=body.prompt, class_label=body.class_label)
    try:
        spec = prepare(body, registry, settings)
    except UnknownModel as e:
        info["model"] = "unknown"  # never a user's string as a metric label
        raise HTTPException(404, str(e)) from None
    except FieldErrors as e:
        raise field_errors(e) from None
    info["steps"] = spec.steps
    try:
        job = engine.submit(spec, settings.request_timeout_s)
    except QueueFull as e:
        raise HTTPException(429, str(e), headers={"Retry-After": str(e.retry_after_s)}) from None
    except EngineClosed as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "5"}) from None

    result_ = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result_, gone}, timeout=settings.request_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.future.done():
            engine.cancel(job)  # the engine drops its rows at its next iteration
    if result_ not in done:
        if gone in done:
            info["status"] = 499  # nobody is listening; logged as such
            return Response(status_code=499)
        raise HTTPException(504, f"deadline of {settings.request_timeout_s:g} s passed")
    try:
        result = result_.result()
    except DeadlineExceeded as e:
        raise HTTPException(504, str(e)) from None
    except EngineClosed as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "5"}) from None
    except GenerationFailed as e:
        raise HTTPException(500, str(e)) from None
    info.update(queue_s=round(result.queued_s, 4), generating_s=round(result.generating_s, 4))

    accept = request.headers.get("accept", "")
    if "image/png" in accept and "application/json" not in accept:
        png = await run_in_threadpool(render.grid_png, result.images)
        return Response(png, media_type="image/png", headers={
            "X-Seeds": ",".join(map(str, spec.seeds)), "X-Model": spec.model, "X-Scheduler": spec.scheduler,
            "X-Steps": str(spec.steps), "X-Guidance": f"{spec.guidance:g}"})
    images = await run_in_threadpool(render.b64_pngs, result.images)
    return GenerateResponse(
        images=images, seeds=list(spec.seeds), model=spec.model, scheduler=spec.scheduler, steps=spec.steps,
        guidance=spec.guidance, request_id=request.state.request_id,
        timings=Timings(queued_s=result.queued_s, generating_s=result.generating_s,
                        total_s=time.perf_counter() - start))


def field_errors(e: FieldErrors) -> HTTPException:
    return HTTPException(422, [{"field": f, "msg": m, "type": t, "loc": ["body", f]} for f, m, t in e.errors])


@router.get("/models", response_model=ModelList, dependencies=[Depends(require_key)], responses=ERRORS)
async def models(registry: RegistryDep) -> ModelList:
    """Every model served: conditioning, class names, image shape, schedule, defaults, schedulers."""
    return ModelList(default=registry.default,
                     models=[describe(n, p, n == registry.default) for n, p in registry.pipelines.items()])


@router.get("/healthz")
async def healthz() -> dict:
    """Alive (answers even while the engine is busy)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Response:
    """Ready: models loaded and the engine running; 503 before that and while shutting down."""
    engine = getattr(request.app.state, "engine", None)
    registry = getattr(request.app.state, "registry", None)
    if registry is None or engine is None or not engine.running:
        return Response('{"status":"not ready"}', status_code=503, media_type="application/json",
                        headers={"Retry-After": "5"})
    return Response('{"status":"ready"}', media_type="application/json")


@router.get("/metrics", dependencies=[Depends(require_metrics_key)], include_in_schema=True,
            response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(m: MetricsDep) -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(m.render(), media_type=CONTENT_TYPE)
