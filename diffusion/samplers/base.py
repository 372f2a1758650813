"""What every sampler shares: the per-row state, row operations, and the sampler interface.

A sampler is a stateless object (it holds nothing that changes while images are denoised). All
that changes lives in a :class:`RowState` (a dataclass of per-row tensors with a leading batch
dimension, plus per-row random generators) that is passed in and returned:

    x_in, t_in = sampler.query(schedule, state)   # what the ε-model must evaluate now, per row
    state = sampler.update(schedule, state, eps)  # advance every row by that evaluation

Rows are independent: each has its own planned timesteps (``ts``, padded with -1), step index
``i``, sub-stage, options and generator, so one state may hold rows at different steps and step
counts, and the row operations :func:`cat_rows` and :func:`take_rows` let an engine add and retire
rows between evaluations. Nothing in an update mixes rows, so a row's result never depends on what
else is in its batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from diffusion.schedules import Schedule, gather_alpha_bar, sampling_timesteps


@dataclass
class RowState:
    x: torch.Tensor  # [B, C, H, W] current sample in model space, at timestep ts[b, i[b]]
    ts: torch.Tensor  # [B, L] long: planned timesteps, decreasing, then -1 (the clean end)
    i: torch.Tensor  # [B] long: current step index into ts
    stage: torch.Tensor  # [B] long: sub-step within a multi-evaluation step (0 for most)
    gens: list = field(default_factory=list)  # [B] torch.Generator, one per row
    # Guidance, per row (see diffusion.guidance): conditioning vector, rate w, x̂0 clipping.
    cond: torch.Tensor | None = None  # [B, D] or None for an unconditional ε-model
    w: torch.Tensor | None = None  # [B] float guidance rate (0: no unconditional evaluation)
    clip: torch.Tensor | None = None  # [B] long: 0 none, 1 static [-1, 1], 2 dynamic (Imagen)
    pct: torch.Tensor | None = None  # [B] float: dynamic thresholding percentile

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])


def _rows_of(value, idx: torch.Tensor):
    if torch.is_tensor(value):
        return value[idx.to(value.device)]
    if isinstance(value, list):
        return [value[j] for j in idx.tolist()]
    return value


def take_rows(state: RowState, idx: torch.Tensor) -> RowState:
    """The rows ``idx`` (a long index or bool mask) of a state, as a new state."""
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    return dataclasses.replace(state, **{f.name: _rows_of(getattr(state, f.name), idx)
                                         for f in dataclasses.fields(state)})


def cat_rows(states: list[RowState]) -> RowState:
    """Concatenate states of the same sampler (``ts`` padded with -1 to the longest plan)."""
    states = [s for s in states if s is not None and s.batch > 0]
    if len(states) == 1:
        return states[0]
    width = max(s.ts.shape[1] for s in states)
    out = {}
    for f in dataclasses.fields(states[0]):
        vals = [getattr(s, f.name) for s in states]
        if f.name == "ts":
            vals = [torch.nn.functional.pad(v, (0, width - v.shape[1]), value=-1) for v in vals]
        if torch.is_tensor(vals[0]):
            out[f.name] = torch.cat(vals)
        elif isinstance(vals[0], list):
            out[f.name] = [g for v in vals for g in v]
        else:
            out[f.name] = vals[0]
    return type(states[0])(**out)


def plan_timesteps(schedule: Schedule, steps: list[int], spacing: str, device,
                   sigma_max: float | None = None) -> torch.Tensor:
    """[B, max(steps)+1] planned timesteps per row, each row ending in -1 padding. With
    ``sigma_max`` the plan covers only timesteps whose σ is at most that (from t_max down)."""
    width = max(steps) + 1
    out = torch.full((len(steps), width), -1, dtype=torch.long)
    horizon = schedule.num_timesteps
    if sigma_max is not None and spacing != "karras":
        horizon = int((schedule.sigmas <= sigma_max).sum().item())
    for b, s in enumerate(steps):
        if not 1 <= s <= horizon:
            raise ValueError(f"steps must be in [1, {horizon}], got {s}")
        out[b, :s] = torch.tensor(sampling_timesteps(horizon, s, spacing, schedule))
    return out.to(device)


def current_t(state: RowState, offset: int = 0) -> torch.Tensor:
    """ts[b, i[b] + offset] per row (-1 past the end)."""
    idx = (state.i + offset).clamp(min=0, max=state.ts.shape[1] - 1)
    return state.ts.gather(1, idx.unsqueeze(1)).squeeze(1)


def alpha_bar(schedule: Schedule, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return gather_alpha_bar(schedule, t, ndim)


def row_noise(gens: list, like: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Fresh N(0, I) noise for the rows flagged in ``rows`` (zeros elsewhere), each row drawn from
    its own generator, so a row's noise does not depend on its batch-mates."""
    idx = rows.nonzero().flatten()
    if idx.numel() == 0:
        return torch.zeros_like(like)
    draws = torch.stack([torch.randn(like.shape[1:], generator=gens[b], device=gens[b].device, dtype=like.dtype)
                         for b in idx.tolist()]).to(like.device)
    if idx.numel() == like.shape[0]:
        return draws
    return torch.zeros_like(like).index_copy(0, idx.to(like.device), draws)


