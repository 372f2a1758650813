"""OpenAI Images API compatibility: ``POST /v1/images/generations`` and ``GET /v1/models``, so the
official ``openai`` client (and the tools built on it) work unmodified. A request is translated into
a native :class:`GenerateRequest` and goes the native way; errors take OpenAI's shape
(:mod:`service.api.errors`)."""

from __future__ import annotations

import asyncio
import datetime as _dt
import time
from contextlib import aclosing

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool

from service import render
from service.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep, require_key
from service.api.errors import openai_body
from service.api.jobs import submit, wait
from service.api.openapi import event_stream
from service.api.streaming import KEEP_ALIVE, EventBuffer, EventStream, Failed, Finished, Heartbeat, follow, sse
from service.engine import Engine, Job, Preview
from service.generation import FieldErrors, prepare
from service.metrics import Metrics
from service.openai_schemas import (STREAM_EVENTS, CompletedImageEvent, ImageData, ImageGenerationRequest,
                                    ImagesResponse, OpenAIErrorResponse, OpenAIModel, OpenAIModelList,
                                    OpenAIStreamError, PartialImageEvent)
from service.registry import ModelRegistry
from service.schemas import GenerateRequest, Sampling
from service.settings import Settings

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

ERRORS = {status: {"model": OpenAIErrorResponse, "description": text} for status, text in {
    400: "Invalid request: the parameter is named in error.param", 401: "API keys are configured and none valid "
    "was given", 404: "Unknown model", 429: "Queue full; see Retry-After", 503: "Not ready or shutting down",
    504: "The request's deadline passed"}.items()}


def invalid(param: str | None, message: str, code: str = "invalid_value") -> HTTPException:
    return HTTPException(400, {"message": message, "param": param, "code": code})


def image_size(shape) -> str:
    """``WIDTHxHEIGHT`` of a [C, H, W] image shape."""
    return f"{shape[2]}x{shape[1]}"


def native(req: ImageGenerationRequest, registry: ModelRegistry) -> tuple[GenerateRequest, str]:
    """The native request this one stands for, and its image size; 400 or 404 for what cannot be served."""
    if req.response_format == "url":
        raise invalid("response_format", "response_format 'url' is not supported: this service returns images "
                      "inline only; use 'b64_json' (the default).", "unsupported_value")
    stream = bool(req.stream)
    name = req.model if req.model is not None else registry.default
    if name not in registry:
        raise HTTPException(404, {"message": f"The model '{req.model}' does not exist; available: "
                                  f"{', '.join(registry.names())}", "param": "model",
                                  "code": "model_not_found"}) from None
    card = registry[name].card
    # OpenAI's prompt is required; an unconditional model takes the empty one as no prompt
    prompt = None if req.prompt == "" and card.conditioning == "none" else req.prompt
    fields = {**req.model_dump(include=set(Sampling.model_fields)), "prompt": prompt, "model": req.model,
              "num_images": req.n or 1, "stream": stream}
    if stream and req.partial_images:
        fields["preview_at"] = [j / (req.partial_images + 1) for j in range(1, req.partial_images + 1)]
    body = GenerateRequest.model_validate(fields)
    size = image_size(card.image_shape)
    if req.size not in (None, "auto", size):
        raise invalid("size", f"Invalid value for 'size': '{req.size}'. Model '{name}' makes {size} images only "
                      f"(or use 'auto').")
    return body, size


@router.post("/images/generations", response_model=ImagesResponse, dependencies=[Depends(require_key)],
             responses={**ERRORS, 200: {"content": event_stream(STREAM_EVENTS),
                                        "description": "JSON, or with `stream: true` Server-Sent Events "
                                        "(partial images, then one completed event per image, or an `error` event)"}})
