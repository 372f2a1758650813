"""The conditioned ε-model: a U-Net plus its class and/or text conditioning, described by one typed
config that the checkpoint stores.

The conditioning vector c (added to the time embedding inside the U-Net) is
    c = class_embed[label] + text_proj(text_encoder(prompt))
with the extra class label ``num_classes`` and the empty prompt "" as the null (unconditional)
condition of classifier-free guidance. It implements the model interface of
:mod:`diffusion.models.card` (``card``, ``encode``, ``null_condition``, ``token_count``; it denoises
pixels, so its sample-space hooks are identities).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from diffusion.models.card import Condition, ModelCard, PixelSpace, conditioning_name, to_device
from diffusion.models.text import TextEncoder, TextEncoderConfig
from diffusion.models.unet import UNet, UNetConfig, unet_preset
from diffusion.prediction import PREDICTION_TYPES
from diffusion.schedules import SCHEDULE_KINDS, make_schedule


@dataclass(frozen=True)
class ModelConfig:
    image_shape: tuple[int, int, int]
    unet: UNetConfig
    size: str = "custom"
    num_classes: int = 0  # size of the class embedding (+1 null label); 0: not class-conditional
    class_names: tuple[str, ...] = ()  # the dataset's classes (also kept by text models, for prompts)
    text: TextEncoderConfig | None = None  # None: not text-conditional
    schedule: str = "linear"
    num_timesteps: int = 1000
    prediction: str = "epsilon"
    default_steps: int = 50
    default_guidance: float = 2.0
    default_clip: str = "none"  # x̂0 thresholding a request gets when it names none

    @property
    def conditioning(self) -> str:
        return conditioning_name(self.num_classes > 0, self.text is not None)

    def validate(self) -> None:
        c, h, w = self.image_shape
        if c not in (1, 3) or h < 8 or w < 8:
            raise ValueError(f"image_shape must be (1|3, H>=8, W>=8), got {self.image_shape}")
        if self.unet.in_channels != c:
            raise ValueError(f"unet.in_channels {self.unet.in_channels} != image channels {c}")
        if self.num_classes < 0 or (self.num_classes and len(self.class_names) != self.num_classes):
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.schedule not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule {self.schedule!r}")
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction!r}")
        if not 1 <= self.default_steps <= self.num_timesteps:
            raise ValueError(f"default_steps must be in [1, {self.num_timesteps}]")
        if self.default_clip not in ("none", "static", "dynamic"):
            raise ValueError(f"default_clip must be none, static or dynamic, got {self.default_clip!r}")
        if self.text is not None:
            self.text.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        unet = d.pop("unet")
        text = d.pop("text", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        unet_cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in unet.items()})
        text_cfg = TextEncoderConfig(**text) if text is not None else None
        d["image_shape"] = tuple(d["image_shape"])
        d["class_names"] = tuple(d.get("class_names", ()))
        cfg = cls(unet=unet_cfg, text=text_cfg, **d)
        cfg.validate()
        return cfg


def model_config(size: str, image_shape: tuple[int, int, int], *, num_classes: int = 0,
                 class_names: tuple[str, ...] = (), text: TextEncoderConfig | None = None,
                 schedule: str = "linear", num_timesteps: int = 1000, **kw) -> ModelConfig:
    """A config from a named size ("tiny", "small", "large") for an image shape."""
    cfg = ModelConfig(image_shape=tuple(image_shape), unet=unet_preset(size, tuple(image_shape)), size=size,
                      num_classes=num_classes, class_names=tuple(class_names), text=text,
                      schedule=schedule, num_timesteps=num_timesteps, **kw)
    cfg.validate()
    return cfg


class DiffusionModel(PixelSpace, nn.Module):
    """forward(x, t, cond) -> raw network output; ``cond`` is the vector from :meth:`condition`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.unet = UNet(cfg.unet)
        emb = cfg.unet.emb_dim
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb) if cfg.num_classes > 0 else None
        if cfg.text is not None:
            self.text_encoder = TextEncoder(cfg.text)
            self.text_proj = nn.Linear(self.text_encoder.embed_dim, emb)
        else:
            self.text_encoder = None
            self.text_proj = None

    @property
    def null_label(self) -> int:
        return self.cfg.num_classes

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Pooled text embeddings [B, D] (text models only); the token ids reach the device without
        blocking the host."""
        if self.text_encoder is None:
            raise ValueError("this model is not text-conditional")
        return self.text_encoder(to_device(self.text_encoder.tokenize(prompts), self.unet.stem.weight.device))

    def condition(self, labels: torch.Tensor | None = None, text_emb: torch.Tensor | None = None,
                  batch: int | None = None) -> torch.Tensor | None:
        """The conditioning vector [B, emb_dim]; a missing part takes its null value. None for an
        unconditional model."""
        if self.class_embed is None and self.text_proj is None:
            return None
        device = self.unet.stem.weight.device
        if batch is None:
            batch = len(labels) if labels is not None else len(text_emb)
        c = torch.zeros(batch, self.cfg.unet.emb_dim, device=device)
        if self.class_embed is not None:
            if labels is None:
                labels = torch.full((batch,), self.null_label, device=device, dtype=torch.long)
            c = c + self.class_embed(labels.to(device))
        if self.text_proj is not None:
            if text_emb is None:
                text_emb = self.encode_prompts([""]).expand(batch, -1)
            c = c + self.text_proj(text_emb.to(device))
        return c

    def null_condition(self) -> torch.Tensor | None:
        """The unconditional branch's vector [1, emb_dim] (null label and empty prompt)."""
        return self.condition(batch=1)

    # --- the model interface (diffusion.models.card) ------------------------------------------
    @functools.cached_property
    def card(self) -> ModelCard:
        cfg, conditional = self.cfg, self.cfg.num_classes > 0 or self.cfg.text is not None
        return ModelCard(
            image_shape=tuple(cfg.image_shape), schedule=make_schedule(cfg.schedule, cfg.num_timesteps),
            prediction=cfg.prediction, class_names=tuple(cfg.class_names), class_conditional=cfg.num_classes > 0,
            text_conditional=cfg.text is not None, cond_dim=cfg.unet.emb_dim if conditional else None,
            guidable=conditional,
            max_prompt_tokens=self.text_encoder.context_length - 2 if self.text_encoder is not None else None,
            default_steps=cfg.default_steps, default_guidance=cfg.default_guidance, default_clip=cfg.default_clip,
            parameters=count_parameters(self), architecture=f"unet-{cfg.size}", source="diffusion-serve checkpoint")

    def token_count(self, prompt: str) -> int:
        if self.text_encoder is None:
            raise ValueError("this model is not text-conditional")
        return self.text_encoder.token_count(prompt)

    def encode(self, conditions: list[Condition]) -> torch.Tensor | None:
        """The conditioning vectors [N, emb_dim] of resolved conditions, in one batch: one text-encoder
        pass for all their prompts (a missing label or prompt takes its null value). None for an
        unconditional model."""
        if self.class_embed is None and self.text_proj is None:
            return None
        device, n = self.unet.stem.weight.device, len(conditions)
        labels = text = None
        if self.class_embed is not None:
            labels = to_device(torch.tensor([self.null_label if c.label is None else c.label for c in conditions]),
                               device)
        if self.text_encoder is not None:
            text = self.encode_prompts(["" if c.prompt is None else c.prompt for c in conditions])
        return self.condition(labels=labels, text_emb=text, batch=n)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, cond)

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights that go into a checkpoint: everything but a frozen pretrained text encoder."""
        sd = self.state_dict()
        if self.text_encoder is not None and self.text_encoder.frozen:
            sd = {k: v for k, v in sd.items() if not k.startswith("text_encoder.")}
        return sd


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
