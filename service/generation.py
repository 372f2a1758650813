"""From a parsed request to the engine's :class:`GenerationSpec`: every check that needs the model
or the settings, each failure naming its field. Also the model descriptions of GET /models.

An edit's image and mask are decoded here (:mod:`service.images`), so a request that carries one is
prepared off the event loop (:func:`prepare_async`)."""

from __future__ import annotations

import math
import secrets
from typing import NamedTuple

import numpy as np
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from diffusion import SAMPLERS, ConditionError, ModelCard, Pipeline, edits
from diffusion.imaging import has_alpha, image_tensor, mask_tensor

from service import images
from service.engine import GenerationSpec
from service.registry import ModelRegistry
from service.schemas import GenerateRequest, ModelInfo
from service.settings import Settings


class FieldErrors(ValueError):
    """One or more invalid fields: [(field, message, type)]."""

    def __init__(self, errors: list[tuple[str, str, str]]):
        super().__init__("; ".join(f"{f}: {m}" for f, m, _ in errors))
        self.errors = errors


def model_name(req: GenerateRequest, registry: ModelRegistry) -> str:
    """The model a request names (its alias resolved), or the default; UnknownModel."""
    return registry.resolve(req.model)


class Prepared(NamedTuple):
    spec: GenerationSpec
    previews: frozenset[int]  # the model evaluations (done counts) whose previews a stream sends


def preview_points(total: int, every: int | None, fractions: list[float] | None, minimum: int) -> frozenset[int]:
    """When to preview a request of ``total`` model evaluations: every ``every``, or at ``fractions`` of
    the work rounded to multiples of ``minimum``; never at the end (the result itself comes then)."""
    if every:
        points = range(every, total, every)
    else:
        points = (max(minimum, int(f * total / minimum + 0.5) * minimum) for f in fractions or ())
    return frozenset(p for p in points if p < total)


def prepare(req: GenerateRequest, registry: ModelRegistry, settings: Settings, stream: bool = False,
            given: dict[str, bytes] | None = None, kind: str | None = None, alpha_mask: bool = False) -> Prepared:
    """Validate ``req`` against its model and the service limits; raise FieldErrors, UnknownModel or
    images.TooLarge. ``given``: an edit's image (and mask) file bytes (the OpenAI endpoints read them
    from multipart files); else they come from the request's base64 fields. ``alpha_mask``: without a
    mask, an image's transparent pixels (alpha = 0) are the ones to repaint (OpenAI's edits)."""
    name = model_name(req, registry)
    pipe = registry[name]
    card = pipe.card
    errors: list[tuple[str, str, str]] = []
    scheduler = req.scheduler or card.default_scheduler
    max_steps = min(settings.max_steps, card.num_timesteps)
    steps = req.steps if req.steps is not None else min(card.default_steps, max_steps)
    guidance, guidance_errors = _guidance(req, pipe, settings)
    errors += guidance_errors
    errors += _preview_errors(req, stream, settings.min_preview_every)
    if req.timeout_s is not None and req.bulk:
        errors.append(("bulk", "a bulk request has no deadline: leave timeout_s out", "value_error"))
    elif req.timeout_s is not None and req.timeout_s > settings.max_timeout_s:
        errors.append(("timeout_s", f"must be at most {settings.max_timeout_s:g} (the service's max_timeout_s)",
                       "less_than_equal"))
    if req.num_images > settings.max_images:
        errors.append(("num_images", f"must be at most {settings.max_images}", "less_than_equal"))
    if req.eta is not None and scheduler != "ddim":
        errors.append(("eta", f"applies to the ddim scheduler only, not {scheduler!r}", "value_error"))
    condition = negative = None
    for field in ("prompt", "negative_prompt"):
        text = getattr(req, field)
        if text is not None and len(text) > settings.max_prompt_chars:
            errors.append((field, f"is {len(text)} characters; at most {settings.max_prompt_chars}", "string_too_long"))
    try:
        condition = pipe.resolve(req.prompt, req.class_label)
    except ConditionError as e:
        errors.append(("prompt" if req.prompt is not None else "class_label", str(e), "value_error"))
    try:
        negative = pipe.negative(req.negative_prompt)
    except ConditionError as e:
        errors.append(("negative_prompt", str(e), "value_error"))
    edit: dict = {}
    decoded, edit_errors = _decoded(req, settings, given, alpha_mask)
    size, size_errors = _size(req, card, settings, decoded.get("image"))
    edit_errors += size_errors
    if not edit_errors:
        edit, more = _edit(req, card, settings, decoded, size)
        edit_errors += more
    errors += edit_errors
    evaluations = 0
    if steps > max_steps:
        errors.append(("steps", f"must be at most {max_steps} for model {name!r}", "less_than_equal"))
    elif not edit_errors:
        evaluations, plan_errors = _plan(req, pipe, scheduler, steps, edit, settings.max_steps)
        errors += plan_errors
    if errors:
        raise FieldErrors(errors)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    points = preview_points(evaluations, req.preview_every, req.preview_at, settings.min_preview_every) \
        if stream else frozenset()
    w = guidance if guidance is not None else card.default_guidance
    spec = GenerationSpec(
        model=name, condition=condition, scheduler=scheduler, steps=steps,
        guidance=0.0 if condition.unconditional and negative is None and card.null_prompt == "" else float(w),
        seeds=tuple(seed + k for k in range(req.num_images)), eta=float(req.eta or 0.0),
        clip=req.clip or card.default_clip,
        percentile=float(req.percentile), spacing=req.spacing,
        preview_every=math.gcd(*points),  # the engine previews at every multiple; the stream keeps the points
        kind=kind or ("edit" if edit["image"] is not None else "generation"), negative=negative, size=size,
        shape=card.sample_shape_for(*size), preview_decode=req.preview_decode,
        timeout_s=None if req.bulk else float(req.timeout_s or settings.request_timeout_s), **edit)
    return Prepared(spec, points)


