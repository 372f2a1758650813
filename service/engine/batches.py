"""The engine's set of batches: one :class:`ModelBatch` per model at its native image size (made
when the engine starts, accelerated as configured), and one per other image size of a resizable
model (made when a request for that size is admitted, eager, removed once idle). Rows of different
sizes never share a forward pass; the row cap (``max_rows``) is per model, whatever its sizes (the
scheduler counts a model's rows across them).

Only the engine's thread adds and removes batches; other threads (metrics, shutdown) read snapshots.
The cost model sees each batch under its key; another size of a model is predicted from the model's
native costs, its rows weighted by its pixels, until it is measured itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping

import torch

from diffusion import Acceleration
from service.engine.costs import CostModel
from service.engine.executor import Model, ModelBatch
from service.engine.job import GenerationSpec, Job
from service.engine.threads import CpuThreads, flops_per_row

log = logging.getLogger("service.engine")


def batch_key(spec: GenerationSpec, native: tuple[int, ...]) -> str:
    """The engine batch of a request: its model's, or for another size, ``name@WxH``."""
    if spec.shape is None or tuple(spec.shape) == tuple(native) or spec.size is None:
        return spec.model
    return f"{spec.model}@{spec.size[1]}x{spec.size[0]}"


def network_rows(rows: int, guided: bool) -> int:
    """Rows of the forward pass: a guided image is evaluated twice (conditional and unconditional)."""
    return rows * (2 if guided else 1)


class Batches(Mapping[str, ModelBatch]):
    def __init__(self, models: Mapping[str, Model], max_rows: int, max_steps: int | None, accel: Acceleration,
                 cpu_threads: str | None, decode_pixels: int, costs: CostModel):
        self.models = dict(models)
        self.max_rows, self.max_steps, self.cpu_threads, self.decode_pixels = max_rows, max_steps, cpu_threads, decode_pixels
        self.costs = costs
        self._by_key = {name: ModelBatch(m, max_rows, max_steps, accel, _threads(m, cpu_threads, m.card.sample_shape),
                                         decode_pixels=decode_pixels) for name, m in models.items()}

    # --- a read-only mapping (snapshots: safe beside the engine's thread) ---------------------------
    def __getitem__(self, key: str) -> ModelBatch:
        return self._by_key[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._by_key))

    def __len__(self) -> int:
        return len(self._by_key)

    def values(self) -> list[ModelBatch]:
        return list(self._by_key.values())

    def items(self) -> list[tuple[str, ModelBatch]]:
        return list(self._by_key.items())

    # --- the engine's thread -------------------------------------------------------------------------
    def key(self, spec: GenerationSpec) -> str:
        return batch_key(spec, self.models[spec.model].card.sample_shape)

    def network_rows(self, spec: GenerationSpec) -> int:
        return network_rows(spec.num_images, spec.guidance > 0 and self.models[spec.model].card.guidable)

    def for_job(self, job: Job) -> ModelBatch:
        """The batch of the job's model and size (made for a size not seen yet)."""
        batch = self._by_key.get(job.batch)
        if batch is None:
            model = self.models[job.spec.model]
            batch = ModelBatch(model, self.max_rows, self.max_steps, threads=_threads(model, self.cpu_threads,
                                                                                     job.spec.shape),
                               shape=job.spec.shape, decode_pixels=self.decode_pixels)
            native, other = model.card.sample_shape, job.spec.shape
            self.costs.alias(job.batch, job.spec.model, (other[1] * other[2]) / (native[1] * native[2]))
            self._by_key = {**self._by_key, job.batch: batch}  # a new dict: readers keep their snapshot
        return batch

    def prune(self) -> None:
        """Batches of another size than the native one go once they are idle."""
        idle = [k for k, b in self._by_key.items() if k not in self.models and not b.busy]
        if idle:
            self._by_key = {k: b for k, b in self._by_key.items() if k not in idle}

    def calibrate(self, key: str, budget_s: float) -> None:
        """Seed the cost model of a model's native batch: its iteration timed at growing batch sizes
        (on its empty table: inert rows, nothing changes), for at most about ``budget_s``."""
        started = time.perf_counter()
        for net, seconds in self._by_key[key].calibrate(budget_s):
            self.costs.observe(key, net, seconds)
        log.info("model %s calibrated in %.1f s: iteration seconds by network rows %s", key,
                 time.perf_counter() - started,
                 {n: round(s, 4) for n, s in sorted(self.costs.estimates.get(key, {}).items())})


def _threads(model: Model, setting: str | None, shape) -> CpuThreads | None:
    if setting is None or torch.device(model.device).type != "cpu":
        return None
    card = model.card
    cond = None if card.cond_dim is None else torch.zeros(1, card.cond_dim, device=model.device)
    shape = tuple(shape or card.sample_shape)
    # counted on the engine's thread, at its first iteration: no OpenMP pool on the caller's thread
    return CpuThreads(setting, lambda: flops_per_row(model.net, shape, cond, torch.device(model.device)),
                      name=model.name)
