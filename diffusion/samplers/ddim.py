"""DDIM (Song et al. 2021), eq. (12) with σ_t = η·sqrt(β̃_t) on the chosen subset of timesteps:

    x̂0      = (x_t − sqrt(1−ᾱ_t)·ε) / sqrt(ᾱ_t)
    σ_t     = η · sqrt((1−ᾱ_prev)/(1−ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_prev)        (so σ_t² = η²·β̃_t)
    x_prev  = sqrt(ᾱ_prev)·x̂0 + sqrt(1−ᾱ_prev−σ_t²)·ε + σ_t·z

η = 0 is deterministic (the probability-flow ODE's first-order solver); η = 1 is DDPM's ancestral
sampler with σ² = β̃ on the subset. η is per row. (σ² = η·β̃ and σ² = η²·β̃ agree at η = 0 and 1;
we follow the paper and diffusers, whose σ is linear in η.)

Where x̂0 is thresholded, the step uses the thresholded x̂0 and, by default, the ε re-derived from
it (so x_prev lies on the line through x_t and the thresholded x̂0, as every sampler here sees it).
The per-row option ``model_eps`` keeps the network's (guided) ε̄ instead, which is what diffusers'
``DDIMScheduler`` does (``use_clipped_model_output=False``): diffusers-format models default to it
(diffusion.loading).
"""

from __future__ import annotations

import torch

from diffusion.guidance import Denoised
from diffusion.prediction import eps_to_x0
from diffusion.samplers.base import RowState, Sampler, alpha_bar, bcast, current_t
from diffusion.schedules import Schedule


def ddim_step(x: torch.Tensor, eps: torch.Tensor, ab_t: torch.Tensor, ab_prev: torch.Tensor,
              eta: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              x0: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM update in float64 coefficients; shared by PNDM as its transfer function φ. ``x0``
    left out is the one ε implies."""
    x0 = eps_to_x0(eps, x, ab_t) if x0 is None else x0
    if eta is None:
        sigma = torch.zeros_like(ab_t)
    else:
        sigma = eta.reshape(ab_t.shape).to(ab_t.dtype) * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
    out = ab_prev.sqrt().to(x.dtype) * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt().to(x.dtype) * eps
    if noise is not None:
        out = out + sigma.to(x.dtype) * noise
    return out


class DDIM(Sampler):
    name = "ddim"
    uses_noise = True  # when η > 0
    resamples = True

    def needs_noise(self, options):
        return options["eta"] > 0

    def options(self, eta: float = 0.0, model_eps: bool = False, **_):
        if not eta >= 0:
            raise ValueError(f"ddim's eta must be >= 0, got {eta}")
        return {"eta": float(eta), "model_eps": float(bool(model_eps))}

    def buffers(self, n, image_shape, device):
        return {"eta": torch.zeros(n, device=device), "model_eps": torch.zeros(n, device=device)}

    def update(self, schedule: Schedule, state: RowState, d: Denoised, noise):
        nd = state.x.ndim
        t, t_prev = current_t(state), current_t(state, 1)
        ab_t, ab_prev = alpha_bar(schedule, t, nd), alpha_bar(schedule, t_prev, nd)
        model_eps = bcast(state.extra["model_eps"] > 0, nd)
        eps = torch.where(model_eps, d.eps_model, d.eps)
        # the last step (to t = -1) has σ = 0 whatever η: ᾱ_prev = 1 makes the σ formula vanish
        x = ddim_step(state.x, eps, ab_t, ab_prev, state.extra["eta"], noise, x0=d.x0)
        live = t >= 0
        return {"x": torch.where(bcast(live, nd), x, state.x), "i": state.i + live.long()}