class Sampler:
    """Interface of a sampler; subclasses are one algorithm each (see the registry)."""

    name: str = ""
    state_cls: type = RowState
    min_steps: int = 1
    default_spacing: str = "trailing"
    sigma_max: float | None = None  # start no noisier than this σ (None: at t = T-1)

    def options(self, n: int, device, **opts) -> dict:
        """Per-row option tensors for ``n`` rows (subclasses read the options they accept)."""
        return {}

    def init(self, schedule: Schedule, x_T: torch.Tensor, steps: list[int], gens: list,
             spacing: str | None = None, *, cond: torch.Tensor | None = None, guidance: float | torch.Tensor = 0.0,
             clip: str = "none", percentile: float | torch.Tensor = 0.995, **opts) -> RowState:
        """State for rows starting from noise ``x_T`` at their first planned timestep.

        ``cond`` / ``guidance`` / ``clip`` / ``percentile`` are the rows' guidance settings (see
        :mod:`diffusion.guidance`); other keyword options go to the sampler (e.g. ``eta``)."""
        n, dev = x_T.shape[0], x_T.device
        if len(steps) != n or len(gens) != n:
            raise ValueError("steps and gens need one entry per row")
        bad = [s for s in steps if s < self.min_steps]
        if bad:
            raise ValueError(f"{self.name} needs at least {self.min_steps} steps, got {bad[0]}")
        from diffusion.guidance import clip_code

        zeros = torch.zeros(n, dtype=torch.long, device=dev)
        base = dict(x=x_T, ts=plan_timesteps(schedule, steps, spacing or self.default_spacing, dev, self.sigma_max), i=zeros, stage=zeros.clone(),
                    gens=list(gens), cond=cond,
                    w=torch.as_tensor(guidance, dtype=torch.float32, device=dev).expand(n).clone(),
                    clip=torch.full((n,), clip_code(clip), dtype=torch.long, device=dev),
                    pct=torch.as_tensor(percentile, dtype=torch.float32, device=dev).expand(n).clone())
        return self.state_cls(**base, **self.extra_state(x_T), **self.options(n, dev, **opts))

    def extra_state(self, x_T: torch.Tensor) -> dict:
        return {}

    def query(self, schedule: Schedule, state: RowState) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, t) at which every row needs ε next: default, the current sample at its timestep."""
        return state.x, current_t(state)

    def update(self, schedule: Schedule, state: RowState, eps: torch.Tensor) -> RowState:
        raise NotImplementedError

    def done(self, state: RowState) -> torch.Tensor:
        """[B] bool: rows whose final sample is in ``state.x``."""
        return current_t(state) < 0

    def evaluations(self, steps: int) -> int:
        """Model evaluations (NFE) for ``steps`` steps."""
        return steps
