"""How many intra-op threads the engine's iterations use on the CPU.

PyTorch's default (one per core) is the wrong choice for small batches: splitting a small
convolution over two cores costs more in hand-offs than it saves, and the cores are then busy
spinning while the event loop wants them. Measured on the project's 2-core machine (the default
model, 28×28, guided, in-process): at 1 row an iteration took 14.5 ms on one thread and 41.3 ms on
two; at 4 rows 38 vs 55 ms; at 8 rows 83 vs 73 ms; at 32 rows 377 vs 261 ms. The crossover lies
between 2.0 and 2.7 GFLOP per iteration (this model's network costs 0.167 GFLOP per row, twice per
guided row). The 35.7M-parameter CIFAR-10 U-Net (12.1 GFLOP a row) is faster on two threads already
at one row (146 vs 107 ms).

So ``auto`` gives one thread to an iteration below :data:`PARALLEL_FLOPS` and every core above it
(:func:`available_cores`: the CPUs this process may run on, and its cgroup's CPU quota), from the
network's measured cost per row (one forward pass, counted by ``torch.utils.flop_counter`` on the
engine's thread before its first iteration); a number fixes the count. Threads are set on the
engine's own thread (OpenMP keeps the count per thread), so nothing else in the process is affected.

No other thread should start an OpenMP pool: with more OpenMP threads than cores, libgomp makes every
worker sleep between parallel regions instead of spinning, and each of the engine's ~100 regions per
forward pass then pays a wake-up (measured: a 15-step CIFAR-sized run on a second thread took
1.57-1.74 s with a pool in the main thread, 1.09-1.19 s without). ``python -m service`` therefore
starts with ``OMP_NUM_THREADS=1`` unless it is set, and the service's own image conversions use NumPy.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import torch

log = logging.getLogger("service.engine")

PARALLEL_FLOPS = 2.5e9  # per iteration, at least this much work: every core (measured crossover, above)


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

    def apply(self, network_rows: int) -> None:
        """Set the calling thread's count for an iteration of this many network rows."""
        n = self.count(network_rows)
        if n != self._current:
            torch.set_num_threads(n)
            self._current = n
