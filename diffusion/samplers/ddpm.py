"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on any subset of timesteps.

Between consecutive chosen timesteps t > prev the effective β is β' = 1 − ᾱ_t/ᾱ_prev, and

    μ      = sqrt(ᾱ_prev)·β'/(1−ᾱ_t) · x̂0 + sqrt(1−β')·(1−ᾱ_prev)/(1−ᾱ_t) · x_t
    x_prev = μ + σ·z,   σ² = β̃ = (1−ᾱ_prev)/(1−ᾱ_t)·β'   (variance="beta_tilde", the default)
                         σ² = β'                        (variance="beta", the paper's other choice)

The last step (to the clean end, ᾱ_prev = 1) adds no noise and returns x̂0. With all T steps this
is exactly Algorithm 2; with fewer it is DDIM with η = 1 (or its "large variance" variant).
"""

from __future__ import annotations

import torch

from diffusion.guidance import Denoised
from diffusion.samplers.base import RowState, Sampler, alpha_bar, bcast, current_t
from diffusion.schedules import Schedule

VARIANCES = ("beta_tilde", "beta")


class DDPM(Sampler):
    name = "ddpm"
    uses_noise = True
    resamples = True

    def options(self, variance: str = "beta_tilde", **_):
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        return {"large_var": float(variance == "beta")}

    def buffers(self, n, image_shape, device):
        return {"large_var": torch.zeros(n, device=device)}  # 1.0: σ² = β' instead of β̃

    def update(self, schedule: Schedule, state: RowState, d: Denoised, noise):
        nd, x = state.x.ndim, state.x
        t, t_prev = current_t(state), current_t(state, 1)
        ab_t, ab_prev = alpha_bar(schedule, t, nd), alpha_bar(schedule, t_prev, nd)
        beta = 1 - ab_t / ab_prev
        x0 = d.x0  # the (thresholded) prediction, as the network's type gives it best
        c0 = (ab_prev.sqrt() * beta / (1 - ab_t)).to(x.dtype)
        ct = ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)).to(x.dtype)
        var = torch.where(bcast(state.extra["large_var"] > 0, nd), beta, (1 - ab_prev) / (1 - ab_t) * beta)
        var = torch.where(bcast(t_prev >= 0, nd), var, torch.zeros_like(var))  # the last step adds none
        mean = c0 * x0 + ct * x + var.sqrt().to(x.dtype) * noise
        live = t >= 0
        return {"x": torch.where(bcast(live, nd), mean, x), "i": state.i + live.long()}