async def images_generations(req: ImageGenerationRequest, request: Request, settings: SettingsDep,
                             registry: RegistryDep, engine: EngineDep, metrics: MetricsDep):
    """OpenAI's image generation: `client.images.generate(prompt=..., model=..., n=..., size=...)`. This
    service's sampling fields (scheduler, steps, guidance, seed, …) go in the body too (`extra_body`)."""
    info = request.state.log
    model = registry.default if req.model is None else req.model if req.model in registry else "unknown"
    info.update(model=model, scheduler=req.scheduler, images=req.n or 1, api="openai")  # labels: known names only
    if settings.log_prompts:
        info.update(prompt=req.prompt)
    body, size = native(req, registry)
    try:
        spec, previews, _ = prepare(body, registry, settings, body.stream)
    except FieldErrors as e:
        field, message, _ = e.errors[0]
        field = {"num_images": "n", "preview_at": "partial_images"}.get(field, field)
        raise invalid(field, f"Invalid value for '{field}': {message}.") from None
    info["steps"] = spec.steps
    if body.stream:
        buffer = EventBuffer(asyncio.get_running_loop(), settings.preview_buffer, previews)
        job = submit(engine, spec, settings, buffer.listener)
        metrics.streamed(spec.model)
        info["stream"] = True
        return EventStream(_events(engine, job, buffer, request, settings, metrics, size))

    job = submit(engine, spec, settings)
    result = await wait(engine, job, request, settings)
    if result is None:
        info["status"] = 499
        return Response(status_code=499)
    info.update(queue_s=round(result.queued_s, 4), generating_s=round(result.generating_s, 4))
    images = await run_in_threadpool(render.b64_pngs, result.images)
    answer = ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=b) for b in images], size=size)
    return Response(answer.model_dump_json(), media_type="application/json",
                    headers={"X-Seeds": ",".join(map(str, spec.seeds))})


async def _events(engine: Engine, job: Job, buffer: EventBuffer, request: Request, settings: Settings,
                  metrics: Metrics, size: str):
    """OpenAI's stream: partial images (previews), a completed event per image, or an error event."""
    info, rounds = request.state.log, 0
    try:
        async with aclosing(follow(engine, job, buffer, request, settings.request_timeout_s)) as items:
            async for item in items:
                if isinstance(item, Heartbeat):
                    yield KEEP_ALIVE
                elif isinstance(item, Preview):
                    for b64 in await run_in_threadpool(render.b64_pngs, item.images):
                        yield sse("image_generation.partial_image", PartialImageEvent(
                            b64_json=b64, created_at=int(time.time()), size=size, partial_image_index=rounds))
                    rounds += 1
                elif isinstance(item, Finished):
                    result = item.result
                    info.update(queue_s=round(result.queued_s, 4), generating_s=round(result.generating_s, 4))
                    for b64 in await run_in_threadpool(render.b64_pngs, result.images):
                        yield sse("image_generation.completed", CompletedImageEvent(
                            b64_json=b64, created_at=int(time.time()), size=size))
                elif isinstance(item, Failed):
                    info["error"] = item.status
                    yield sse("error", OpenAIStreamError(**openai_body(item.status, item.message)))
    finally:
        metrics.previews(job.spec.model, sent=rounds, dropped=buffer.dropped)


@router.get("/models", response_model=OpenAIModelList, dependencies=[Depends(require_key)], responses=ERRORS)
async def list_models(registry: RegistryDep) -> OpenAIModelList:
    """The models served, as OpenAI lists them (`client.models.list()`); details: GET /models."""
    return OpenAIModelList(data=[_model(n, registry) for n in registry.names()])


@router.get("/models/{model}", response_model=OpenAIModel, dependencies=[Depends(require_key)], responses=ERRORS)
async def get_model(model: str, registry: RegistryDep) -> OpenAIModel:
    """One model (`client.models.retrieve(id)`)."""
    if model not in registry:
        raise HTTPException(404, {"message": f"The model '{model}' does not exist", "param": "model",
                                  "code": "model_not_found"})
    return _model(model, registry)


def _model(name: str, registry: ModelRegistry) -> OpenAIModel:
    pipe = registry[name]
    saved = pipe.provenance.get("date")
    try:
        created = int(_dt.datetime.fromisoformat(str(saved)).timestamp()) if saved else 0
    except ValueError:
        created = 0
    card = pipe.card
    return OpenAIModel(id=name, created=created, size=image_size(card.image_shape), image_shape=list(card.image_shape),
                       conditioning=card.conditioning, parameters=card.parameters, source=card.source)
