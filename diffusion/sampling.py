"""Driving samplers: one iteration over many rows (any mix of samplers, steps and guidance) with a
single forward pass, and the function-level entry point :func:`sample` for any ε-model."""

from __future__ import annotations

from typing import Callable

import torch

from diffusion.guidance import Net, guided_eps
from diffusion.samplers import get_sampler
from diffusion.samplers.base import RowState
from diffusion.schedules import Schedule


def make_generators(seeds: list[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per row, seeded with that row's seed (the same seed gives the same image)."""
    device = torch.device(device)
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def initial_noise(gens: list[torch.Generator], shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """x_T ~ N(0, I), each row from its own generator."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device, dtype=dtype) for g in gens]).to(device)


def step_groups(groups: dict[str, RowState], net: Net, schedule: Schedule, prediction: str = "epsilon",
                null_cond: torch.Tensor | None = None) -> dict[str, RowState]:
    """One engine iteration: every row of every group that is not done is evaluated in ONE
    forward pass (whatever its sampler, step, guidance or condition), then each sampler advances
    its own rows. Groups are keyed by sampler name."""
    parts, order = [], []
    for name, st in groups.items():
        if st is None or st.batch == 0:
            continue
        x_in, t_in = get_sampler(name).query(schedule, st)
        parts.append((x_in, t_in, st))
        order.append(name)
    if not parts:
        return groups
    x = torch.cat([p[0] for p in parts])
    t = torch.cat([p[1] for p in parts])
    conds = [p[2].cond for p in parts]
    cond = None if any(c is None for c in conds) else torch.cat(conds)
    cat = lambda attr: torch.cat([getattr(p[2], attr) for p in parts])  # noqa: E731
    # Finished rows (t = -1) still ride along until the caller retires them; evaluate them at t=0.
    eps = guided_eps(net, schedule, prediction, x, t.clamp(min=0), cond, null_cond, cat("w"), cat("clip"), cat("pct"))
    out = dict(groups)
    offset = 0
    for name, (x_in, _, st) in zip(order, parts):
        n = x_in.shape[0]
        out[name] = get_sampler(name).update(schedule, st, eps[offset:offset + n])
        offset += n
    return out


def run_to_end(groups: dict[str, RowState], net: Net, schedule: Schedule, prediction: str = "epsilon",
               null_cond: torch.Tensor | None = None, progress: Callable[[int], None] | None = None) -> dict[str, RowState]:
    """Iterate :func:`step_groups` until every row of every group is done."""
    it = 0
    while any(st is not None and st.batch and not bool(get_sampler(n).done(st).all()) for n, st in groups.items()):
        groups = step_groups(groups, net, schedule, prediction, null_cond)
        it += 1
        if progress is not None:
            progress(it)
    return groups


@torch.no_grad()
def sample(eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: Schedule,
           shape: tuple[int, ...], sampler: str = "ddim", steps: int = 50, seed: int | list[int] = 0, *,
           spacing: str | None = None, device: torch.device | str | None = None, x_T: torch.Tensor | None = None,
           clip: str = "none", percentile: float = 0.995, **options) -> torch.Tensor:
    """Sample ``shape`` = [B, ...] with any ε-model ``eps_model(x, t) -> ε`` (t: long [B] in [0, T-1]).

    ``spacing`` defaults to the sampler's own (trailing, from σ = 80 for pndm; karras for heun).
    Row b uses seed ``seed + b`` (or ``seed[b]`` for a list) for its own generator. ``options`` go
    to the sampler: ``eta`` (ddim), ``variance`` (ddpm: "beta_tilde" | "beta"), ``alpha`` (heun).
    ``clip`` ("none" | "static" | "dynamic") thresholds x̂0 at every step. The result is the final
    sample in model space, unclipped."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    b = shape[0]
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + k for k in range(b)]
    gens = make_generators(seeds, device)
    if x_T is None:
        x_T = initial_noise(gens, tuple(shape[1:]), device)
    s = get_sampler(sampler)
    state = s.init(schedule, x_T.to(device), [steps] * b, gens, spacing, clip=clip, percentile=percentile, **options)
    net = lambda x, t, c: eps_model(x, t)  # noqa: E731
    groups = run_to_end({sampler: state}, net, schedule.to(device))
    return groups[sampler].x
