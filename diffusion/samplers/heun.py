"""Karras et al. 2022 ("Elucidating the design space...", EDM), Algorithm 3: the general
second-order Runge–Kutta ODE sampler with parameter α (α = 1: Heun's method; α = 1/2: midpoint).

Run as the probability-flow ODE in σ on a DDPM-trained ε-model: with x̃ = x_t / sqrt(ᾱ_t) and
σ = sqrt((1−ᾱ_t)/ᾱ_t), dx̃/dσ = ε(x̃·sqrt(ᾱ), t(σ)). The σ grid is the σ of the planned timesteps,
then σ = 0. Per step, with h = σ_{i+1} − σ_i and d_i = ε at (x̃_i, σ_i):

    σ' = σ_i + α·h, snapped to the nearest model timestep t' strictly below t_i (and ≥ t_{i+1});
    x̃' = x̃_i + (σ(t') − σ_i)·d_i,  d' = ε at (x̃', t')
    x̃_{i+1} = x̃_i + h·[(1 − 1/(2α̂))·d_i + 1/(2α̂)·d'],  α̂ = (σ(t') − σ_i)/h (the α actually used)
    and the last step (σ_{i+1} = 0) is a plain Euler step, as in the paper.

The first step, from the noisiest timestep (σ = 80), is a plain Euler step too (x̃_1 = x̃_0 + h·d_0,
which is the DDIM step). There ε barely changes along the path, so Euler is already accurate, while
the corrector's d' is evaluated at the predictor's x̃', whose error (the model's included) the
corrector multiplies by about σ_0/σ_1. PNDM's first step is a DDIM step for the same reason
(diffusion/samplers/pndm.py). With 2 steps this sampler is DDIM on the same two timesteps; it used
to be one trapezoid from σ = 80 straight to σ_min that landed at 80× the true spread.

α defaults to 3/4, not 1 (Heun's trapezoid). On the Gaussian oracle (data N(0.3, 0.5²)), EDM's
ρ = 7 grid, spread of the samples / true spread (2 steps: DDIM's two steps, which collapse to the
mean as DDIM does), measured for issue 14:

    steps              2     3     5     6     8     10    15    20
    α = 1   cosine    0.02  3.25  2.49  1.71  1.36  1.20  1.08  1.05
            linear    0.03  3.55  2.38  1.72  1.33  1.19  1.08  1.04
    α = ¾   cosine    0.02  1.05  1.09  1.15  1.09  1.07  1.03  1.02
            linear    0.03  1.00  1.08  1.14  1.09  1.06  1.03  1.02
    α = ½   cosine    0.02  0.45  0.79  0.89  0.96  0.98  1.00  1.00
            linear    0.03  0.42  0.82  0.89  0.96  0.98  1.00  1.00

With α = 1 a step whose σ ratio is large where σ crosses the data's scale s widens the sample: for
σ_0 ≫ s ≫ σ_1 the trapezoid lands near x̃_0/2 instead of x̃_0·s/σ_0, and with few steps the ρ = 7
grid's ratios are 3-11 there (continuous-time Heun on the same grid gives the same numbers: it is
the method, which EDM's 18-step default hides). A smaller α evaluates d' earlier in the step and
errs toward the narrow side. On trained models (static clipping, w = 2, FID (domain), 200 samples,
docs/study/few-steps/heun-alpha.csv) α = ¾ was the best or second of {1, ¾, ½} in every cell:
α = 1 was worst at 5 steps on two of three models (2.1× and 3.1× the FID of ¾), α = ½ worst at
10 steps on both cosine models. ``alpha=1.0`` gives Heun's method as EDM ran it, ``alpha=0.5`` the
midpoint rule.

NFE = 2S − 2 for S ≥ 2 (1 for S = 1). The state keeps x in model space at the current timestep, like
every sampler.
"""

from __future__ import annotations

import torch

from diffusion.guidance import Denoised
from diffusion.samplers.base import RowState, Sampler, alpha_bar, bcast, current_t
from diffusion.schedules import Schedule, gather_sigma, sigma_to_t


FIRST_ORDER_STEPS = 1  # the step from the noisiest timestep is a plain Euler (= DDIM) step
DEFAULT_ALPHA = 0.75  # measured on the oracle and on trained models (module doc)


class Heun(Sampler):
    name = "heun"
    default_spacing = "karras"  # EDM's σ grid: Heun's trapezoid is accurate only with small steps at low σ

    def options(self, alpha: float | None = None, **_):
        alpha = DEFAULT_ALPHA if alpha is None else alpha
        if not 0 < alpha <= 1:
            raise ValueError("heun's alpha must be in (0, 1]")
        return {"alpha": float(alpha)}

    def buffers(self, n, image_shape, device):
        return {"alpha": torch.full((n,), DEFAULT_ALPHA, dtype=torch.float64, device=device),  # Algorithm 3's α
                "x_tilde": torch.zeros(n, *image_shape, device=device),  # x̃' where the corrector evaluates
                "d": torch.zeros(n, *image_shape, device=device),  # d_i saved for the corrector
                "t_mid": torch.zeros(n, dtype=torch.long, device=device)}  # the corrector's timestep t'

    def evaluations(self, steps: int) -> int:
        return 2 * steps - 1 - min(FIRST_ORDER_STEPS, steps - 1)

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

    def update(self, schedule: Schedule, state: RowState, d: Denoised, noise):
        eps = d.eps
        nd, x, ex = state.x.ndim, state.x, state.extra
        t, t_next = current_t(state), current_t(state, 1)
        ab_t, ab_next = alpha_bar(schedule, t, nd), alpha_bar(schedule, t_next, nd)
        s_t, s_next = gather_sigma(schedule, t, nd), gather_sigma(schedule, t_next, nd)
        h = (s_next - s_t).to(x.dtype)
        live, pred = t >= 0, state.stage == 0
        euler = (t_next < 0) | (state.i < FIRST_ORDER_STEPS)  # the first and the last step: no corrector

        # Predictor (stage 0): d_i = ε; Euler to σ' (or, on an Euler step, all the way to σ_{i+1}).
        x_tilde = x / ab_t.sqrt().to(x.dtype)
        t_mid = self._corrector_t(schedule, state)
        s_mid = gather_sigma(schedule, t_mid, nd)
        x_euler_end = (x_tilde + h * eps) * ab_next.sqrt().to(x.dtype)  # ᾱ = 1 at the clean end
        x_tilde_mid = x_tilde + (s_mid - s_t).to(x.dtype) * eps

        # Corrector (stage 1; x still holds x_i): combine d_i (saved) and d' = ε at (x̃', t').
        s_used = gather_sigma(schedule, ex["t_mid"], nd)
        a_hat = ((s_used - s_t) / (s_next - s_t)).to(x.dtype)
        x_tilde_next = x_tilde + h * ((1 - 1 / (2 * a_hat)) * ex["d"] + (1 / (2 * a_hat)) * eps)
        x_next = x_tilde_next * ab_next.sqrt().to(x.dtype)

        finish_pred = live & pred & euler
        finish_corr = live & ~pred
        to_corr = live & pred & ~euler
        new_x = torch.where(bcast(finish_pred, nd), x_euler_end, torch.where(bcast(finish_corr, nd), x_next, x))
        return {"x": new_x, "i": state.i + (finish_pred | finish_corr).long(),
                "stage": to_corr.long(),
                "x_tilde": torch.where(bcast(to_corr, nd), x_tilde_mid, ex["x_tilde"]),
                "d": torch.where(bcast(to_corr, nd), eps, ex["d"]),
                "t_mid": torch.where(to_corr, t_mid, ex["t_mid"])}
