"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on any subset of timesteps.

Between consecutive chosen timesteps t > prev the effective β is β' = 1 − ᾱ_t/ᾱ_prev, and

    μ      = sqrt(ᾱ_prev)·β'/(1−ᾱ_t) · x̂0 + sqrt(1−β')·(1−ᾱ_prev)/(1−ᾱ_t) · x_t
    x_prev = μ + σ·z,   σ² = β̃ = (1−ᾱ_prev)/(1−ᾱ_t)·β'   (variance="beta_tilde", the default)
                         σ² = β'                        (variance="beta", the paper's other choice)

The last step (to the clean end, ᾱ_prev = 1) adds no noise and returns x̂0. With all T steps this
is exactly Algorithm 2; with fewer it is DDIM with η = 1 (or its "large variance" variant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusion.samplers.base import RowState, Sampler, alpha_bar, current_t, row_noise
from diffusion.prediction import eps_to_x0
from diffusion.schedules import Schedule

VARIANCES = ("beta_tilde", "beta")


@dataclass
class DDPMState(RowState):
    large_var: torch.Tensor = None  # [B] bool: σ² = β' instead of β̃


class DDPM(Sampler):
    name = "ddpm"
    state_cls = DDPMState

    def options(self, n, device, variance: str = "beta_tilde", **_):
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        return {"large_var": torch.full((n,), variance == "beta", dtype=torch.bool, device=device)}

    def update(self, schedule: Schedule, state: DDPMState, eps: torch.Tensor) -> DDPMState:
        nd, x = state.x.ndim, state.x
        t, t_prev = current_t(state), current_t(state, 1)
        ab_t, ab_prev = alpha_bar(schedule, t, nd), alpha_bar(schedule, t_prev, nd)
        beta = 1 - ab_t / ab_prev
        x0 = eps_to_x0(eps, x, ab_t)
        c0 = (ab_prev.sqrt() * beta / (1 - ab_t)).to(x.dtype)
        ct = ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)).to(x.dtype)
        var = torch.where(state.large_var.reshape(beta.shape), beta, (1 - ab_prev) / (1 - ab_t) * beta)
        stochastic = t_prev >= 0
        mean = c0 * x0 + ct * x
        if bool(stochastic.any()):
            mean = mean + var.sqrt().to(x.dtype) * row_noise(state.gens, x, stochastic)
        live = (t >= 0).reshape(-1, *([1] * (nd - 1)))
        state.x = torch.where(live, mean, x)
        state.i = state.i + (t >= 0).long()
        return state
