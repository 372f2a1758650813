"""Noise schedules as data, and the choice of sampling timesteps.

A :class:`Schedule` is a small frozen dataclass of 1-D float64 tensors indexed by the integer
timestep t in [0, T-1] (t = 0 is the least noisy step). Samplers gather the coefficients they need
per batch row with :func:`gather`, so every row of a batch may sit at its own timestep.

Index -1 means "no noise at all" (ᾱ = 1, σ = 0): a sampler's final step goes from the last chosen
timestep to -1. :func:`gather_alpha_bar` and :func:`gather_sigma` handle it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULE_KINDS = ("linear", "cosine")
SPACINGS = ("trailing", "leading", "linspace", "karras")


@dataclass(frozen=True)
class Schedule:
    kind: str
    betas: torch.Tensor  # [T] float64
    alphas_cumprod: torch.Tensor  # [T] float64, ᾱ_t = prod_{s<=t} (1 - β_s)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def sigmas(self) -> torch.Tensor:
        """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t): the noise level of x_t / sqrt(ᾱ_t) (the EDM / VE view)."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def log_sigmas(self) -> torch.Tensor:
        return self.sigmas.log()

    def to(self, device: torch.device | str) -> "Schedule":
        return Schedule(self.kind, self.betas.to(device), self.alphas_cumprod.to(device))

    @classmethod
    def from_betas(cls, kind: str, betas: torch.Tensor, dtype: torch.dtype = torch.float64) -> "Schedule":
        """ᾱ_t = prod_{s<=t} (1 − β_s) computed in ``dtype`` (float32 reproduces a model trained with
        diffusers, whose schedulers keep β and ᾱ in float32), stored in float64 like every schedule."""
        betas = torch.as_tensor(betas).to(dtype)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a vector of at least 2 values, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must be in (0, 1)")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(kind, betas.double(), alphas_cumprod.double())


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM (Ho et al. 2020): β linear from 1e-4 to 0.02 for T = 1000.

    For other T the end points are rescaled by 1000 / T (as in improved DDPM) so that the total
    amount of noise stays comparable; T = 1000 gives exactly the paper's values.
    """
    scale = 1000.0 / num_timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021: ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2),
    β_t = 1 − ᾱ_t/ᾱ_{t−1} clipped at 0.999. Our index t in [0, T-1] is the paper's t + 1."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / num_timesteps + s) / (1 + s)) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


_BETAS = {"linear": linear_betas, "cosine": cosine_betas}


def make_schedule(kind: str = "linear", num_timesteps: int = 1000) -> Schedule:
    """Build a noise schedule: ``kind`` is "linear" or "cosine"."""
    if kind not in _BETAS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {list(_BETAS)}")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    return Schedule.from_betas(kind, _BETAS[kind](num_timesteps))


def karras_timesteps(schedule: Schedule, steps: int, rho: float = 7.0, sigma_max: float = 80.0) -> list[int]:
    """Karras et al. 2022 (EDM) eq. (5): σ_i = (σ_max^(1/ρ) + i/(S−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ
    from min(σ_max = 80, the schedule's largest σ) (EDM's value) down to the smallest σ, each snapped to the
    nearest model timestep (kept strictly decreasing): small steps where σ is small. Starting at
    σ = 80 rather than at the schedule's end (σ ≈ 157 linear, ≈ 2·10⁴ cosine) changes the start
    distribution by a relative s²/σ² ≈ 10⁻⁴ and keeps a second-order step from the start stable."""
    sig = schedule.sigmas
    top = int(sigma_to_t(schedule, torch.tensor([min(sigma_max, float(sig[-1]))], dtype=torch.float64))[0])
    if steps == 1:
        return [top]
    lo, hi = float(sig[0]) ** (1 / rho), float(sig[top]) ** (1 / rho)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    raw = sigma_to_t(schedule, sigmas).tolist()
    out: list[int] = []
    for k, t in enumerate(raw):
        t = min(t, out[-1] - 1) if out else t
        out.append(max(t, steps - 1 - k))
    return out


def sampling_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing",
                       schedule: Schedule | None = None) -> list[int]:
    """The ``steps`` timesteps a sampler visits, in decreasing order, each in [0, T-1].

    - "trailing" (default; Lin et al. 2024, "Common diffusion noise schedules and sample steps are
      flawed"): round(T - k·T/S) - 1 for k = 0..S-1. Always starts at t = T-1 (pure noise), which
      is what matters at few steps.
    - "leading" (DDIM / Stable Diffusion's original choice): k·(T // S) for k = S-1..0, plus an
      offset of 0. Starts at T - T//S, i.e. it never sees the noisiest timestep.
    - "linspace" (DDPM-style, as in iDDPM): round(linspace(T-1, 0, S)). Starts at T-1, ends at 0.
    - "karras": the EDM σ grid (ρ = 7) snapped to timesteps (needs ``schedule``); Heun's default.

    ``steps`` may be anything from 1 to T; S = T gives every timestep for all three.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    T, S = num_timesteps, steps
    if spacing == "trailing":
        ts = [int(round(T - k * T / S)) - 1 for k in range(S)]
    elif spacing == "leading":
        ratio = T // S
        ts = [k * ratio for k in range(S - 1, -1, -1)]
    elif spacing == "karras":
        if schedule is None:
            raise ValueError("karras spacing needs the schedule")
        ts = karras_timesteps(schedule, S)
    elif spacing == "linspace":
        ts = [int(round(v)) for v in torch.linspace(T - 1, 0, S, dtype=torch.float64).tolist()]
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    return ts


def gather(values: torch.Tensor, t: torch.Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """values[t] per batch row, shaped [B, 1, ..., 1] to broadcast against a [B, ...] tensor of
    ``ndim`` dimensions. ``t`` must hold valid indices (use the ``gather_*`` helpers for t = -1)."""
    out = values.to(t.device)[t.long()]
    return out.to(dtype).reshape(-1, *([1] * (ndim - 1)))


def gather_alpha_bar(schedule: Schedule, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """ᾱ_t per row in float64, with ᾱ = 1 where t == -1 (the clean end point)."""
    ab = schedule.alphas_cumprod.to(t.device)
    out = torch.where(t >= 0, ab[t.clamp(min=0).long()], torch.ones((), dtype=ab.dtype, device=t.device))
    return out.reshape(-1, *([1] * (ndim - 1)))


def gather_sigma(schedule: Schedule, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """σ_t = sqrt((1-ᾱ)/ᾱ) per row in float64, with σ = 0 where t == -1."""
    ab = gather_alpha_bar(schedule, t, ndim)
    return ((1.0 - ab) / ab).sqrt()


def sigma_to_t(schedule: Schedule, sigma: torch.Tensor) -> torch.Tensor:
    """The integer timestep whose σ is nearest to ``sigma`` in log space (σ = 0 maps to -1)."""
    log_sigmas = schedule.log_sigmas.to(sigma.device)
    dist = (sigma.clamp(min=1e-12).log().reshape(-1, 1) - log_sigmas.reshape(1, -1)).abs()
    t = dist.argmin(dim=1)
    return torch.where(sigma.reshape(-1) > 0, t, torch.full_like(t, -1))
