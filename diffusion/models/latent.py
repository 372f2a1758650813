"""A Stable Diffusion–family latent diffusion model behind this project's model interface
(:mod:`diffusion.models.card`): diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` and
transformers' CLIP text towers, unchanged; this adapter only maps the interface onto them.

- **Samples are latents**: the engine denoises [4, H/8, W/8] latents (``card.sample_shape``; the
  VAE's scale factor is read from its config); :meth:`decode` turns final latents into images with
  the VAE, z/scaling_factor (SDXL-style VAEs with ``latents_mean``/``latents_std``:
  z·std/scaling_factor + mean), exactly as diffusers' pipelines do; :meth:`encode_image` is the
  inverse, the mean of the VAE encoder's posterior (deterministic: an edit's latents do not depend on
  its seed).
- **Conditioning is one packed vector per row** (the module docstring of ``card`` says why): the
  prompt's token sequence [77, D] flattened, followed for SDXL by the pooled embedding [P] of the
  second text tower. :meth:`forward` unpacks it with a reshape and a slice (fixed shapes, no host
  synchronisation). SDXL's size conditioning (original size, crop, target size) is the default that
  diffusers' pipeline uses, (H, W, 0, 0, H, W), and is built from the batch's latent size inside
  :meth:`forward` by fills on the device (no host copy, so a CUDA graph may capture it).
- **Text encoding** follows diffusers: SD 1.x/2.x use the text tower's last hidden state (after its
  final layer norm); SDXL the penultimate hidden states of both towers, concatenated, and the second
  tower's projected pooled output. Prompts are tokenised with the folder's own tokenizer, padded to
  its 77 tokens; longer prompts are refused (:meth:`token_count`, checked before a request is
  accepted), never silently truncated. The null condition of guidance is the empty prompt's encoding,
  or zeros where the folder sets ``force_zeros_for_empty_prompt`` (SDXL), as diffusers does when no
  negative prompt is given.
- **Previews** (:meth:`preview`): a linear latent→RGB map (4×3 and a bias), fitted when the model
  is loaded against this VAE's own decoder on latents of smooth random images, applied at latent
  resolution and upsampled: a few hundred FLOPs per latent cell instead of the decoder's
  ~100 kFLOP per pixel.
- **Precision**: the weights are used in the dtype the loader chose (bf16 on a GPU, never fp32 there;
  float32 on the CPU); inputs are cast to it and outputs come back in float32.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.models.card import Condition, ModelCard, to_device


@dataclass(frozen=True)
class TextTower:
    """One text encoder and its tokenizer, and which of its outputs conditions the UNet.

    The tokenizer is called under a lock: a fast (Rust-backed) tokenizer keeps its padding and
    truncation settings on itself while it runs, so a prompt counted on a request's thread while the
    engine's thread pads a batch would be counted padded."""
    tokenizer: object  # a transformers CLIPTokenizer
    encoder: nn.Module  # CLIPTextModel or CLIPTextModelWithProjection
    penultimate: bool  # the hidden states before the last layer (SDXL) instead of the last hidden state
    pooled: bool  # also the projected pooled embedding (SDXL's second tower)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def tokens(self, prompts: list[str]) -> torch.Tensor:
        with self.lock:
            return self.tokenizer(prompts, padding="max_length", max_length=self.length, truncation=True,
                                  return_tensors="pt").input_ids

    def count(self, prompt: str) -> int:
        """Tokens of a prompt, without the start and end tokens."""
        with self.lock:
            return len(self.tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids)

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = None
        if getattr(self.encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        out = self.encoder(ids, attention_mask=mask, output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out[0]
        return hidden, (out.text_embeds if self.pooled else None)


class LatentDiffusion(nn.Module):
    def __init__(self, unet: nn.Module, vae: nn.Module, towers: list[TextTower], card: ModelCard,
                 scaling_factor: float, latents_mean: list[float] | None = None,
                 latents_std: list[float] | None = None, time_ids: bool = False):
        """``time_ids``: the UNet takes SDXL's pooled embedding and size conditioning."""
        super().__init__()
        self.unet, self.vae, self.card = unet, vae, card
        self.towers = towers
        self.encoders = nn.ModuleList(t.encoder for t in towers)  # so that .to() and .parameters() see them
        self.scaling_factor, self.time_ids = float(scaling_factor), time_ids
        c = card.sample_shape[0]
        shift = torch.zeros(1, c, 1, 1) if latents_mean is None else torch.tensor(latents_mean).view(1, c, 1, 1)
        spread = torch.ones(1, c, 1, 1) if latents_std is None else torch.tensor(latents_std).view(1, c, 1, 1)
        self.register_buffer("latents_mean", shift.float(), persistent=False)
        self.register_buffer("latents_std", spread.float(), persistent=False)
        self.register_buffer("rgb_map", torch.zeros(3, c + 1), persistent=False)  # fitted: fit_preview()
        self.seq_len = towers[0].length
        self.token_dim = sum(int(t.encoder.config.hidden_size) for t in towers)
        self.pooled_dim = sum(int(t.encoder.config.projection_dim) for t in towers if t.pooled)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # --- the network -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        b, dt = x.shape[0], self.dtype
        n = self.seq_len * self.token_dim
        tokens = cond[:, :n].reshape(b, self.seq_len, self.token_dim).to(dt)
        extra = {}
        if self.time_ids:
            h, w = x.shape[-2] * self.card.scale, x.shape[-1] * self.card.scale
            ids = torch.cat([x.new_full((b, 1), float(v), dtype=dt) for v in (h, w, 0, 0, h, w)], dim=1)
            extra["added_cond_kwargs"] = {"text_embeds": cond[:, n:n + self.pooled_dim].to(dt), "time_ids": ids}
        return self.unet(x.to(dt), t, encoder_hidden_states=tokens, return_dict=False, **extra)[0]

    # --- conditioning ----------------------------------------------------------------------------
    def token_count(self, prompt: str) -> int:
        """The prompt's length in tokens, without the start and end tokens (the longest over the towers)."""
        return max(t.count(prompt) for t in self.towers)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Packed vectors [N, D] of prompts, every tower in one batch; token ids reach the device
        without blocking the host."""
        device = self._device()
        hidden, pooled = [], []
        for tower in self.towers:
            h, p = tower(to_device(tower.tokens(prompts), device))
            hidden.append(h)
            if p is not None:
                pooled.append(p)
        parts = [torch.cat(hidden, dim=-1).flatten(1), *pooled]
        return torch.cat(parts, dim=1)

    def encode(self, conditions: list[Condition]) -> torch.Tensor:
        return self.encode_prompts(["" if c.prompt is None else c.prompt for c in conditions])

    @torch.no_grad()
    def null_condition(self) -> torch.Tensor:
        if self.card.null_prompt == "zeros":
            return torch.zeros(1, self.card.cond_dim, device=self._device(), dtype=self.dtype)
        return self.encode_prompts([""])

    # --- latents and images ------------------------------------------------------------------------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images [k, 3, H, W] in [-1, 1] (unclipped) of latents [k, 4, H/8, W/8]."""
        z = z.float() * self.latents_std / self.scaling_factor + self.latents_mean
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(z.to(vae_dtype), return_dict=False)[0].float()

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [k, 4, H/8, W/8] of images [k, 3, H, W] in [-1, 1]: the posterior's mean."""
        vae_dtype = next(self.vae.parameters()).dtype
        mean = self.vae.encode(x.to(vae_dtype)).latent_dist.mean.float()
        return (mean - self.latents_mean) * self.scaling_factor / self.latents_std

    def sample_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A repaint mask [k, 1, H, W] at latent resolution: a cell is repainted when any of its pixels is."""
        return F.max_pool2d(mask.float(), self.card.scale)

    def preview(self, z: torch.Tensor) -> torch.Tensor:
        """Approximate images of latents: the fitted linear map per cell, upsampled to the image's size."""
        w = self.rgb_map.to(z.device, torch.float32)
        rgb = torch.einsum("kchw,rc->krhw", z.float(), w[:, :-1]) + w[:, -1].view(1, 3, 1, 1)
        return F.interpolate(rgb, scale_factor=self.card.scale, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def fit_preview(self, images: int = 8, size: int = 8, seed: int = 0) -> float:
        """Fit :meth:`preview`'s map to the decoder: latents of smooth random images (in the VAE's own
        distribution), decoded, pooled to latent cells; least squares of RGB on (latent, 1). Returns
        the fit's RMS error in [-1, 1] units."""
        g = torch.Generator().manual_seed(seed)
        s = self.card.scale
        coarse = torch.rand(images, 3, 3, 3, generator=g) * 2 - 1
        x = F.interpolate(coarse, size=(size * s, size * s), mode="bicubic", align_corners=True).clamp(-1, 1)
        z = self.encode_image(to_device(x, self._device()))
        target = F.avg_pool2d(self.decode(z), s)
        a = torch.cat([z, torch.ones_like(z[:, :1])], dim=1).permute(0, 2, 3, 1).reshape(-1, z.shape[1] + 1).double()
        y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
        sol = torch.linalg.lstsq(a.cpu(), y.cpu()).solution  # [C + 1, 3]
        self.rgb_map.copy_(sol.T.float().to(self.rgb_map.device))
        return float(((a.cpu() @ sol - y.cpu()) ** 2).mean().sqrt())
