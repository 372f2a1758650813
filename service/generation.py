"""From a parsed request to the engine's :class:`GenerationSpec`: every check that needs the model
or the settings, each failure naming its field. Also the model descriptions of GET /models."""

from __future__ import annotations

import math
import secrets
from typing import NamedTuple

from diffusion import SAMPLERS, ConditionError, Pipeline
from diffusion.schedules import sampling_timesteps

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


def prepare(req: GenerateRequest, registry: ModelRegistry, settings: Settings, stream: bool = False) -> Prepared:
    """Validate ``req`` against its model and the service limits; raise FieldErrors or UnknownModel."""
    name = model_name(req, registry)
    pipe = registry[name]
    cfg = pipe.cfg
    errors: list[tuple[str, str, str]] = []
    max_steps = min(settings.max_steps, cfg.num_timesteps)
    steps = req.steps if req.steps is not None else min(cfg.default_steps, max_steps)
    if steps > max_steps:
        errors.append(("steps", f"must be at most {max_steps} for model {name!r}", "less_than_equal"))
    else:
        try:
            sampling_timesteps(cfg.num_timesteps, steps, req.spacing or SAMPLERS[req.scheduler].default_spacing,
                               pipe.schedule)
        except ValueError as e:
            errors.append(("spacing" if req.spacing else "steps", str(e), "value_error"))
    if req.guidance is not None and req.guidance > settings.max_guidance:
        errors.append(("guidance", f"must be at most {settings.max_guidance:g}", "less_than_equal"))
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
    if errors:
        raise FieldErrors(errors)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    points = preview_points(SAMPLERS[req.scheduler].evaluations(steps), req.preview_every, req.preview_at,
                            settings.min_preview_every) if stream else frozenset()
    spec = GenerationSpec(
        model=name, condition=condition, scheduler=req.scheduler, steps=steps,
        guidance=float(req.guidance if req.guidance is not None else cfg.default_guidance),
        seeds=tuple(seed + k for k in range(req.num_images)), eta=float(req.eta or 0.0),
        clip=req.clip or cfg.default_clip,
        percentile=float(req.percentile), spacing=req.spacing,
        preview_every=math.gcd(*points))  # the engine previews at every multiple; the stream keeps the points
    return Prepared(spec, points)


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
    cfg = pipe.cfg
    enc = getattr(pipe.model, "text_encoder", None)
    return ModelInfo(
        name=name, default=default, conditioning=cfg.conditioning, class_names=list(cfg.class_names),
        image_shape=list(cfg.image_shape), schedule=cfg.schedule, num_timesteps=cfg.num_timesteps,
        prediction=cfg.prediction, default_steps=cfg.default_steps, default_guidance=cfg.default_guidance,
        default_clip=cfg.default_clip, max_prompt_tokens=enc.context_length - 2 if enc is not None else None, schedulers=list(SAMPLERS))
