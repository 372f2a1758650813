"""Text conditioning: prompts tokenised by open_clip and encoded by an open_clip text encoder.

Two kinds, chosen by :class:`TextEncoderConfig`:
- ``"tower"`` (the offline default): a small open_clip ``TextTransformer`` trained together with the
  U-Net. Its weights live in our checkpoint.
- ``"open_clip"``: a named open_clip architecture (``arch``, e.g. "ViT-B-32") with ``pretrained``
  weights (e.g. "laion2b_s34b_b79k"), frozen. Its weights come from open_clip (hub or a local file
  path as ``pretrained``), not from our checkpoint.

Either way the encoder maps a list of prompts to pooled embeddings [B, dim]. The empty prompt ""
is the unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TextEncoderConfig:
    kind: str = "tower"  # "tower" | "open_clip"
    arch: str | None = None  # open_clip model name for kind="open_clip"
    pretrained: str | None = None  # open_clip pretrained tag or local weights file
    context_length: int = 16
    width: int = 64
    heads: int = 4
    layers: int = 2
    output_dim: int = 64

    def validate(self) -> None:
        if self.kind not in ("tower", "open_clip"):
            raise ValueError(f"text encoder kind must be 'tower' or 'open_clip', got {self.kind!r}")
        if self.kind == "open_clip" and not self.arch:
            raise ValueError("a text encoder of kind 'open_clip' needs 'arch' (an open_clip model name)")
        if not 3 <= self.context_length <= 77:
            raise ValueError(f"context_length must be in [3, 77], got {self.context_length}")


def _require_open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - exercised only without the dependency
        raise RuntimeError("text conditioning needs open_clip: pip install open_clip_torch") from e
    return open_clip


class TextEncoder(nn.Module):
    """prompts -> pooled embedding [B, embed_dim]. ``tokenize`` is separate so callers can cache."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        open_clip = _require_open_clip()
        if cfg.kind == "tower":
            from open_clip.transformer import TextTransformer

            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)
            self.tower = TextTransformer(context_length=cfg.context_length, width=cfg.width, heads=cfg.heads,
                                         layers=cfg.layers, output_dim=cfg.output_dim)
            self.embed_dim = cfg.output_dim
            self.frozen = False
        else:
            model = open_clip.create_model(cfg.arch, pretrained=cfg.pretrained)
            self.tokenizer = open_clip.get_tokenizer(cfg.arch)
            model.visual = None  # only the text half is used
            self.clip = model.eval().requires_grad_(False)
            self.embed_dim = int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") \
                and model.text_projection is not None else int(model.transformer.width)
            self.frozen = True

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", self.cfg.context_length))

    def token_count(self, prompt: str) -> int:
        """How many BPE tokens a prompt needs, without the start/end tokens."""
        inner = getattr(self.tokenizer, "encode", None)
        return len(inner(prompt)) if inner is not None else len(prompt.split())

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return self.clip.encode_text(tokens).float()
        out = self.tower(tokens)
        return out[0] if isinstance(out, tuple) else out

    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        from diffusion.models.card import to_device

        tokens = self.tokenize(prompts)
        return self(tokens if device is None else to_device(tokens, device))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that belong in our checkpoint (none for a frozen pretrained encoder)."""
        return {} if self.frozen else {k: v for k, v in self.state_dict().items()}
