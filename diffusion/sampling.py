"""The function-level entry point :func:`sample`: any ε-model, any sampler, through the same
runner as the pipeline and the service (:mod:`diffusion.runner`)."""

from __future__ import annotations

from typing import Callable

import torch

from diffusion.noise import gaussian
from diffusion.runner import Runner
from diffusion.schedules import Schedule
from diffusion.table import RowRequest


def initial_noise(seeds: list[int], shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """x_T ~ N(0, I) for each seed: the starting noise a row with that seed gets (counter 0)."""
    s = torch.tensor(seeds, dtype=torch.long, device=device)
    return gaussian(s, torch.zeros_like(s), shape, dtype)


@torch.no_grad()
def sample(eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: Schedule,
           shape: tuple[int, ...], sampler: str = "ddim", steps: int = 50, seed: int | list[int] = 0, *,
           spacing: str | None = None, device: torch.device | str | None = None, x_T: torch.Tensor | None = None,
           clip: str = "none", percentile: float = 0.995, **options) -> torch.Tensor:
    """Sample ``shape`` = [B, ...] with any ε-model ``eps_model(x, t) -> ε`` (t: long [B] in [0, T-1]).

    ``spacing`` defaults to the sampler's own (trailing, from σ = 80 for pndm; karras for heun).
    Row b uses seed ``seed + b`` (or ``seed[b]`` for a list): its starting noise (unless ``x_T`` is
    given) and every later noise draw are functions of that seed alone (:mod:`diffusion.noise`).
    ``options`` go to the sampler: ``eta`` (ddim), ``variance`` (ddpm: "beta_tilde" | "beta"),
    ``alpha`` (heun). ``clip`` ("none" | "static" | "dynamic") thresholds x̂0 at every step. The
    result is the final sample in model space, unclipped."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    b = shape[0]
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + k for k in range(b)]
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for {b} rows")
    rows = [RowRequest(sampler, steps, s, clip=clip, percentile=percentile, spacing=spacing, options=options,
                       x_T=None if x_T is None else x_T[k]) for k, s in enumerate(seeds)]
    runner = Runner(lambda x, t, c: eps_model(x, t), schedule, "epsilon", None, shape[1:], capacity=b,
                    max_steps=steps, device=device)
    return runner.run_to_end(runner.add(rows))
