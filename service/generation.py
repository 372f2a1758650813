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

from diffusion import SAMPLERS, ConditionError, Pipeline, edits
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


class UnknownModel(LookupError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown model {name!r}; available: {', '.join(known)}")


def model_name(req: GenerateRequest, registry: ModelRegistry) -> str:
    name = req.model if req.model is not None else registry.default
    if name not in registry:
        raise UnknownModel(name, registry.names())
    return name


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
    max_steps = min(settings.max_steps, card.num_timesteps)
    steps = req.steps if req.steps is not None else min(card.default_steps, max_steps)
    if req.guidance is not None and req.guidance > settings.max_guidance:
        errors.append(("guidance", f"must be at most {settings.max_guidance:g}", "less_than_equal"))
    else:
        try:
            pipe.check_guidance(req.guidance if req.guidance is not None else card.default_guidance)
        except ConditionError as e:
            errors.append(("guidance", str(e), "value_error"))
    errors += _preview_errors(req, stream, settings.min_preview_every)
    if req.num_images > settings.max_images:
        errors.append(("num_images", f"must be at most {settings.max_images}", "less_than_equal"))
    if req.eta is not None and req.scheduler != "ddim":
        errors.append(("eta", f"applies to the ddim scheduler only, not {req.scheduler!r}", "value_error"))
    if req.prompt is not None and len(req.prompt) > settings.max_prompt_chars:
        errors.append(("prompt", f"is {len(req.prompt)} characters; at most {settings.max_prompt_chars}",
                       "string_too_long"))
    else:
        try:
            condition = pipe.resolve(req.prompt, req.class_label)
        except ConditionError as e:
            errors.append(("prompt" if req.prompt is not None else "class_label", str(e), "value_error"))
    edit, edit_errors = _edit(req, pipe, settings, given, alpha_mask)
    errors += edit_errors
    evaluations = 0
    if steps > max_steps:
        errors.append(("steps", f"must be at most {max_steps} for model {name!r}", "less_than_equal"))
    elif not edit_errors:
        evaluations, plan_errors = _plan(req, pipe, steps, edit, settings.max_steps)
        errors += plan_errors
    if errors:
        raise FieldErrors(errors)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    points = preview_points(evaluations, req.preview_every, req.preview_at, settings.min_preview_every) \
        if stream else frozenset()
    spec = GenerationSpec(
        model=name, condition=condition, scheduler=req.scheduler, steps=steps,
        guidance=0.0 if condition.unconditional else float(req.guidance if req.guidance is not None
                                                           else card.default_guidance),
        seeds=tuple(seed + k for k in range(req.num_images)), eta=float(req.eta or 0.0),
        clip=req.clip or card.default_clip,
        percentile=float(req.percentile), spacing=req.spacing,
        preview_every=math.gcd(*points),  # the engine previews at every multiple; the stream keeps the points
        kind=kind or ("edit" if edit["image"] is not None else "generation"), **edit)
    return Prepared(spec, points)


async def prepare_async(req: GenerateRequest, registry: ModelRegistry, settings: Settings, stream: bool = False,
                        given: dict[str, bytes] | None = None, kind: str | None = None,
                        alpha_mask: bool = False) -> Prepared:
    """:func:`prepare`, in the thread pool when there is an image to decode or convert."""
    if req.image is None and req.mask is None and not given:
        return prepare(req, registry, settings, stream, given, kind, alpha_mask)
    return await run_in_threadpool(prepare, req, registry, settings, stream, given, kind, alpha_mask)


def _decoded(req: GenerateRequest, settings: Settings, given: dict[str, bytes] | None,
             errors: list) -> dict[str, Image.Image]:
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
    return out


def _edit(req: GenerateRequest, pipe: Pipeline, settings: Settings, given: dict[str, bytes] | None,
          alpha_mask: bool) -> tuple[dict, list[tuple[str, str, str]]]:
    """The edit's arguments (GenerationSpec's image, mask, strength, jump_length, jump_n_sample) and
    the errors found on the way."""
    errors: list[tuple[str, str, str]] = []
    decoded = _decoded(req, settings, given, errors)
    image, mask = decoded.get("image"), decoded.get("mask")
    if alpha_mask and mask is None and image is not None and has_alpha(image) and \
            bool((np.asarray(image.convert("RGBA"))[..., 3] == 0).any()):
        decoded["mask"] = mask = image  # its transparent pixels are the ones to repaint (mask_tensor's rule)
    repaint = req.jump_length is not None or req.jump_n_sample is not None
    if image is None and not errors:
        for field in ("mask", "strength", "jump_length", "jump_n_sample"):
            if (mask if field == "mask" else getattr(req, field)) is not None:
                errors.append((field, "applies to edits only: give the image too", "value_error"))
    if repaint and "mask" not in decoded and image is not None:
        errors.append(("jump_length" if req.jump_length is not None else "jump_n_sample",
                       "RePaint's resampling applies to inpainting only: give a mask too", "value_error"))
    if image is not None and mask is not None and image.size != mask.size:
        errors.append(("mask", f"is {mask.size[0]}x{mask.size[1]}; the image is {image.size[0]}x{image.size[1]}",
                       "value_error"))
    if errors or image is None:
        return {"image": None, "mask": None, "strength": 1.0, "jump_length": 0, "jump_n_sample": 1}, errors
    card = pipe.card
    strength = req.strength if req.strength is not None else 1.0 if mask is not None else settings.variation_strength
    return {"image": image_tensor(image, card.image_shape),
            "mask": None if mask is None else mask_tensor(mask, card.image_shape[1:]), "strength": float(strength),
            "jump_length": req.jump_length or 0, "jump_n_sample": req.jump_n_sample or 1}, errors


def _plan(req: GenerateRequest, pipe: Pipeline, steps: int, edit: dict,
          max_plan: int) -> tuple[int, list[tuple[str, str, str]]]:
    """(model evaluations per image, errors) of the request's plan."""
    try:
        plan = pipe.plan(req.scheduler, steps, req.spacing, edit["strength"], edit["jump_length"],
                         edit["jump_n_sample"])
    except ValueError as e:
        field = "jump_length" if "RePaint" in str(e) else "spacing" if req.spacing else "steps"
        return 0, [(field, str(e), "value_error")]
    if len(plan) > max_plan:
        return 0, [("jump_n_sample", f"RePaint's plan visits {len(plan)} timesteps; at most {max_plan} "
                    "(the service's max_steps)", "less_than_equal")]
    return edits.evaluations(SAMPLERS[req.scheduler], plan), []


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


def describe(name: str, pipe: Pipeline, default: bool) -> ModelInfo:
    card = pipe.card
    c, h, w = card.image_shape
    return ModelInfo(
        name=name, default=default, conditioning=card.conditioning, guidance=card.guidable,
        class_names=list(card.class_names), image_shape=[c, h, w], size=f"{w}x{h}", parameters=card.parameters,
        architecture=card.architecture, source=card.source, schedule=card.schedule.kind,
        num_timesteps=card.num_timesteps, prediction=card.prediction, default_steps=card.default_steps,
        default_guidance=card.default_guidance, default_clip=card.default_clip,
        max_prompt_tokens=card.max_prompt_tokens, schedulers=list(SAMPLERS))
