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

from dataclasses import dataclass

import torch

from diffusion.samplers.base import RowState, Sampler, alpha_bar, current_t
from diffusion.schedules import Schedule, gather_sigma, sigma_to_t


@dataclass
class HeunState(RowState):
    alpha: torch.Tensor = None  # [B] float: Algorithm 3's α (1 = Heun)
    x_tilde: torch.Tensor = None  # [B, C, H, W] x̃' where the corrector evaluates
    d: torch.Tensor = None  # [B, C, H, W] d_i saved for the corrector
    t_mid: torch.Tensor = None  # [B] long: the corrector's timestep t'


class Heun(Sampler):
    name = "heun"
    state_cls = HeunState
    default_spacing = "karras"  # EDM's σ grid: Heun's trapezoid is accurate only with small steps at low σ

    def options(self, n, device, alpha: float | torch.Tensor = 1.0, **_):
        a = torch.as_tensor(alpha, dtype=torch.float64, device=device).expand(n).clone()
        if bool(((a <= 0) | (a > 1)).any()):
            raise ValueError("heun's alpha must be in (0, 1]")
        return {"alpha": a}

    def extra_state(self, x_T):
        return dict(x_tilde=torch.zeros_like(x_T), d=torch.zeros_like(x_T),
                    t_mid=torch.zeros(x_T.shape[0], dtype=torch.long, device=x_T.device))

    def evaluations(self, steps: int) -> int:
        return 2 * steps - 1

    def _corrector_t(self, schedule: Schedule, state: HeunState) -> torch.Tensor:
        t, t_next = current_t(state), current_t(state, 1)
        s_t = gather_sigma(schedule, t, 1).flatten()
        s_next = gather_sigma(schedule, t_next, 1).flatten()
        snapped = sigma_to_t(schedule, s_t + state.alpha * (s_next - s_t))
        snapped = torch.minimum(snapped, t - 1)
        snapped = torch.maximum(snapped, t_next)
        return torch.where(state.alpha >= 1, t_next, snapped)

    def query(self, schedule: Schedule, state: HeunState):
        corr = (state.stage == 1).reshape(-1, *([1] * (state.x.ndim - 1)))
        ab_mid = alpha_bar(schedule, state.t_mid, state.x.ndim)
        x_mid = state.x_tilde * ab_mid.sqrt().to(state.x.dtype)
        return torch.where(corr, x_mid, state.x), torch.where(state.stage == 1, state.t_mid, current_t(state))

    def update(self, schedule: Schedule, state: HeunState, eps: torch.Tensor) -> HeunState:
        nd, x = state.x.ndim, state.x
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
        s_used = gather_sigma(schedule, state.t_mid, nd)
        a_hat = ((s_used - s_t) / (s_next - s_t)).to(x.dtype)
        x_tilde_next = x_tilde + h * ((1 - 1 / (2 * a_hat)) * state.d + (1 / (2 * a_hat)) * eps)
        x_next = x_tilde_next * ab_next.sqrt().to(x.dtype)

        b = lambda m: m.reshape(-1, *([1] * (nd - 1)))  # noqa: E731
        finish_pred = live & pred & last
        finish_corr = live & ~pred
        new_x = torch.where(b(finish_pred), x_euler_end, torch.where(b(finish_corr), x_next, x))
        to_corr = live & pred & ~last
        state.x_tilde = torch.where(b(to_corr), x_tilde_mid, state.x_tilde)
        state.d = torch.where(b(to_corr), eps, state.d)
        state.t_mid = torch.where(to_corr, t_mid, state.t_mid)
        state.x = new_x
        state.stage = torch.where(to_corr, torch.ones_like(state.stage), torch.zeros_like(state.stage))
        state.i = state.i + (finish_pred | finish_corr).long()
        return state
