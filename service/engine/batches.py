"""The engine's set of batches: one :class:`ModelBatch` per model at its native image size (made
when the engine starts, accelerated as configured), and one per other image size of a resizable
model (made when a request for that size is admitted, eager, removed once idle). Rows of different
sizes never share a forward pass; the row cap (``max_rows``) is per model, whatever its sizes (the
scheduler counts a model's rows across them).

Models change at run time (:mod:`service.registry`): a loader builds the new batch
(:meth:`Batches.build`), and the engine's thread, between two iterations, gives the name its new
weights (:meth:`Batches.install`) or takes it away (:meth:`Batches.remove`). The batches on the old
weights keep their rows under a retired key (``name~N``) until those finish, and then go; requests
admitted after the swap run on the new weights. Every change replaces the mapping under a lock, so
readers (metrics, shutdown, submissions) iterate snapshots.
The cost model sees each batch under its key; another size of a model is predicted from the model's
native costs, its rows weighted by its pixels, until it is measured itself.
"""

from __future__ import annotations

import itertools
import logging
import threading
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


def belongs(key: str, name: str) -> bool:
    """Whether a batch key is model ``name``'s (``name``, ``name@WxH``, or retired: ``…~N``)."""
    return key == name or key.startswith((name + "@", name + "~"))


def network_rows(rows: int, guided: bool) -> int:
    """Rows of the forward pass: a guided image is evaluated twice (conditional and unconditional)."""
    return rows * (2 if guided else 1)


class Batches(Mapping[str, ModelBatch]):
    def __init__(self, models: Mapping[str, Model], max_rows: int, max_steps: int | None, accel: Acceleration,
                 cpu_threads: str | None, decode_pixels: int, costs: CostModel):
        self.models = dict(models)
        self.max_rows, self.max_steps, self.cpu_threads, self.decode_pixels = max_rows, max_steps, cpu_threads, decode_pixels
        self.costs, self.accel = costs, accel
        self._lock = threading.Lock()  # one writer of _by_key at a time (the engine's thread, a loader)
        self._generation = itertools.count(1)
        self._by_key = {name: self._native(m) for name, m in models.items()}

    def _native(self, model: Model) -> ModelBatch:
        return ModelBatch(model, self.max_rows, self.max_steps, self.accel,
                          _threads(model, self.cpu_threads, model.card.sample_shape), decode_pixels=self.decode_pixels)

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
            with self._lock:
                self._by_key = {**self._by_key, job.batch: batch}  # a new dict: readers keep their snapshot
        return batch

    def prune(self) -> list[str]:
        """Batches of another size than the native one, and retired ones, go once they are idle;
        returns the keys that went."""
        with self._lock:
            idle = [k for k, b in self._by_key.items() if k not in self.models and not b.busy]
            if idle:
                self._by_key = {k: b for k, b in self._by_key.items() if k not in idle}
        return idle

    # --- models that change ---------------------------------------------------------------------------
    def build(self, model: Model) -> ModelBatch:
        """(any thread: the registry's loader) A model's native batch, built and, when accelerated,
        compiled and captured, before it is swapped in."""
        batch = self._native(model)
        if self.accel.padded:
            batch.warm_up()
        return batch

    def install(self, name: str, model: Model, batch: ModelBatch) -> None:
        """(the engine's thread, between iterations) ``name`` runs on ``model`` from now on; its
        batches on old weights are retired with their rows."""
        with self._lock:
            self.models = {**self.models, name: model}
            self._by_key = {**self._retire(name), name: batch}

    def remove(self, name: str) -> None:
        """(the engine's thread, between iterations) ``name`` runs no more: its idle batches go now,
        busy ones finish their rows first."""
        with self._lock:
            self.models = {k: m for k, m in self.models.items() if k != name}
            self._by_key = self._retire(name)

    def _retire(self, name: str) -> dict[str, ModelBatch]:
        """The batches with ``name``'s busy ones under retired keys and its idle ones gone."""
        keep = {}
        for key, batch in self._by_key.items():
            if not belongs(key, name):
                keep[key] = batch
            elif batch.busy:
                keep[f"{key.rpartition('~')[0] or key}~{next(self._generation)}"] = batch
        return keep

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
