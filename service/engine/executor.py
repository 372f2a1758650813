"""The tensor side of the engine: the rows of one model in flight, and one iteration over them.

Every image in flight is a row of a sampler state (:mod:`diffusion.samplers`); rows are grouped by
sampler, and beside each group's state lies the list of which request (and which of its images)
owns each row. :meth:`ModelBatch.step` runs ONE forward pass for every row of the model
(:func:`diffusion.sampling.step_groups`), whatever their sampler, step, guidance or condition;
:meth:`ModelBatch.admit`, :meth:`ModelBatch.drop` and :meth:`ModelBatch.retire` add and remove rows
between iterations. Rows never influence each other, so a request's images do not depend on what
else is in flight.
"""

from __future__ import annotations

from typing import Protocol

import torch

from diffusion.samplers import get_sampler
from diffusion.samplers.base import RowState, cat_rows, take_rows
from diffusion.sampling import initial_noise, make_generators, step_groups

from service.engine.job import Job


class Model(Protocol):
    """What the engine needs of a model: :class:`diffusion.Pipeline` has it (so does a test fake)."""
    name: str
    device: torch.device
    schedule: object
    null_cond: torch.Tensor | None
    cfg: object  # .image_shape, .prediction

    def cond_vector(self, condition) -> torch.Tensor | None: ...

    def net(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor: ...


class ModelBatch:
    """All rows in flight for one model."""

    def __init__(self, model: Model):
        self.model = model
        self.groups: dict[str, RowState] = {}
        self.owners: dict[str, list[tuple[Job, int]]] = {}  # per group: (job, image index) per row

    @property
    def rows(self) -> int:
        return sum(len(o) for o in self.owners.values())

    def jobs(self) -> set[Job]:
        return {job for owners in self.owners.values() for job, _ in owners}

    @torch.no_grad()
    def admit(self, job: Job) -> None:
        """Start a request's rows from their seeded noise; they take part in the next step."""
        spec, m = job.spec, self.model
        n = spec.num_images
        cond = m.cond_vector(spec.condition)
        gens = make_generators(list(spec.seeds), m.device)
        x_T = initial_noise(gens, tuple(m.cfg.image_shape), m.device)
        conds = cond.unsqueeze(0).expand(n, -1).contiguous() if cond is not None else None
        options = {"eta": spec.eta} if spec.scheduler == "ddim" else {}
        state = get_sampler(spec.scheduler).init(
            m.schedule, x_T, [spec.steps] * n, gens, spec.spacing, cond=conds,
            guidance=spec.guidance if cond is not None else 0.0, clip=spec.clip, percentile=spec.percentile,
            **options)
        name = spec.scheduler
        self.groups[name] = cat_rows([self.groups.get(name), state])
        self.owners[name] = self.owners.get(name, []) + [(job, k) for k in range(n)]

    def drop(self, jobs: set[Job]) -> None:
        """Remove every row of ``jobs``."""
        for name in list(self.groups):
            keep = [r for r, (job, _) in enumerate(self.owners[name]) if job not in jobs]
            self._keep(name, keep)

    @torch.no_grad()
    def step(self) -> int:
        """One engine iteration for this model: ONE forward pass over all its rows. Returns the rows."""
        m = self.model
        self.groups = step_groups(self.groups, m.net, m.schedule, m.cfg.prediction, m.null_cond)
        return self.rows

    @torch.no_grad()
    def retire(self) -> list[tuple[Job, int, torch.Tensor]]:
        """Take finished rows out at once: (job, image index, final image on the CPU) for each."""
        out = []
        for name in list(self.groups):
            state = self.groups[name]
            done = get_sampler(name).done(state).cpu()
            if not bool(done.any()):
                continue
            finished = done.nonzero().flatten().tolist()
            images = state.x[done.to(state.x.device)].float().cpu()
            out += [(*self.owners[name][r], images[j]) for j, r in enumerate(finished)]
            self._keep(name, (~done).nonzero().flatten().tolist())
        return out

    def clear(self) -> set[Job]:
        jobs = self.jobs()
        self.groups, self.owners = {}, {}
        return jobs

    def _keep(self, name: str, rows: list[int]) -> None:
        if len(rows) == len(self.owners[name]):
            return
        if not rows:
            del self.groups[name], self.owners[name]
            return
        state = self.groups[name]
        self.groups[name] = take_rows(state, torch.tensor(rows, dtype=torch.long, device=state.x.device))
        self.owners[name] = [self.owners[name][r] for r in rows]
