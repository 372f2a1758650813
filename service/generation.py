"""From a parsed request to the engine's :class:`GenerationSpec`: every check that needs the model
or the settings, each failure naming its field. Also the model descriptions of GET /models."""

from __future__ import annotations

import secrets

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


def prepare(req: GenerateRequest, registry: ModelRegistry, settings: Settings) -> GenerationSpec:
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
    return GenerationSpec(
        model=name, condition=condition, scheduler=req.scheduler, steps=steps,
        guidance=float(req.guidance if req.guidance is not None else cfg.default_guidance),
        seeds=tuple(seed + k for k in range(req.num_images)), eta=float(req.eta or 0.0),
        clip=req.clip or cfg.default_clip,
        percentile=float(req.percentile), spacing=req.spacing)


def describe(name: str, pipe: Pipeline, default: bool) -> ModelInfo:
    cfg = pipe.cfg
    enc = getattr(pipe.model, "text_encoder", None)
    return ModelInfo(
        name=name, default=default, conditioning=cfg.conditioning, class_names=list(cfg.class_names),
        image_shape=list(cfg.image_shape), schedule=cfg.schedule, num_timesteps=cfg.num_timesteps,
        prediction=cfg.prediction, default_steps=cfg.default_steps, default_guidance=cfg.default_guidance,
        default_clip=cfg.default_clip, max_prompt_tokens=enc.context_length - 2 if enc is not None else None, schedulers=list(SAMPLERS))
