"""The rows in flight for one model: fixed-capacity device buffers plus what the host knows of them.

A :class:`RowTable` holds a :class:`~diffusion.samplers.base.RowState` of ``capacity`` rows that
never changes shape or address (so a CUDA graph captured over its first ``b`` rows stays valid),
and on the host, for every occupied slot: its handle, sampler, flags and how many model evaluations
it has left. Rows are kept compact in slots [0, n), latency-sensitive rows (priority 0) before bulk
rows (priority 1), so that an iteration may step only a prefix of the table (see
:meth:`diffusion.Runner.step`); keeping that order moves as few rows as possible.

The host never reads the device to learn when a row is done: every sampler needs a known number
of evaluations (:meth:`Sampler.evaluations`), so :meth:`RowTable.advance` counts them down. Rows
enter (:meth:`add`) and leave (:meth:`take`, :meth:`remove`) between iterations; the writes are
stream-ordered copies from pinned memory on a GPU, so none of this blocks on the device.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffusion import edits
from diffusion.guidance import clip_code
from diffusion.noise import gaussian
from diffusion.samplers import KINDS, SAMPLERS, get_sampler
from diffusion.samplers.base import RowState
from diffusion.schedules import Schedule


@dataclass(frozen=True)
class RowRequest:
    """One image to generate, in host terms."""
    sampler: str
    steps: int
    seed: int
    cond: torch.Tensor | None = None  # [D] conditioning vector on the device (None: unconditional model)
    uncond: torch.Tensor | None = None  # [D] the guided half's vector in place of the null condition (a negative prompt)
    guidance: float = 0.0
    clip: str = "none"
    percentile: float = 0.995
    spacing: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # eta, model_eps (ddim), variance (ddpm), alpha (heun)
    x_T: torch.Tensor | None = None  # starting noise [C, H, W]; default: the seed's counter-based draw
    # Edits (diffusion.edits): the given image [C, H, W] in sample space (a latent model's encoded
    # latents), where to repaint it ([1, H, W] at sample resolution, 1: repaint, 0: keep the given
    # sample; None: no inpainting), the strength, RePaint.
    image: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    strength: float = 1.0
    jump_length: int = 0
    jump_n_sample: int = 1


@dataclass
class _Row:
    """The host's record of an occupied slot."""
    handle: int
    kind: int
    guided: bool
    dynamic: bool
    noise: bool
    edit: bool  # keeps known pixels or jumps back up (diffusion.edits)
    total: int  # model evaluations this row needs
    priority: int = 1  # 0: latency-sensitive (kept in front), 1: bulk
    done: int = 0  # evaluations so far


@dataclass(frozen=True)
class _Prepared:
    req: RowRequest
    kind: int
    plan: list[int]
    opts: dict[str, float]


