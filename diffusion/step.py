"""One iteration over a fixed-shape batch of rows: ONE forward pass for every row (whatever its
sampler, step, guidance or condition), then each row advanced by its own sampler.

:func:`iterate` is a pure tensor function of the state: no host synchronisation, no shape that
depends on tensor values, no Python branch on a tensor. Its keyword flags are host-side facts about
the batch (which samplers occur, whether any row is guided, uses dynamic thresholding or draws
noise); with every flag on it serves any batch, which is how a captured CUDA graph runs it. It
compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from diffusion import edits
from diffusion.guidance import Denoised, Net, combine, net_inputs, split
from diffusion.noise import gaussian, step_counter
from diffusion.samplers import KINDS, SAMPLERS, Sampler
from diffusion.samplers.base import RowState, bcast, current_t
from diffusion.schedules import Schedule

ALL_KINDS = tuple(range(len(KINDS)))
SHARED = ("x", "i", "stage")  # fields every sampler may advance; the rest of a sampler's are its own


def query(schedule: Schedule, state: RowState, kinds: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, t) where every row is evaluated now (t = -1 for finished or free rows)."""
    x, t = state.x, current_t(state)
    for k in kinds:
        sampler = SAMPLERS[KINDS[k]]
        if type(sampler).query is Sampler.query:
            continue  # the default: the row's current sample at its current timestep
        xq, tq = sampler.query(schedule, state)
        sel = state.kind == k
        x, t = torch.where(bcast(sel, x.ndim), xq, x), torch.where(sel, tq, t)
    return x, t


def prepare(schedule: Schedule, state: RowState, null_cond: torch.Tensor | None, *, kinds: tuple[int, ...],
            guided: bool) -> tuple[torch.Tensor, ...]:
    """(x_in, t_in, x_all, t_all, c_all): where each row is evaluated, and the forward pass's batch."""
    x_in, t_in = query(schedule, state, kinds)
    # Finished and free rows (t = -1) ride along at t = 0; their samplers leave them unchanged.
    t_in = t_in.clamp(min=0)
    return (x_in, t_in, *net_inputs(x_in, t_in, state.cond, state.uncond, guided))


def advance(schedule: Schedule, state: RowState, d: Denoised, *, kinds: tuple[int, ...], noise: bool,
            edit: bool = True) -> dict[str, torch.Tensor]:
    """The state's new fields once every row's evaluation is known: ``x``, ``x0``, ``i``, ``stage``
    and the samplers' own buffers (by name); then, with ``edit`` (needed when a row keeps part of a
    known image or its plan jumps back up), :func:`diffusion.edits.apply`."""
    z = gaussian(state.seed, step_counter(state.i, state.stage), tuple(state.x.shape[1:]), state.x.dtype) \
        if noise else None
    new = {"x": state.x, "i": state.i, "stage": state.stage, "x0": d.x0}
    for k in kinds:
        fields = SAMPLERS[KINDS[k]].update(schedule, state, d, z)
        sel = state.kind == k
        for name, value in fields.items():
            if name in SHARED:
                new[name] = torch.where(bcast(sel, value.ndim), value, new[name])
            else:
                new[name] = value  # private: meaningless in other samplers' rows, reset on admission
    return edits.apply(schedule, state, new) if edit else new


def is_guided(state: RowState, null_cond: torch.Tensor | None, guided: bool) -> bool:
    return guided and state.uncond is not None and null_cond is not None


def iterate(state: RowState, net: Net, schedule: Schedule, prediction: str, null_cond: torch.Tensor | None, *,
            kinds: tuple[int, ...] = ALL_KINDS, guided: bool = True, dynamic: bool = True,
            noise: bool = True, edit: bool = True, clip_range: float = 1.0) -> dict[str, torch.Tensor]:
    """The state's fields after one model evaluation of every row (see :func:`advance`). Rows of
    samplers not in ``kinds`` must not exist; ``noise`` must be on if any row draws noise, ``edit``
    if any row edits (keeps known pixels or resamples)."""
    guided = is_guided(state, null_cond, guided)
    x_in, t_in, x_all, t_all, c_all = prepare(schedule, state, null_cond, kinds=kinds, guided=guided)
    out_c, out_u = split(net(x_all, t_all, c_all), state.batch, guided)
    d = combine(out_c, out_u, x_in, t_in, schedule, prediction, state.w, state.clip, state.pct, dynamic=dynamic,
                clip_range=clip_range)
    return advance(schedule, state, d, kinds=kinds, noise=noise, edit=edit)


def done(state: RowState) -> torch.Tensor:
    """[B] bool: rows whose final sample is in ``state.x`` (every sampler ends at t = -1)."""
    return current_t(state) < 0
