"""The model seam: what the pipeline, the runner and the service need of a model, whatever its format.

A model is anything with

- ``card``: a :class:`ModelCard`, the facts about it (the image shape the API speaks and the sample
  shape the engine iterates, the β-schedule it was trained with, prediction type, conditioning and
  class names, defaults, size, where it came from);
- ``forward(x, t, cond)``: the raw network output for samples ``x`` [B, *sample_shape] at integer
  timesteps ``t`` [B] under per-row conditioning vectors ``cond`` [B, D] (None when unconditional);
- ``encode(conditions)``: the vectors [N, D] of resolved :class:`Condition` s, in one batch (None when
  unconditional), and ``null_condition()``: the null vector [1, D] of classifier-free guidance (None
  when the model has none);
- ``token_count(prompt)``: text models only, the prompt's length in the model's tokens;
- the sample space's hooks, identities for a pixel-space model: ``decode(z)`` (samples to images in
  [-1, 1]), ``encode_image(x)`` (images to samples, for edits), ``preview(z)`` (a cheap approximate
  decode, for previews) and ``sample_mask(mask)`` (an image-sized repaint mask at sample resolution);
- and the ``nn.Module`` methods ``to``, ``eval``, ``requires_grad_``, ``parameters``.

The conditioning vector is **packed**: whatever a model is conditioned on (a class index, a pooled
text embedding, a [77, D] token sequence and SDXL's pooled embedding) is one flat vector per row,
laid out and unpacked by the model itself. The rows' table, guidance (conditional and null halves of
one forward pass), CUDA graphs and compilation then see one fixed-shape [B, D] tensor for every model,
and whatever a later per-row input needs (an adapter's index and scale) is more entries of it.

This project's :class:`~diffusion.models.model.DiffusionModel` implements it, and so do the diffusers
adapters (:mod:`diffusion.models.diffusers_unet`, pixel space; :mod:`diffusion.models.latent`,
Stable Diffusion's latent space); the loader picks by format (:func:`diffusion.loading.load_model`),
and nothing downstream asks which one it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from diffusion.guidance import CLIP_MODES
from diffusion.prediction import PREDICTION_TYPES
from diffusion.samplers import SAMPLERS
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
    image_shape: tuple[int, int, int]  # (channels, height, width) of the images the API speaks, native size
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
    # What the engine iterates: samples of sample_shape (default: the image itself); an image of H×W
    # pixels is a sample of (H/scale)×(W/scale) cells (Stable Diffusion's latents: 4 channels, scale 8).
    sample_shape: tuple[int, int, int] | None = None
    scale: int = 1
    resizable: bool = False  # other sizes than the native one per request (multiples of `scale`)
    default_scheduler: str = "ddim"
    text_encoders: tuple[str, ...] = ()  # text models: what encodes a prompt (for GET /models)
    null_prompt: str = ""  # "": the empty prompt's encoding; "zeros": a zero vector (SDXL's force_zeros_for_empty_prompt)

    def __post_init__(self):
        c, h, w = self.image_shape
        if c not in (1, 3) or h < 1 or w < 1:
            raise ValueError(f"image_shape must be (1|3, H, W), got {self.image_shape}")
        if self.scale < 1 or h % self.scale or w % self.scale:
            raise ValueError(f"scale {self.scale} must divide the image size {h}x{w}")
        if self.sample_shape is None:
            object.__setattr__(self, "sample_shape", (c, h // self.scale, w // self.scale))
        object.__setattr__(self, "sample_shape", tuple(int(v) for v in self.sample_shape))
        if self.sample_shape[1:] != (h // self.scale, w // self.scale):
            raise ValueError(f"sample_shape {self.sample_shape} is not the image {h}x{w} at scale {self.scale}")
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction!r}")
        if self.default_clip not in CLIP_MODES:
            raise ValueError(f"default_clip must be one of {CLIP_MODES}, got {self.default_clip!r}")
        if self.default_scheduler not in SAMPLERS:
            raise ValueError(f"default_scheduler must be one of {', '.join(SAMPLERS)}, got {self.default_scheduler!r}")
        if self.null_prompt not in ("", "zeros"):
            raise ValueError(f"null_prompt must be '' or 'zeros', got {self.null_prompt!r}")
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

    @property
    def negative_prompts(self) -> bool:
        """A request may give a negative prompt: it replaces the null condition of its guided rows."""
        return self.text_conditional and self.guidable

    def sample_shape_for(self, height: int, width: int) -> tuple[int, int, int]:
        """The sample shape of an image of ``height`` × ``width`` pixels (ValueError when this model
        cannot make that size)."""
        if (height, width) == tuple(self.image_shape[1:]):
            return self.sample_shape
        if not self.resizable:
            raise ValueError(f"this model makes {self.image_shape[2]}x{self.image_shape[1]} images only")
        if height % self.scale or width % self.scale or height < self.scale or width < self.scale:
            raise ValueError(f"width and height must be positive multiples of {self.scale}, got {width}x{height}")
        return (self.sample_shape[0], height // self.scale, width // self.scale)


class Model(Protocol):
    """The model interface (see the module docstring)."""
    card: ModelCard

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor: ...

    def encode(self, conditions: list[Condition]) -> torch.Tensor | None: ...

    def null_condition(self) -> torch.Tensor | None: ...

    def token_count(self, prompt: str) -> int: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...

    def encode_image(self, x: torch.Tensor) -> torch.Tensor: ...

    def preview(self, z: torch.Tensor) -> torch.Tensor: ...

    def sample_mask(self, mask: torch.Tensor) -> torch.Tensor: ...


class PixelSpace:
    """The sample-space hooks of a model that denoises images themselves: every one is the identity."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def preview(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def sample_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host (a pinned, stream-ordered copy on CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