class RowTable:
    def __init__(self, capacity: int, image_shape: Sequence[int], max_steps: int, schedule: Schedule,
                 cond_dim: int | None, device: torch.device | str, dtype: torch.dtype = torch.float32,
                 null_cond: torch.Tensor | None = None):
        """``image_shape``: a row's sample shape; ``null_cond`` [1, D]: the unconditional vector of rows
        that bring none of their own (None: the model has no null condition, and no row is guided)."""
        self.capacity, self.image_shape = int(capacity), tuple(image_shape)
        self.device = torch.device(device)
        self.plan_schedule = schedule.to("cpu")  # plans are made on the host
        self.width = int(max_steps) + 1
        n, dev = self.capacity, self.device
        extra: dict[str, torch.Tensor] = {}
        for sampler in SAMPLERS.values():
            for name, buf in sampler.buffers(n, self.image_shape, dev).items():
                if name in extra:
                    raise ValueError(f"two samplers declare the buffer {name!r}")
                extra[name] = buf
        zeros = lambda dt: torch.zeros(n, dtype=dt, device=dev)  # noqa: E731
        image = lambda: torch.zeros(n, *self.image_shape, dtype=dtype, device=dev)  # noqa: E731
        self.state = RowState(
            x=image(), x0=image(),
            ts=torch.full((n, self.width), -1, dtype=torch.long, device=dev), i=zeros(torch.long),
            stage=zeros(torch.long), kind=torch.full((n,), -1, dtype=torch.long, device=dev), seed=zeros(torch.long),
            cond=None if cond_dim is None else torch.zeros(n, cond_dim, device=dev),
            uncond=None if cond_dim is None or null_cond is None else torch.zeros(n, cond_dim, device=dev),
            w=zeros(torch.float32),
            clip=zeros(torch.long), pct=torch.ones(n, device=dev), known=image(),
            keep=torch.zeros(n, 1, *self.image_shape[1:], dtype=dtype, device=dev), extra=extra)
        self._null = None if null_cond is None else null_cond.reshape(-1)
        self.rows: list[_Row] = []  # slot -> its row; slots [0, len(rows)) are occupied
        self._slot: dict[int, int] = {}  # handle -> slot
        self._handles = itertools.count()

    # --- what the host knows ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.capacity - len(self.rows)

    @property
    def urgent(self) -> int:
        """Rows of priority 0 (they occupy slots [0, urgent))."""
        return sum(r.priority == 0 for r in self.rows)

    def flags(self, b: int | None = None) -> dict:
        """Host-side facts about the rows in slots [0, b) that select the iteration's variant."""
        rows = self.rows[:b]
        return {"kinds": tuple(sorted({r.kind for r in rows})), "guided": any(r.guided for r in rows),
                "dynamic": any(r.dynamic for r in rows), "noise": any(r.noise for r in rows),
                "edit": any(r.edit for r in rows)}

    def progress(self, handle: int) -> tuple[int, int]:
        """(model evaluations done, needed) of a row."""
        row = self.rows[self._slot[handle]]
        return row.done, row.total

    def view(self, b: int) -> RowState:
        """The first ``b`` slots (views into the buffers, so stable addresses)."""
        s = self.state
        cut = lambda v: None if v is None else v[:b]  # noqa: E731
        return RowState(x=s.x[:b], x0=s.x0[:b], ts=s.ts[:b], i=s.i[:b], stage=s.stage[:b], kind=s.kind[:b],
                        seed=s.seed[:b], cond=cut(s.cond), uncond=cut(s.uncond), w=s.w[:b], clip=s.clip[:b], pct=s.pct[:b],
                        known=s.known[:b], keep=s.keep[:b], extra={k: v[:b] for k, v in s.extra.items()})

    def write(self, b: int, fields: Mapping[str, torch.Tensor]) -> None:
        """Copy an iteration's new field values into the first ``b`` slots."""
        s = self.state
        for name, value in fields.items():
            (s.extra[name] if name in s.extra else getattr(s, name))[:b].copy_(value)

    # --- rows in and out ----------------------------------------------------------------------
    def prepare(self, req: RowRequest) -> _Prepared:
        """Validate one row on the host (ValueError names what is wrong)."""
        sampler = get_sampler(req.sampler)
        if not req.guidance >= 0:
            raise ValueError(f"guidance must be >= 0, got {req.guidance}")
        if not 0 < req.percentile <= 1:
            raise ValueError(f"percentile must be in (0, 1], got {req.percentile}")
        clip_code(req.clip)
        plan = edits.row_plan(sampler, self.plan_schedule, req.steps, req.spacing, req.strength, req.jump_length,
                              req.jump_n_sample)
        if len(plan) >= self.width:
            raise ValueError(f"a plan of {len(plan)} timesteps exceeds this table's limit of {self.width - 1}")
        if (req.cond is None) != (self.state.cond is None):
            raise ValueError("a conditioning vector is needed exactly when the model is conditional")
        if req.uncond is not None and self.state.uncond is None:
            raise ValueError("an unconditional vector (negative prompt) needs a model with a null condition")
        for name, t, shape in (("image", req.image, self.image_shape), ("mask", req.mask, (1, *self.image_shape[1:]))):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        if req.mask is not None and req.image is None:
            raise ValueError("a mask needs the image it masks")
        return _Prepared(req, KINDS.index(req.sampler), plan, sampler.options(**req.options))

    def add(self, reqs: Sequence[RowRequest], priority: int = 1) -> list[int]:
        """Start rows from their noise at their first planned timestep; returns their handles. All
        rows are validated before any is added; ValueError when one is invalid or there is no room.
        ``priority`` 0 rows are latency-sensitive: they sit in front and are stepped every iteration."""
        prepared = [self.prepare(r) for r in reqs]
        if len(prepared) > self.free:
            raise ValueError(f"{len(prepared)} rows do not fit: {self.free} of {self.capacity} slots are free")
        if not prepared:
            return []
        first = len(self.rows)
        self._write_rows(torch.arange(first, first + len(prepared)), prepared)
        rows_at = dict(enumerate(self.rows))
        for p in prepared:
            sampler = SAMPLERS[p.req.sampler]
            guided = p.req.guidance > 0 and p.req.cond is not None
            rows_at[len(rows_at)] = _Row(next(self._handles), p.kind, guided=guided, dynamic=p.req.clip == "dynamic",
                                         noise=sampler.needs_noise(p.opts),
                                         edit=p.req.mask is not None or edits.jumps(p.plan) > 0,
                                         total=edits.evaluations(sampler, p.plan), priority=priority)
        self._arrange(rows_at)
        return [r.handle for r in list(rows_at.values())[first:]]

    def _write_rows(self, slots: torch.Tensor, prepared: list[_Prepared]) -> None:
        s, k, dev = self.state, len(prepared), self.device
        idx = self._h2d(slots)
        seeds = self._h2d(torch.tensor([p.req.seed % 2**64 - (2**64 if p.req.seed % 2**64 >= 2**63 else 0)
                                        for p in prepared], dtype=torch.long))
        x_T = gaussian(seeds, torch.zeros_like(seeds), self.image_shape, s.x.dtype)
        given = [j for j, p in enumerate(prepared) if p.req.x_T is not None]
        if given:
            x_T.index_copy_(0, self._h2d(torch.tensor(given)), torch.stack([prepared[j].req.x_T.to(dev, s.x.dtype)
                                                                           for j in given]))
        ts = torch.full((k, self.width), -1, dtype=torch.long)
        for j, p in enumerate(prepared):
            ts[j, :len(p.plan)] = torch.tensor(p.plan)
        host = lambda vals, dt: self._h2d(torch.tensor(vals, dtype=dt))  # noqa: E731
        known, keep = torch.zeros_like(x_T), torch.zeros(k, 1, *self.image_shape[1:], dtype=s.x.dtype, device=dev)
        edited = [j for j, p in enumerate(prepared) if p.req.image is not None]
        if edited:
            at = self._h2d(torch.tensor(edited))
            known.index_copy_(0, at, self._h2d(torch.stack([prepared[j].req.image.to(s.x.dtype) for j in edited])))
            masked = [j for j in edited if prepared[j].req.mask is not None]
            if masked:
                keep.index_copy_(0, self._h2d(torch.tensor(masked)), self._h2d(
                    torch.stack([(prepared[j].req.mask < 0.5).to(s.x.dtype) for j in masked])))
            noised = [p.req.image is not None and p.req.strength < 1 for p in prepared]
            x_T = edits.start(x_T, known, host([float(self.plan_schedule.alphas_cumprod[p.plan[0]]) for p in prepared],
                                               torch.float64), host(noised, torch.bool))
        values = {"x": x_T, "x0": torch.zeros_like(x_T), "ts": self._h2d(ts), "known": known, "keep": keep,
                  "i": torch.zeros(k, dtype=torch.long, device=dev), "stage": torch.zeros(k, dtype=torch.long, device=dev),
                  "kind": host([p.kind for p in prepared], torch.long),
                  "seed": seeds, "w": host([float(p.req.guidance) for p in prepared], torch.float32),
                  "clip": host([clip_code(p.req.clip) for p in prepared], torch.long),
                  "pct": host([float(p.req.percentile) for p in prepared], torch.float32)}
        if s.cond is not None:
            values["cond"] = torch.stack([p.req.cond.to(dev, s.cond.dtype) for p in prepared])
        if s.uncond is not None:
            null = self._null.to(dev, s.uncond.dtype)
            values["uncond"] = torch.stack([null if p.req.uncond is None else p.req.uncond.to(dev, s.uncond.dtype)
                                            for p in prepared])
        for name, v in values.items():
            getattr(s, name).index_copy_(0, idx, v)
        # each sampler's buffers at their reset values, with the rows' options written in
        for name in {p.req.sampler for p in prepared}:
            mine = [j for j, p in enumerate(prepared) if p.req.sampler == name]
            fresh = SAMPLERS[name].buffers(len(mine), self.image_shape, dev)
            for opt in prepared[mine[0]].opts:
                fresh[opt] = host([prepared[j].opts[opt] for j in mine], fresh[opt].dtype)
            sub = idx if len(mine) == k else idx[self._h2d(torch.tensor(mine))]
            for buf, v in fresh.items():
                s.extra[buf].index_copy_(0, sub, v)

    def advance(self, b: int | None = None) -> list[int]:
        """Count one model evaluation for the rows in slots [0, b); the handles that are now done."""
        finished = []
        for r in self.rows[:b]:
            r.done += 1
            if r.done == r.total:
                finished.append(r.handle)
        return finished

    def take(self, handles: Sequence[int]) -> torch.Tensor:
        """The final samples [k, C, H, W] of these rows (a new device tensor), which then leave."""
        slots = [self._slot[h] for h in handles]
        out = self.state.x.index_select(0, self._h2d(torch.tensor(slots, dtype=torch.long)))
        self.remove(handles)
        return out

    def peek(self, handles: Sequence[int], field_name: str = "x0") -> torch.Tensor:
        """A copy of a per-row field (default: the latest x̂0, for previews) of these rows."""
        slots = [self._slot[h] for h in handles]
        return getattr(self.state, field_name).index_select(0, self._h2d(torch.tensor(slots, dtype=torch.long)))

    def remove(self, handles: Sequence[int]) -> None:
        """Rows leave: others move into their slots (keeping [0, n) occupied, in priority order) and
        the freed slots at the end go inert (no planned timesteps)."""
        gone = {self._slot.pop(h) for h in handles}
        if not gone:
            return
        old = len(self.rows)
        self._arrange({j: r for j, r in enumerate(self.rows) if j not in gone})
        tail = self._h2d(torch.arange(len(self.rows), old))
        self.state.ts.index_fill_(0, tail, -1)
        self.state.stage.index_fill_(0, tail, 0)

    def _arrange(self, rows_at: dict[int, _Row]) -> None:
        """Put the rows (by their current slot) into slots [0, n), priority 0 first, moving only rows
        that are out of place: a row stays where it is when its slot is in its class's range."""
        n = len(rows_at)
        n0 = sum(r.priority == 0 for r in rows_at.values())
        cls = lambda j: 0 if j < n0 else 1  # noqa: E731
        keep = {j for j, r in rows_at.items() if j < n and r.priority == cls(j)}
        movers = {c: [j for j, r in rows_at.items() if j not in keep and r.priority == c] for c in (0, 1)}
        free = {c: [j for j in range(n) if j not in keep and cls(j) == c] for c in (0, 1)}
        moves = [(src, dst) for c in (0, 1) for src, dst in zip(movers[c], free[c])]
        if moves:
            self._move([a for a, _ in moves], [b for _, b in moves])
        placed = {j: rows_at[j] for j in keep} | {dst: rows_at[src] for src, dst in moves}
        self.rows = [placed[j] for j in range(n)]
        self._slot = {r.handle: j for j, r in enumerate(self.rows)}

    def clear(self) -> list[int]:
        handles = [r.handle for r in self.rows]
        self.remove(handles)
        return handles

    def _move(self, src: list[int], dst: list[int]) -> None:
        s = self.state
        i_src, i_dst = self._h2d(torch.tensor(src, dtype=torch.long)), self._h2d(torch.tensor(dst, dtype=torch.long))
        bufs = [s.x, s.x0, s.ts, s.i, s.stage, s.kind, s.seed, s.w, s.clip, s.pct, s.known, s.keep, *s.extra.values()]
        bufs += [b for b in (s.cond, s.uncond) if b is not None]
        for buf in bufs:
            buf.index_copy_(0, i_dst, buf.index_select(0, i_src))

    def _h2d(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without blocking (pinned, stream-ordered copy on CUDA)."""
        if self.device.type != "cuda" or t.device.type != "cpu":  # (a caller's tensor may already be on a GPU)
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)
