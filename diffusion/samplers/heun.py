"""Karras et al. 2022 ("Elucidating the design space...", EDM), Algorithm 3: the general
second-order Runge–Kutta ODE sampler with parameter α (α = 1: Heun's method; α = 1/2: midpoint).

Run as the probability-flow ODE in σ on a DDPM-trained ε-model: with x̃ = x_t / sqrt(ᾱ_t) and
σ = sqrt((1−ᾱ_t)/ᾱ_t), dx̃/dσ = ε(x̃·sqrt(ᾱ), t(σ)). The σ grid is the σ of the planned timesteps,
then σ = 0. Per step, with h = σ_{i+1} − σ_i and d_i = ε at (x̃_i, σ_i):

    σ' = σ_i + α·h, snapped to the nearest model timestep t' strictly below t_i (and ≥ t_{i+1});
    x̃' = x̃_i + (σ(t') − σ_i)·d_i,  d' = ε at (x̃', t')
    x̃_{i+1} = x̃_i + h·[(1 − 1/(2α̂))·d_i + 1/(2α̂)·d'],  α̂ = (σ(t') − σ_i)/h (the α actually used)
    and the last step (σ_{i+1} = 0) is a plain Euler step, as in the paper.

NFE = 2S − 1. The state keeps x in model space at the current timestep, like every sampler.
"""

from __future__ import annotations

import torch

from diffusion.samplers.base import RowState, Sampler, alpha_bar, bcast, current_t
from diffusion.schedules import Schedule, gather_sigma, sigma_to_t


class Heun(Sampler):
    name = "heun"
    default_spacing = "karras"  # EDM's σ grid: Heun's trapezoid is accurate only with small steps at low σ

    def options(self, alpha: float = 1.0, **_):
        if not 0 < alpha <= 1:
            raise ValueError("heun's alpha must be in (0, 1]")
        return {"alpha": float(alpha)}

    def buffers(self, n, image_shape, device):
        return {"alpha": torch.ones(n, dtype=torch.float64, device=device),  # Algorithm 3's α (1 = Heun)
                "x_tilde": torch.zeros(n, *image_shape, device=device),  # x̃' where the corrector evaluates
                "d": torch.zeros(n, *image_shape, device=device),  # d_i saved for the corrector
                "t_mid": torch.zeros(n, dtype=torch.long, device=device)}  # the corrector's timestep t'

    def evaluations(self, steps: int) -> int:
        return 2 * steps - 1

    def _corrector_t(self, schedule: Schedule, state: RowState) -> torch.Tensor:
        t, t_next, alpha = current_t(state), current_t(state, 1), state.extra["alpha"]
        s_t = gather_sigma(schedule, t, 1).flatten()
        s_next = gather_sigma(schedule, t_next, 1).flatten()
        snapped = sigma_to_t(schedule, s_t + alpha * (s_next - s_t))
        snapped = torch.minimum(snapped, t - 1)
        snapped = torch.maximum(snapped, t_next)
        return torch.where(alpha >= 1, t_next, snapped)

    def query(self, schedule: Schedule, state: RowState):
        ex, nd = state.extra, state.x.ndim
        corr = state.stage == 1
        x_mid = ex["x_tilde"] * alpha_bar(schedule, ex["t_mid"], nd).sqrt().to(state.x.dtype)
        return torch.where(bcast(corr, nd), x_mid, state.x), torch.where(corr, ex["t_mid"], current_t(state))

    def update(self, schedule: Schedule, state: RowState, eps: torch.Tensor, noise):
        nd, x, ex = state.x.ndim, state.x, state.extra
        t, t_next = current_t(state), current_t(state, 1)
        ab_t, ab_next = alpha_bar(schedule, t, nd), alpha_bar(schedule, t_next, nd)
        s_t, s_next = gather_sigma(schedule, t, nd), gather_sigma(schedule, t_next, nd)
        h = (s_next - s_t).to(x.dtype)
        live, pred = t >= 0, state.stage == 0
        last = t_next < 0

        # Predictor (stage 0): d_i = ε; Euler to σ' (or to σ = 0 on the last step).
        x_tilde = x / ab_t.sqrt().to(x.dtype)
        t_mid = self._corrector_t(schedule, state)
        s_mid = gather_sigma(schedule, t_mid, nd)
        x_euler_end = x_tilde + h * eps  # last step: x̃ at σ = 0 is the sample itself
        x_tilde_mid = x_tilde + (s_mid - s_t).to(x.dtype) * eps

        # Corrector (stage 1; x still holds x_i): combine d_i (saved) and d' = ε at (x̃', t').
        s_used = gather_sigma(schedule, ex["t_mid"], nd)
        a_hat = ((s_used - s_t) / (s_next - s_t)).to(x.dtype)
        x_tilde_next = x_tilde + h * ((1 - 1 / (2 * a_hat)) * ex["d"] + (1 / (2 * a_hat)) * eps)
        x_next = x_tilde_next * ab_next.sqrt().to(x.dtype)

        finish_pred = live & pred & last
        finish_corr = live & ~pred
        to_corr = live & pred & ~last
        new_x = torch.where(bcast(finish_pred, nd), x_euler_end, torch.where(bcast(finish_corr, nd), x_next, x))
        return {"x": new_x, "i": state.i + (finish_pred | finish_corr).long(),
                "stage": to_corr.long(),
                "x_tilde": torch.where(bcast(to_corr, nd), x_tilde_mid, ex["x_tilde"]),
                "d": torch.where(bcast(to_corr, nd), eps, ex["d"]),
                "t_mid": torch.where(to_corr, t_mid, ex["t_mid"])}
