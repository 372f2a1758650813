"""DDIM (Song et al. 2021), eq. (12) with σ_t = η·sqrt(β̃_t) on the chosen subset of timesteps:

    x̂0      = (x_t − sqrt(1−ᾱ_t)·ε) / sqrt(ᾱ_t)
    σ_t     = η · sqrt((1−ᾱ_prev)/(1−ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_prev)        (so σ_t² = η²·β̃_t)
    x_prev  = sqrt(ᾱ_prev)·x̂0 + sqrt(1−ᾱ_prev−σ_t²)·ε + σ_t·z

η = 0 is deterministic (the probability-flow ODE's first-order solver); η = 1 is DDPM's ancestral
sampler with σ² = β̃ on the subset. η is per row. (σ² = η·β̃ and σ² = η²·β̃ agree at η = 0 and 1;
we follow the paper and diffusers, whose σ is linear in η.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusion.samplers.base import RowState, Sampler, alpha_bar, current_t, row_noise
from diffusion.prediction import eps_to_x0
from diffusion.schedules import Schedule


@dataclass
class DDIMState(RowState):
    eta: torch.Tensor = None  # [B] float


def ddim_step(x: torch.Tensor, eps: torch.Tensor, ab_t: torch.Tensor, ab_prev: torch.Tensor,
              eta: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM update in float64 coefficients; shared by PNDM as its transfer function φ."""
    x0 = eps_to_x0(eps, x, ab_t)
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
    state_cls = DDIMState

    def options(self, n, device, eta: float | torch.Tensor = 0.0, **_):
        return {"eta": torch.as_tensor(eta, dtype=torch.float32, device=device).expand(n).clone()}

    def update(self, schedule: Schedule, state: DDIMState, eps: torch.Tensor) -> DDIMState:
        nd = state.x.ndim
        t, t_prev = current_t(state), current_t(state, 1)
        ab_t, ab_prev = alpha_bar(schedule, t, nd), alpha_bar(schedule, t_prev, nd)
        stochastic = (state.eta > 0) & (t_prev >= 0)
        noise = row_noise(state.gens, state.x, stochastic) if bool(stochastic.any()) else None
        x = ddim_step(state.x, eps, ab_t, ab_prev, state.eta, noise)
        live = (t >= 0).reshape(-1, *([1] * (nd - 1)))
        state.x = torch.where(live, x, state.x)
        state.i = state.i + (t >= 0).long()
        return state
