"""The Gaussian oracle: for data x0 ~ N(μ, s²) (per coordinate) the exact ε-predictor is
E[ε | x_t] = sqrt(1−ᾱ_t)·(x_t − sqrt(ᾱ_t)·μ) / (ᾱ_t·s² + 1 − ᾱ_t)."""

import torch

from diffusion import SAMPLERS, sample
from diffusion.sampling import initial_noise


def gaussian_eps_model(schedule, mu: float, s: float):
    ab_all = schedule.alphas_cumprod

    def eps(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        assert int(t.min()) >= 0 and int(t.max()) < schedule.num_timesteps
        ab = ab_all[t].reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab)

    return eps


def exact_flow(schedule, mu: float, s: float, x_start, t_start: int):
    """Where the probability-flow ODE takes ``x_start`` (at timestep ``t_start``) at t = 0⁻ (clean):
    for Gaussian data every marginal is N(sqrt(ᾱ_t)·μ, ᾱ_t·s² + 1 − ᾱ_t), and the ODE keeps each
    sample's standardised value ξ, so the exact deterministic sample is μ + s·ξ."""
    ab = float(schedule.alphas_cumprod[t_start])
    xi = (x_start - ab ** 0.5 * mu) / (ab * s * s + 1 - ab) ** 0.5
    return mu + s * xi


def path_error(schedule, mu: float, s: float, name: str, steps: int, rows: int, shape=(1, 4, 4), **options) -> float:
    """RMS distance, relative to s, between a sampler's output and the exact ODE map (:func:`exact_flow`)
    of the same starting noise (seeds 0..rows−1), for ``rows`` samples of ``shape``."""
    x_T = initial_noise(list(range(rows)), shape, "cpu")
    x = sample(gaussian_eps_model(schedule, mu, s), schedule, (rows, *shape), name, steps, x_T=x_T, **options)
    exact = exact_flow(schedule, mu, s, x_T, SAMPLERS[name].plan(schedule, steps, options.get("spacing"))[0])
    return ((x - exact).pow(2).mean().sqrt() / s).item()