def _guidance(req: GenerateRequest, pipe: Pipeline, settings: Settings) -> tuple[float | None, list]:
    """(w asked for, or None for the model's default; errors): ``guidance`` is w, ``guidance_scale`` s = w + 1."""
    if req.guidance is not None and req.guidance_scale is not None:
        return None, [("guidance_scale", "give guidance (w) or guidance_scale (s = w + 1), not both", "value_error")]
    field = "guidance_scale" if req.guidance_scale is not None else "guidance"
    w = req.guidance if req.guidance is not None else None if req.guidance_scale is None else req.guidance_scale - 1
    if w is not None and w > settings.max_guidance:
        bound = settings.max_guidance + (field == "guidance_scale")
        return None, [(field, f"must be at most {bound:g}", "less_than_equal")]
    try:
        pipe.check_guidance(w if w is not None else pipe.card.default_guidance)
    except ConditionError as e:
        return None, [(field, str(e), "value_error")]
    return w, []


def _size(req: GenerateRequest, card, settings: Settings, image: Image.Image | None
          ) -> tuple[tuple[int, int], list[tuple[str, str, str]]]:
    """The (height, width) of the request's images: width/height when given; else an edit of a
    resizable model's image at the image's own size (scaled down to max_size, rounded down to
    multiples of the model's scale); else the model's native size."""
    _, h0, w0 = card.image_shape
    asked = req.width is not None or req.height is not None
    if asked:
        h, w = req.height or h0, req.width or w0
    elif image is not None and card.resizable:
        iw, ih = image.size
        shrink = min(1.0, settings.max_size / max(iw, ih))
        h = max(card.scale, int(ih * shrink) // card.scale * card.scale)
        w = max(card.scale, int(iw * shrink) // card.scale * card.scale)
    else:
        h, w = h0, w0
    errors = []
    if (h, w) != (h0, w0):
        if not card.resizable:
            errors.append(("width" if req.width is not None else "height", f"this model makes {w0}x{h0} images only",
                           "value_error"))
        for field, v in (("width", w), ("height", h)):
            if card.resizable and v % card.scale:
                errors.append((field, f"must be a multiple of {card.scale}, got {v}", "multiple_of"))
            elif card.resizable and v > settings.max_size:
                errors.append((field, f"must be at most {settings.max_size} (the service's max_size)",
                               "less_than_equal"))
    if asked and image is not None and card.resizable and not errors and image.size != (w, h):
        errors.append(("image", f"is {image.size[0]}x{image.size[1]}; the request asks for {w}x{h} (leave width and "
                       "height out to edit at the image's own size)", "value_error"))
    return (h, w), errors


async def prepare_async(req: GenerateRequest, registry: ModelRegistry, settings: Settings, stream: bool = False,
                        given: dict[str, bytes] | None = None, kind: str | None = None,
                        alpha_mask: bool = False) -> Prepared:
    """:func:`prepare`, in the thread pool when there is an image to decode or convert."""
    if req.image is None and req.mask is None and not given:
        return prepare(req, registry, settings, stream, given, kind, alpha_mask)
    return await run_in_threadpool(prepare, req, registry, settings, stream, given, kind, alpha_mask)


def _decoded(req: GenerateRequest, settings: Settings, given: dict[str, bytes] | None,
             alpha_mask: bool) -> tuple[dict[str, Image.Image], list[tuple[str, str, str]]]:
    """An edit's image and mask, decoded (and OpenAI's alpha-as-mask rule applied), and the errors."""
    errors: list[tuple[str, str, str]] = []
    out = {}
    for field in ("image", "mask"):
        text = getattr(req, field)
        data = (given or {}).get(field)
        if text is None and data is None:
            continue
        try:
            if data is None:
                data = images.from_base64(text, field, settings.max_image_bytes)
            out[field] = images.decode(data, field, settings.max_image_bytes, settings.max_image_pixels)
        except images.BadImage as e:
            errors.append((field, e.message, "value_error"))
    image, mask = out.get("image"), out.get("mask")
    if alpha_mask and mask is None and image is not None and has_alpha(image) and \
            bool((np.asarray(image.convert("RGBA"))[..., 3] == 0).any()):
        out["mask"] = image  # its transparent pixels are the ones to repaint (mask_tensor's rule)
    return out, errors


def _edit(req: GenerateRequest, card, settings: Settings, decoded: dict[str, Image.Image],
          size: tuple[int, int]) -> tuple[dict, list[tuple[str, str, str]]]:
    """The edit's arguments (GenerationSpec's image, mask, strength, jump_length, jump_n_sample; the
    image and mask converted to ``size`` in image space) and the errors found on the way."""
    errors: list[tuple[str, str, str]] = []
    image, mask = decoded.get("image"), decoded.get("mask")
    repaint = req.jump_length is not None or req.jump_n_sample is not None
    if image is None:
        for field in ("mask", "strength", "jump_length", "jump_n_sample"):
            if (mask if field == "mask" else getattr(req, field)) is not None:
                errors.append((field, "applies to edits only: give the image too", "value_error"))
    if repaint and mask is None and image is not None:
        errors.append(("jump_length" if req.jump_length is not None else "jump_n_sample",
                       "RePaint's resampling applies to inpainting only: give a mask too", "value_error"))
    if image is not None and mask is not None and image.size != mask.size:
        errors.append(("mask", f"is {mask.size[0]}x{mask.size[1]}; the image is {image.size[0]}x{image.size[1]}",
                       "value_error"))
    if errors or image is None:
        return {"image": None, "mask": None, "strength": 1.0, "jump_length": 0, "jump_n_sample": 1}, errors
    strength = req.strength if req.strength is not None else 1.0 if mask is not None else settings.variation_strength
    return {"image": image_tensor(image, (card.image_shape[0], *size)),
            "mask": None if mask is None else mask_tensor(mask, size), "strength": float(strength),
            "jump_length": req.jump_length or 0, "jump_n_sample": req.jump_n_sample or 1}, errors


def _plan(req: GenerateRequest, pipe: Pipeline, scheduler: str, steps: int, edit: dict,
          max_plan: int) -> tuple[int, list[tuple[str, str, str]]]:
    """(model evaluations per image, errors) of the request's plan."""
    try:
        plan = pipe.plan(scheduler, steps, req.spacing, edit["strength"], edit["jump_length"],
                         edit["jump_n_sample"])
    except ValueError as e:
        field = "jump_length" if "RePaint" in str(e) else "spacing" if req.spacing else "steps"
        return 0, [(field, str(e), "value_error")]
    if len(plan) > max_plan:
        return 0, [("jump_n_sample", f"RePaint's plan visits {len(plan)} timesteps; at most {max_plan} "
                    "(the service's max_steps)", "less_than_equal")]
    return edits.evaluations(SAMPLERS[scheduler], plan), []


def _preview_errors(req: GenerateRequest, stream: bool, minimum: int) -> list[tuple[str, str, str]]:
    asked = [f for f in ("preview_every", "preview_at") if getattr(req, f) is not None]
    if asked and not stream:
        return [(f, "applies to streamed requests only (\"stream\": true or Accept: text/event-stream)",
                 "value_error") for f in asked]
    if len(asked) == 2:
        return [("preview_at", "give preview_every or preview_at, not both", "value_error")]
    if req.preview_every is not None and req.preview_every < minimum:
        return [("preview_every", f"must be at least {minimum} model evaluations (the service's "
                 "min_preview_every)", "greater_than_equal")]
    return []


def describe(name: str, card: ModelCard, default: bool, settings: Settings | None = None, state: str = "resident",
             error: str | None = None) -> ModelInfo:
    c, h, w = card.image_shape
    bound = settings.max_size if settings is not None else None
    sizes = f"multiples of {card.scale}" + (f" up to {bound}" if bound else "") if card.resizable else "native only"
    return ModelInfo(
        name=name, default=default, conditioning=card.conditioning, guidance=card.guidable,
        class_names=list(card.class_names), image_shape=[c, h, w], sample_shape=list(card.sample_shape),
        size=f"{w}x{h}", sizes=sizes, size_multiple=card.scale if card.resizable else None,
        max_size=bound if card.resizable else None, text_encoders=list(card.text_encoders),
        negative_prompt=card.negative_prompts,
        parameters=card.parameters, architecture=card.architecture, source=card.source, schedule=card.schedule.kind,
        num_timesteps=card.num_timesteps, prediction=card.prediction, default_scheduler=card.default_scheduler,
        default_steps=card.default_steps, default_guidance=card.default_guidance,
        default_guidance_scale=card.default_guidance + 1, default_clip=card.default_clip,
        max_prompt_tokens=card.max_prompt_tokens, schedulers=list(SAMPLERS), state=state, error=error)
