"""A network call compiled once per bucketed batch size (torch.compile, optionally with CUDA graphs).

The engine's forward passes see every batch size from 1 to twice its row limit (guided rows run
their conditional and unconditional halves together). Compiling for each size would take minutes,
and CUDA graphs need fixed shapes. So a batch is padded up to the next bucket size (repeating its
last row), run through the graph compiled for that size, and the padding is cut off again. Rows are
independent in the U-Net (GroupNorm and attention are per image), so padding changes no row.
Batches above the largest bucket run eagerly.

Off by default: on a CPU, compiling costs more than it saves for these small models. On a GPU,
``mode="reduce-overhead"`` adds CUDA graphs, which remove the per-kernel launch cost that dominates
small U-Nets; measure with ``bench/load.py`` before turning it on.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # these record graphs after a few warm-up calls

Net = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def power_of_two_buckets(largest: int) -> tuple[int, ...]:
    """1, 2, 4, … up to the first power of two that is at least ``largest``."""
    if largest < 1:
        raise ValueError(f"largest bucket must be >= 1, got {largest}")
    sizes, s = [], 1
    while True:
        sizes.append(s)
        if s >= largest:
            return tuple(sizes)
        s *= 2


def _pad_rows(t: torch.Tensor, size: int) -> torch.Tensor:
    extra = size - t.shape[0]
    return t if extra == 0 else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])


class BucketedNet:
    """``net(x, t, cond)`` through ``torch.compile(net)``, one static shape per bucket size."""

    def __init__(self, net: Net, buckets: Sequence[int], mode: str = "default", backend: str = "inductor"):
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; expected one of {', '.join(COMPILE_MODES)}")
        if not buckets or min(buckets) < 1:
            raise ValueError(f"bucket sizes must be >= 1, got {list(buckets)}")
        self.net = net
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.mode = mode
        kwargs = {"mode": mode} if backend == "inductor" else {}
        self.compiled = torch.compile(net, backend=backend, dynamic=False, **kwargs)
        self.eager_calls = 0

    def bucket(self, batch: int) -> int | None:
        """The padded size a batch of ``batch`` rows runs at; None above the largest bucket."""
        i = bisect.bisect_left(self.buckets, batch)
        return self.buckets[i] if i < len(self.buckets) else None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        b = x.shape[0]
        size = self.bucket(b)
        if size is None:
            self.eager_calls += 1
            return self.net(x, t, cond)
        out = self.compiled(_pad_rows(x, size), _pad_rows(t, size), None if cond is None else _pad_rows(cond, size))
        # CUDA-graph outputs live in buffers the next replay overwrites: hand back our own copy
        return out[:b].clone()

    def warm_up(self, example_x: torch.Tensor, example_t: torch.Tensor, example_cond: torch.Tensor | None) -> None:
        """Compile (and for CUDA graphs, record) every bucket now rather than on a user's request.
        The examples are one row each; they are repeated to each bucket size."""
        with torch.no_grad():
            for size in self.buckets:
                for _ in range(3 if self.mode in CUDA_GRAPH_MODES else 1):
                    self(_pad_rows(example_x, size), _pad_rows(example_t, size),
                         None if example_cond is None else _pad_rows(example_cond, size))
