"""OpenAI Images API compatibility: ``POST /v1/images/generations``, ``/v1/images/edits`` and
``/v1/images/variations`` (multipart, :mod:`service.api.openai_forms`), and ``GET /v1/models``, so
the official ``openai`` client (and the tools built on it) work unmodified. A request is translated
into a native :class:`GenerateRequest` and goes the native way; errors take OpenAI's shape
(:mod:`service.api.errors`)."""

from __future__ import annotations

import asyncio
import datetime as _dt
import re
import time
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError

from service import render
from service.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep, require_key
from service.api.errors import openai_body
from service.api.jobs import charged, hold, submit, timeout, wait, wait_s
from service.api.openapi import event_stream
from service.api import openai_forms
from service.api.openai_forms import invalid
from service.api.streaming import KEEP_ALIVE, EventBuffer, EventStream, Failed, Finished, Heartbeat, follow, sse
from service.engine import Engine, Job, Preview
from service.generation import FieldErrors, prepare_async
from service.metrics import Metrics
from service.openai_schemas import (EDIT_STREAM_EVENTS, STREAM_EVENTS, CompletedImageEvent, EditCompletedEvent,
                                    EditPartialImageEvent, ImageData, ImageEditRequest, ImageGenerationRequest,
                                    ImagesResponse, ImageVariationRequest, OpenAIErrorResponse, OpenAIModel,
                                    OpenAIModelList, OpenAIStreamError, PartialImageEvent)
from diffusion import ModelCard
from service.registry import ModelRegistry, UnknownModel
from service.schemas import Editing, GenerateRequest, Sampling
from service.settings import Settings

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

ERRORS = {status: {"model": OpenAIErrorResponse, "description": text} for status, text in {
    400: "Invalid request: the parameter is named in error.param", 401: "API keys are configured and none valid "
    "was given", 404: "Unknown model", 413: "An image (or the body) over the service's byte limit",
    429: "Queue full; see Retry-After", 503: "Not ready, shutting down, or predicted to miss its deadline (refused at "
    "once; see Retry-After)", 504: "The request's deadline passed"}.items()}


def image_size(shape) -> str:
    """``WIDTHxHEIGHT`` of a [C, H, W] image shape."""
    return f"{shape[2]}x{shape[1]}"


def not_found(req, registry: ModelRegistry) -> HTTPException:
    return HTTPException(404, {"message": f"The model '{req.model}' does not exist; available: "
                               f"{', '.join(registry.names())}", "param": "model", "code": "model_not_found"})


