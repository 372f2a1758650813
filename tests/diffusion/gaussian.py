"""The Gaussian oracle: for data x0 ~ N(μ, s²) (per coordinate) the exact ε-predictor is
E[ε | x_t] = sqrt(1−ᾱ_t)·(x_t − sqrt(ᾱ_t)·μ) / (ᾱ_t·s² + 1 − ᾱ_t)."""

import torch


def gaussian_eps_model(schedule, mu: float, s: float):
    ab_all = schedule.alphas_cumprod

    def eps(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        assert int(t.min()) >= 0 and int(t.max()) < schedule.num_timesteps
        ab = ab_all[t].reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab)

    return eps
