"""The model seam: what the pipeline, the runner and the service need of a model, whatever its format.

A model is anything with

- ``card``: a :class:`ModelCard`, the facts about it (image shape, the β-schedule it was trained
  with, prediction type, conditioning and class names, defaults, size, where it came from);
- ``forward(x, t, cond)``: the raw network output for images ``x`` [B, C, H, W] at integer
  timesteps ``t`` [B] under per-row conditioning vectors ``cond`` [B, D] (None when unconditional);
- ``cond_vector(condition)``: the vector [D] of one resolved :class:`Condition` (None when
  unconditional), and ``null_condition()``: the null vector [1, D] of classifier-free guidance (None
  when the model has none);
- ``token_count(prompt)``: text models only, the prompt's length in the model's tokens;
- and the ``nn.Module`` methods ``to``, ``eval``, ``requires_grad_``, ``parameters``.

This project's :class:`~diffusion.models.model.DiffusionModel` implements it, and so does the
diffusers adapter (:mod:`diffusion.models.diffusers_unet`); the loader picks by format
(:func:`diffusion.loading.load_model`), and nothing downstream asks which one it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from diffusion.guidance import CLIP_MODES
from diffusion.prediction import PREDICTION_TYPES
from diffusion.schedules import Schedule


def conditioning_name(classes: bool, text: bool) -> str:
    """"class", "text", "class+text" or "none"."""
    return "+".join(k for k, on in (("class", classes), ("text", text)) if on) or "none"


class ConditionError(ValueError):
    """A prompt or class label the model cannot use (unknown class, wrong kind, too long)."""


@dataclass(frozen=True)
class Condition:
    """A resolved request condition: what the model will actually be given."""
    label: int | None  # class index (class-conditional models)
    prompt: str | None  # text (text models)

    @property
    def unconditional(self) -> bool:
        """The null condition itself (no class, no prompt): guiding toward it changes nothing."""
        return self.label is None and not self.prompt


@dataclass(frozen=True, eq=False)
class ModelCard:
    """What serving needs to know of a model (see the module docstring)."""
    image_shape: tuple[int, int, int]  # (channels, height, width)
    schedule: Schedule = field(repr=False)  # the β-schedule the network was trained with
    prediction: str = "epsilon"  # what the network predicts: epsilon | v | sample (x0)
    class_names: tuple[str, ...] = ()  # class-conditional models (text models keep them for prompts)
    class_conditional: bool = False
    text_conditional: bool = False
    cond_dim: int | None = None  # length of a conditioning vector; None: unconditional
    guidable: bool = False  # has a null condition, so classifier-free guidance (w > 0) is possible
    max_prompt_tokens: int | None = None  # text models
    default_steps: int = 50
    default_guidance: float = 0.0
    default_clip: str = "none"  # x̂0 thresholding a request gets when it names none
    clip_range: float = 1.0  # static clipping clamps x̂0 to [-clip_range, clip_range]
    sampler_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # sampler -> options
    parameters: int = 0
    architecture: str = ""  # e.g. "unet-compact", "diffusers UNet2DModel"
    source: str = ""  # the format it was loaded from (see diffusion.loading)

    def __post_init__(self):
        c, h, w = self.image_shape
        if c not in (1, 3) or h < 1 or w < 1:
            raise ValueError(f"image_shape must be (1|3, H, W), got {self.image_shape}")
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction!r}")
        if self.default_clip not in CLIP_MODES:
            raise ValueError(f"default_clip must be one of {CLIP_MODES}, got {self.default_clip!r}")
        if not 1 <= self.default_steps <= self.num_timesteps:
            raise ValueError(f"default_steps must be in [1, {self.num_timesteps}], got {self.default_steps}")
        if (self.class_conditional or self.text_conditional) != (self.cond_dim is not None):
            raise ValueError("a conditional model needs cond_dim, an unconditional one none")
        if self.guidable and self.cond_dim is None:
            raise ValueError("an unconditional model has no null condition to guide against")
        if not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def conditioning(self) -> str:
        return conditioning_name(self.class_conditional, self.text_conditional)


class Model(Protocol):
    """The model interface (see the module docstring)."""
    card: ModelCard

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor: ...

    def cond_vector(self, condition: Condition) -> torch.Tensor | None: ...

    def null_condition(self) -> torch.Tensor | None: ...

    def token_count(self, prompt: str) -> int: ...
