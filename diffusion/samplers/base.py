"""What every sampler shares: the per-row state, and the sampler interface.

A sampler is a stateless object (it holds nothing that changes while images are denoised). All
that changes lives in a :class:`RowState`: per-row tensors with a leading batch dimension, of FIXED
shapes, so one iteration is a pure tensor function with no host synchronisation and no
data-dependent shapes (it compiles with ``torch.compile(fullgraph=True)`` and can be captured as a
CUDA graph):

    x_in, t_in = sampler.query(schedule, state)            # where each row needs ε next
    new_fields = sampler.update(schedule, state, d, noise)  # each row advanced by that evaluation

Rows are independent: each has its own planned timesteps (``ts``, padded with -1), step index
``i``, sub-stage, sampler (``kind``), options and seed, so one state may hold rows at different
steps, step counts and samplers. An update is computed for every row as if it were that sampler's,
and :func:`diffusion.step.iterate` keeps each row's own sampler's result with a mask; a sampler's
private buffers (``extra``) therefore hold meaningless values in rows of other samplers, and are
reset when a row is admitted. Nothing in an update mixes rows, so a row's result never depends on
what else is in its batch. Randomness is counter-based (:mod:`diffusion.noise`), keyed by the row's
seed and its step, never by its position in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffusion.guidance import Denoised
from diffusion.schedules import Schedule, gather_alpha_bar, sampling_timesteps


@dataclass
class RowState:
    x: torch.Tensor  # [B, C, H, W] current sample in model space, at timestep ts[b, i[b]]
    x0: torch.Tensor  # [B, C, H, W] the latest (guided, thresholded) prediction x̂0: previews
    ts: torch.Tensor  # [B, L] long: planned timesteps, decreasing, then -1 (the clean end)
    i: torch.Tensor  # [B] long: current step index into ts
    stage: torch.Tensor  # [B] long: sub-step within a multi-evaluation step (0 for most)
    kind: torch.Tensor  # [B] long: the row's sampler, its index in the registry (-1: free slot)
    seed: torch.Tensor  # [B] long: keys the row's noise (diffusion.noise)
    # Guidance, per row (see diffusion.guidance): conditioning vector, rate w, x̂0 clipping.
    cond: torch.Tensor | None  # [B, D] or None for an unconditional ε-model
    uncond: torch.Tensor | None  # [B, D]: the unconditional half's vector (null condition or negative prompt)
    w: torch.Tensor  # [B] float guidance rate (0: conditional only)
    clip: torch.Tensor  # [B] long: 0 none, 1 static [-1, 1], 2 dynamic (Imagen)
    pct: torch.Tensor  # [B] float: dynamic thresholding percentile
    # Edits, per row (see diffusion.edits): the known image and where it is kept (1) or repainted (0).
    known: torch.Tensor  # [B, C, H, W] model space (zeros for rows that edit nothing)
    keep: torch.Tensor  # [B, 1, H, W] float 0/1 (all 0: nothing kept)
    # Each sampler's own per-row options and history, by name (see Sampler.buffers).
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])


def bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A [B] tensor shaped [B, 1, ..., 1] against a tensor of ``ndim`` dimensions."""
    return v.reshape(-1, *([1] * (ndim - 1)))


def current_t(state: RowState, offset: int = 0) -> torch.Tensor:
    """ts[b, i[b] + offset] per row (-1 past the end)."""
    return planned_t(state.ts, state.i + offset)


def planned_t(ts: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """ts[b, i[b]] per row (-1 past the end)."""
    idx = i.clamp(min=0, max=ts.shape[1] - 1)
    return ts.gather(1, idx.unsqueeze(1)).squeeze(1)


def alpha_bar(schedule: Schedule, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return gather_alpha_bar(schedule, t, ndim)


class Sampler:
    """Interface of a sampler; subclasses are one algorithm each (see the registry)."""

    name: str = ""
    min_steps: int = 1
    default_spacing: str = "trailing"
    sigma_max: float | None = None  # start no noisier than this σ (None: at t = T-1)
    uses_noise: bool = False  # update() may read fresh noise (see needs_noise)
    resamples: bool = False  # one evaluation per step and no history: may jump back up (RePaint, diffusion.edits)

    def plan(self, schedule: Schedule, steps: int, spacing: str | None = None) -> list[int]:
        """The timesteps a row of ``steps`` steps visits, decreasing (host-side, on the CPU
        schedule). With ``sigma_max`` the plan covers only timesteps whose σ is at most that."""
        if steps < self.min_steps:
            raise ValueError(f"{self.name} needs at least {self.min_steps} steps, got {steps}")
        spacing = spacing or self.default_spacing
        horizon = schedule.num_timesteps
        if self.sigma_max is not None and spacing != "karras":
            horizon = int((schedule.sigmas.cpu() <= self.sigma_max).sum())
        if not 1 <= steps <= horizon:
            raise ValueError(f"steps must be in [1, {horizon}], got {steps}")
        return sampling_timesteps(horizon, steps, spacing, schedule)

    def options(self, **opts) -> dict[str, float]:
        """Validated per-row option values, by buffer name (host-side; subclasses read theirs)."""
        return {}

    def needs_noise(self, options: dict[str, float]) -> bool:
        """Whether a row with these options (from :meth:`options`) draws noise in its updates."""
        return self.uses_noise

    def buffers(self, n: int, image_shape: tuple[int, ...], device) -> dict[str, torch.Tensor]:
        """This sampler's per-row buffers (options and history) for ``n`` rows, at their reset values."""
        return {}

    def query(self, schedule: Schedule, state: RowState) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, t) at which every row needs ε next: default, the current sample at its timestep."""
        return state.x, current_t(state)

    def update(self, schedule: Schedule, state: RowState, d: Denoised,
               noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Every row advanced by its evaluation ``d`` (ε̄ and x̂0 at the queried point) as if it ran
        this sampler: new values of ``x``, ``i``, ``stage`` and of this sampler's own buffers (by
        name). Rows whose plan is over (t = -1) keep theirs. ``noise`` is the rows' N(0, I) draw for
        this step when ``uses_noise``."""
        raise NotImplementedError

    def done(self, state: RowState) -> torch.Tensor:
        """[B] bool: rows whose final sample is in ``state.x``."""
        return current_t(state) < 0

    def evaluations(self, steps: int) -> int:
        """Model evaluations (NFE) for ``steps`` steps: the iterations until the row is done."""
        return steps
