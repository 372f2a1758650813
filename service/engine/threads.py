"""How many intra-op threads the engine's iterations use on the CPU, and why nothing else may use more
than one.

What mattered most was not the engine's count but the other threads': when any other thread of the
process has run an OpenMP parallel region (loading a model, encoding a PNG), libgomp manages more
threads than there are cores, and then puts every worker to sleep between parallel regions instead of
spinning; each of the ~100 regions of a forward pass then pays a wake-up. Measured on this project's
2-core machine: a 15-step CIFAR-sized run on a second thread took 1.57-1.74 s with a pool in the main
thread, 1.09-1.19 s without; over HTTP, one DDIM-50 request of that model took 6.4-6.9 s in the
service against 4.6-5.3 s in a plain diffusers app, its two threads 65-85 % busy instead of 100 %.
That is also why one thread looked faster than two at small batches (the issue's 24 vs 32 ms at 1
row): both were throttled. ``python -m service`` therefore starts with ``OMP_NUM_THREADS=1`` unless it
is set, and the service's image conversions use NumPy, so the engine's thread alone runs a pool. It
also sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is set: spinning workers collapse when anything else
wants the cores (one request of the SD benchmark's reduced model beside a busy process: 9.8 s
spinning, 3.9 s passive; idle: 2.07 s against 2.20 s; docs/service.md).

Measured then, in-process on the engine's own thread, the default model (0.167 GFLOP a row, twice per
guided row): two threads against one are 1.25-1.57× faster from 1.3 GFLOP an iteration (4 guided rows)
on, 1.38× at 2.7, 1.70-1.73× at 5.3-10.7 GFLOP; below 0.5 GFLOP (one row, or a 16×16 test model) the
two are within this machine's noise (0.86-1.45×), and over HTTP one DDIM-50 "nine" took 0.54-0.60 s
either way. So ``auto`` gives an iteration below :data:`PARALLEL_FLOPS` one thread (leaving a core to
the event loop for no loss) and every core (:func:`available_cores`: the CPUs this process may run on,
capped by its cgroup's CPU quota) above it, from the network's cost per row (one forward pass,
counted by ``torch.utils.flop_counter`` on the engine's thread before its first iteration); a number
fixes the count. Threads are set on the engine's own thread only (OpenMP keeps the count per thread).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import torch

log = logging.getLogger("service.engine")

PARALLEL_FLOPS = 0.5e9  # per iteration, at least this much work: every core (measured, above)


def flops_per_row(net, image_shape, cond: torch.Tensor | None, device: torch.device) -> float:
    """FLOPs of one network evaluation of one row (one real forward pass, counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *image_shape, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, t, cond)
    return float(counter.get_total_flops())


def available_cores() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


class CpuThreads:
    """The intra-op thread count for each iteration (see the module docstring). ``per_row``: the FLOPs
    of one row, or a function that counts them (called once, on the thread that first asks)."""

    def __init__(self, setting: str, per_row: float | Callable[[], float], cores: int | None = None, name: str = ""):
        self.fixed = None if setting == "auto" else int(setting)
        self._per_row, self.name = per_row, name
        self.cores = max(1, cores or available_cores())
        self._current = None

    @property
    def per_row(self) -> float:
        if callable(self._per_row):
            self._per_row = float(self._per_row())
            log.info("model %s: %.3g GFLOP per row; CPU threads %s (%d cores)", self.name, self._per_row / 1e9,
                     "auto" if self.fixed is None else self.fixed, self.cores)
        return self._per_row

    def count(self, network_rows: int) -> int:
        if self.fixed is not None:
            return self.fixed
        return self.cores if network_rows * self.per_row >= PARALLEL_FLOPS else 1

    def apply_all(self) -> None:
        """Every core (or the fixed count), for work that is large whatever the rows: a VAE decode."""
        n = self.fixed or self.cores
        if n != self._current:
            torch.set_num_threads(n)
            self._current = n

    def apply(self, network_rows: int) -> None:
        """Set the calling thread's count for an iteration of this many network rows."""
        n = self.count(network_rows)
        if n != self._current:
            torch.set_num_threads(n)
            self._current = n
