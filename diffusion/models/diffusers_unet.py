"""A diffusers ``UNet2DModel`` behind this project's model interface (:mod:`diffusion.models.card`).

The network is diffusers' own module, unchanged; the adapter only maps the interface onto it:

- ``forward(x, t, cond)`` calls ``unet(x, t, class_labels=…)``; a class-conditional model's
  conditioning vector is its class index as one float (``cond[:, 0]``), so rows of different
  classes share one forward pass like every other conditioning, and the null class of classifier-free
  guidance is just another index. A network that also predicts its variance (``out_channels`` twice
  the image's, as guided-diffusion's "learned_range" models) contributes its first half, the mean's
  prediction; the samplers use their own (fixed) variances.
- the facts about it (:class:`ModelCard`) come from its configs (:mod:`diffusion.diffusers_format`).
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion.models.card import Condition, ModelCard, PixelSpace, to_device


class DiffusersUNet(PixelSpace, nn.Module):
    def __init__(self, unet: nn.Module, card: ModelCard, null_class: int | None = None):
        super().__init__()
        self.unet, self.card, self.null_class = unet, card, null_class
        self.channels = card.image_shape[0]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        labels = None if cond is None else cond[:, 0].round().long()
        out = self.unet(x, t, class_labels=labels, return_dict=False)[0]
        return out[:, :self.channels]

    def _device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode(self, conditions: list[Condition]) -> torch.Tensor | None:
        if not self.card.class_conditional:
            return None
        labels = [self.null_class if c.label is None else c.label for c in conditions]
        if any(label is None for label in labels):
            raise ValueError("this class-conditional model has no null class: a request must name a class")
        return to_device(torch.tensor([[float(label)] for label in labels]), self._device())

    def null_condition(self) -> torch.Tensor | None:
        if self.null_class is None:
            return None
        return torch.tensor([[float(self.null_class)]], device=self._device())

    def token_count(self, prompt: str) -> int:
        raise ValueError("a diffusers UNet2DModel takes no text")
