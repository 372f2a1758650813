"""DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order solver in data prediction.

With α_t = sqrt(ᾱ_t), σ_t = sqrt(1−ᾱ_t), λ_t = log(α_t/σ_t), x̂0_i the data prediction at step i
and h_i = λ_{t_{i+1}} − λ_{t_i}:

    D_i     = x̂0_i                                        (first step)
    D_i     = (1 + 1/(2 r_i))·x̂0_i − 1/(2 r_i)·x̂0_{i−1},   r_i = h_{i−1}/h_i   (later steps)
    x_{i+1} = (σ_{i+1}/σ_i)·x_i − α_{i+1}·(e^{−h_i} − 1)·D_i

The step to the clean end (σ = 0, λ = ∞) is first order and returns x̂0 (diffusers' default
``final_sigmas_type="zero"``; k-diffusion does the same). NFE = S.
"""

from __future__ import annotations

import torch

from diffusion.guidance import Denoised
from diffusion.samplers.base import RowState, Sampler, alpha_bar, bcast, current_t
from diffusion.schedules import Schedule


def _lambda(ab: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ab.log() - (1 - ab).log())


class DPMSolverPP2M(Sampler):
    name = "dpmpp_2m"

    def buffers(self, n, image_shape, device):
        return {"x0_prev": torch.zeros(n, *image_shape, device=device)}  # the previous step's x̂0

    def update(self, schedule: Schedule, state: RowState, d: Denoised, noise):
        nd, x = state.x.ndim, state.x
        t, t_next, t_last = current_t(state), current_t(state, 1), current_t(state, -1)
        ab_t, ab_next = alpha_bar(schedule, t, nd), alpha_bar(schedule, t_next, nd)
        x0 = d.x0
        final = bcast(t_next < 0, nd)
        safe_next = torch.where(final, ab_t, ab_next)  # keep λ finite on the final step
        h = _lambda(safe_next) - _lambda(ab_t)
        has_prev = bcast(state.i > 0, nd)
        ab_last = alpha_bar(schedule, torch.where(state.i > 0, t_last, t), nd)
        r = torch.where(has_prev, (_lambda(ab_t) - _lambda(ab_last)) / h, torch.ones_like(h))
        c = (1 / (2 * r)).to(x.dtype)
        D = torch.where(has_prev, (1 + c) * x0 - c * state.extra["x0_prev"], x0)
        x_next = (((1 - safe_next) / (1 - ab_t)).sqrt().to(x.dtype) * x
                  - (safe_next.sqrt() * torch.expm1(-h)).to(x.dtype) * D)
        x_next = torch.where(final, x0, x_next)
        live = t >= 0
        return {"x": torch.where(bcast(live, nd), x_next, x), "i": state.i + live.long(),
                "x0_prev": torch.where(bcast(live, nd), x0, state.extra["x0_prev"])}
