"""The one place that owns the prediction type.

The network may predict ε ("epsilon", the default and the study's choice), v = √ᾱ·ε − √(1−ᾱ)·x0
("v", Salimans & Ho 2022; diffusers' "v_prediction") or the clean image x0 itself ("sample", as
diffusers calls it). The training loss asks :func:`training_target` what to regress on;
samplers only ever see ε̄ and x̂0, made by :func:`to_eps_x0` (in :func:`diffusion.guidance.combine`), and
never branch on the prediction type.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v", "sample")


def to_eps(prediction: str, out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Network output -> ε, given x_t and ᾱ_t per row (broadcastable)."""
    if prediction == "epsilon":
        return out
    if prediction == "v":
        a, s = alpha_bar.sqrt().to(out.dtype), (1 - alpha_bar).sqrt().to(out.dtype)
        return s * x_t + a * out
    if prediction == "sample":
        return x0_to_eps(out, x_t, alpha_bar)
    raise ValueError(f"unknown prediction type {prediction!r}")


def to_eps_x0(prediction: str, out: torch.Tensor, x_t: torch.Tensor,
              alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Network output -> (ε, x0), each in its well-conditioned form: x0 straight from v or from the
    sample itself, never through ε (at t = T−1 of the cosine schedule sqrt(ᾱ) ≈ 1e-4, and
    x0 = (x_t − sqrt(1−ᾱ)·ε)/sqrt(ᾱ) would cancel away every digit float32 has)."""
    if prediction == "v":
        a, s = alpha_bar.sqrt().to(out.dtype), (1 - alpha_bar).sqrt().to(out.dtype)
        return s * x_t + a * out, a * x_t - s * out
    if prediction == "sample":
        return x0_to_eps(out, x_t, alpha_bar), out
    eps = to_eps(prediction, out, x_t, alpha_bar)
    return eps, eps_to_x0(eps, x_t, alpha_bar)


def training_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the network regresses on for x_t = √ᾱ x0 + √(1−ᾱ) ε."""
    if prediction == "epsilon":
        return eps
    if prediction == "v":
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
    if prediction == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction!r}")


def eps_to_x0(eps: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂0 from ε; the coefficients are computed in ᾱ's precision (float64 from the schedule), then cast."""
    return (x_t - (1 - alpha_bar).sqrt().to(x_t.dtype) * eps) / alpha_bar.sqrt().to(x_t.dtype)


def x0_to_eps(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    return (x_t - alpha_bar.sqrt().to(x_t.dtype) * x0) / (1 - alpha_bar).sqrt().to(x_t.dtype)