def native(req: ImageGenerationRequest | ImageEditRequest | ImageVariationRequest, name: str,
           card: ModelCard) -> tuple[GenerateRequest, str]:
    """The native request this one stands for (its images aside) on model ``name``, and its image
    size; 400 for what cannot be served."""
    if req.response_format == "url":
        raise invalid("response_format", "response_format 'url' is not supported: this service returns images "
                      "inline only; use 'b64_json' (the default).", "unsupported_value")
    stream = bool(getattr(req, "stream", None))
    # OpenAI's prompt is required; an unconditional model takes the empty one as no prompt
    prompt = None if req.prompt == "" and card.conditioning == "none" else req.prompt
    shared = set(Sampling.model_fields) | set(Editing.model_fields)
    fields = {**req.model_dump(include=shared & set(type(req).model_fields), exclude_none=True), "prompt": prompt,
              "model": name, "num_images": req.n or 1, "stream": stream,
              "class_label": getattr(req, "class_label", None)}
    partial = getattr(req, "partial_images", None)
    if stream and partial:
        fields["preview_at"] = [j / (partial + 1) for j in range(1, partial + 1)]
    size = image_size(card.image_shape)
    if req.size not in (None, "auto", size):
        if not card.resizable:
            raise invalid("size", f"Invalid value for 'size': '{req.size}'. Model '{name}' makes {size} images only "
                          f"(or use 'auto').")
        match = re.fullmatch(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", str(req.size))
        if match is None:
            raise invalid("size", f"Invalid value for 'size': '{req.size}'. Use WIDTHxHEIGHT (e.g. {size}) or 'auto'.")
        if "width" in fields or "height" in fields:
            raise invalid("size", "Give size or width/height, not both.")
        fields.update(width=int(match[1]), height=int(match[2]))
        size = f"{int(match[1])}x{int(match[2])}"
    elif "width" in fields or "height" in fields:
        size = f"{fields.get('width', card.image_shape[2])}x{fields.get('height', card.image_shape[1])}"
    try:
        body = GenerateRequest.model_validate(fields)
    except ValidationError as e:  # a value OpenAI's schema lets through that ours does not (width 0, …)
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "body"
        raise invalid(field, f"Invalid value for '{field}': {err['msg']}.") from None
    return body, size


@dataclass(frozen=True)
class Protocol:
    """How an endpoint names its stream events and what kind of request it is."""
    partial: type[BaseModel]
    completed: type[BaseModel]
    kind: str


GENERATIONS = Protocol(PartialImageEvent, CompletedImageEvent, "generation")
EDITS = Protocol(EditPartialImageEvent, EditCompletedEvent, "edit")
VARIATIONS = Protocol(EditPartialImageEvent, EditCompletedEvent, "variation")


async def _serve(req, request: Request, settings: Settings, registry: ModelRegistry, engine: Engine,
                 metrics: Metrics, protocol: Protocol, files: dict[str, bytes] | None = None):
    """Every OpenAI image endpoint's way: translate, prepare (decoding any image off the loop), run,
    answer as JSON or as a stream of the protocol's events."""
    info = request.state.log
    info.update(scheduler=req.scheduler or "unknown", images=req.n or 1, api="openai", kind=protocol.kind)
    if settings.log_prompts:
        info.update(prompt=req.prompt)
    try:
        name = registry.resolve(req.model)
        info["model"] = name
        lease, waited = await hold(registry, name, wait_s(req, settings))
    except UnknownModel:
        info["model"] = "unknown"
        raise not_found(req, registry) from None
    try:
        body, size = native(req, name, lease.pipe.card)
        spec, previews = await prepare_async(body, registry, settings, body.stream, given=files,
                                             kind=protocol.kind if files else None, alpha_mask=protocol is EDITS)
    except BaseException as e:
        lease.release()
        if isinstance(e, FieldErrors):
            field, message, _ = e.errors[0]
            field = {"num_images": "n", "preview_at": "partial_images"}.get(field, field)
            raise invalid(field, f"Invalid value for '{field}': {message}.") from None
        raise
    spec = charged(spec, waited)
    info.update(steps=spec.steps, scheduler=spec.scheduler)
    if spec.size is not None:
        size = f"{spec.size[1]}x{spec.size[0]}"
    if body.stream:
        buffer = EventBuffer(asyncio.get_running_loop(), settings.preview_buffer, previews)
        job = submit(engine, spec, buffer.listener, lease)
        metrics.streamed(spec.model)
        info["stream"] = True
        return EventStream(_events(engine, job, buffer, request, settings, metrics, size, protocol))

    job = submit(engine, spec, lease=lease)
    result = await wait(engine, job, request, settings)
    if result is None:
        info["status"] = 499
        return Response(status_code=499)
    info.update(queue_s=round(result.queued_s, 4), generating_s=round(result.generating_s, 4))
    images = await run_in_threadpool(render.b64_pngs, result.images)
    answer = ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=b) for b in images], size=size)
    return Response(answer.model_dump_json(), media_type="application/json",
                    headers={"X-Seeds": ",".join(map(str, spec.seeds)), "X-Evaluations": str(job.work)})


@router.post("/images/generations", response_model=ImagesResponse, dependencies=[Depends(require_key)],
             responses={**ERRORS, 200: {"content": event_stream(STREAM_EVENTS),
                                        "description": "JSON, or with `stream: true` Server-Sent Events "
                                        "(partial images, then one completed event per image, or an `error` event)"}})
async def images_generations(req: ImageGenerationRequest, request: Request, settings: SettingsDep,
                             registry: RegistryDep, engine: EngineDep, metrics: MetricsDep):
    """OpenAI's image generation: `client.images.generate(prompt=..., model=..., n=..., size=...)`. This
    service's sampling fields (scheduler, steps, guidance, seed, …) go in the body too (`extra_body`)."""
    return await _serve(req, request, settings, registry, engine, metrics, GENERATIONS)


def multipart(model: type[BaseModel], files: dict[str, str]) -> dict:
    """The OpenAPI request body of a multipart endpoint: ``model``'s fields as text parts, ``files`` as
    binary parts (name -> description)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("title", None)
    props = {name: {"type": "string", "format": "binary", "description": text} for name, text in files.items()}
    schema["properties"] = {**props, **schema.get("properties", {})}
    schema["required"] = ["image", *schema.get("required", [])]
    defs = schema.pop("$defs", None)
    assert not defs, "multipart fields must be flat"
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


EDIT_FILES = {"image": "The image to edit (PNG, JPEG or WebP; `image[]` too, one image). Without a mask, its "
              "transparent pixels (alpha = 0), if any, are the ones repainted.",
              "mask": "Where to repaint, the image's size: alpha = 0 with an alpha channel, white (≥ 128) without."}
@router.post("/images/edits", response_model=ImagesResponse, dependencies=[Depends(require_key)],
             openapi_extra=multipart(ImageEditRequest, EDIT_FILES),
             responses={**ERRORS, 200: {"content": event_stream(EDIT_STREAM_EVENTS),
                                             "description": "JSON, or with `stream: true` Server-Sent Events "
                                             "(image_edit.partial_image, image_edit.completed, error)"}})
async def images_edits(request: Request, settings: SettingsDep, registry: RegistryDep, engine: EngineDep,
                       metrics: MetricsDep):
    """OpenAI's image edit: `client.images.edit(image=..., mask=..., prompt=...)`, a multipart form: with a
    mask, inpainting; without one, image-to-image at the strength given (this service's fields, such as
    strength, scheduler, steps, guidance, seed, jump_length, go as extra form fields: `extra_body`)."""
    form = await openai_forms.read(request, ImageEditRequest, ("image", "mask"), settings.max_image_bytes)
    req = openai_forms.validate(ImageEditRequest, form)
    if "image" not in form.files:
        raise invalid("image", "Missing required parameter: 'image'.", "missing_required_parameter")
    return await _serve(req, request, settings, registry, engine, metrics, EDITS, form.files)


@router.post("/images/variations", response_model=ImagesResponse, dependencies=[Depends(require_key)],
             openapi_extra=multipart(ImageVariationRequest, {"image": EDIT_FILES["image"].split(". ")[0] + "."}),
             responses=ERRORS)
async def images_variations(request: Request, settings: SettingsDep, registry: RegistryDep, engine: EngineDep,
                            metrics: MetricsDep):
    """OpenAI's image variation: `client.images.create_variation(image=...)`: image-to-image of the image with
    no new condition (or the prompt or class_label given as extra fields), at the service's
    variation_strength unless `strength` says otherwise."""
    form = await openai_forms.read(request, ImageVariationRequest, ("image",), settings.max_image_bytes)
    req = openai_forms.validate(ImageVariationRequest, form)
    if "image" not in form.files:
        raise invalid("image", "Missing required parameter: 'image'.", "missing_required_parameter")
    return await _serve(req, request, settings, registry, engine, metrics, VARIATIONS, form.files)


async def _events(engine: Engine, job: Job, buffer: EventBuffer, request: Request, settings: Settings,
                  metrics: Metrics, size: str, protocol: Protocol):
    """OpenAI's stream: partial images (previews), a completed event per image, or an error event."""
    info, rounds = request.state.log, 0
    partial, completed = protocol.partial, protocol.completed
    try:
        async with aclosing(follow(engine, job, buffer, request, timeout(job.spec, settings))) as items:
            async for item in items:
                if isinstance(item, Heartbeat):
                    yield KEEP_ALIVE
                elif isinstance(item, Preview):
                    for b64 in await run_in_threadpool(render.b64_pngs, item.images):
                        event = partial(b64_json=b64, created_at=int(time.time()), size=size,
                                        partial_image_index=rounds)
                        yield sse(event.type, event)
                    rounds += 1
                elif isinstance(item, Finished):
                    result = item.result
                    info.update(queue_s=round(result.queued_s, 4), generating_s=round(result.generating_s, 4))
                    for b64 in await run_in_threadpool(render.b64_pngs, result.images):
                        event = completed(b64_json=b64, created_at=int(time.time()), size=size)
                        yield sse(event.type, event)
                elif isinstance(item, Failed):
                    info["error"] = item.status
                    yield sse("error", OpenAIStreamError(**openai_body(item.status, item.message)))
    finally:
        metrics.previews(job.spec.model, sent=rounds, dropped=buffer.dropped)


@router.get("/models", response_model=OpenAIModelList, dependencies=[Depends(require_key)], responses=ERRORS)
async def list_models(registry: RegistryDep) -> OpenAIModelList:
    """The models served, as OpenAI lists them (`client.models.list()`); details: GET /models."""
    return OpenAIModelList(data=[_model(n, registry) for n in registry.names() if registry.card(n) is not None])


@router.get("/models/{model}", response_model=OpenAIModel, dependencies=[Depends(require_key)], responses=ERRORS)
async def get_model(model: str, registry: RegistryDep) -> OpenAIModel:
    """One model (`client.models.retrieve(id)`)."""
    if model not in registry or registry.card(registry.resolve(model)) is None:
        raise HTTPException(404, {"message": f"The model '{model}' does not exist", "param": "model",
                                  "code": "model_not_found"})
    return _model(registry.resolve(model), registry)


def _model(name: str, registry: ModelRegistry) -> OpenAIModel:
    entry = registry.entry(name)
    saved = entry.provenance.get("date")
    try:
        created = int(_dt.datetime.fromisoformat(str(saved)).timestamp()) if saved else 0
    except ValueError:
        created = 0
    card = entry.card
    return OpenAIModel(id=name, created=created, size=image_size(card.image_shape), image_shape=list(card.image_shape),
                       sample_shape=list(card.sample_shape), resizable=card.resizable,
                       text_encoders=list(card.text_encoders), default_scheduler=card.default_scheduler,
                       default_steps=card.default_steps, default_guidance_scale=card.default_guidance + 1,
                       conditioning=card.conditioning, parameters=card.parameters, source=card.source)
