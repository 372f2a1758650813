"""Capturing a function as a CUDA graph, the way :class:`diffusion.Runner` does it for each variant
of its iteration.

A captured graph replays the same kernels on the same addresses: every tensor the function reads
or writes must live at a fixed address (the runner's table buffers), and nothing may reach the host
inside it. Before capturing, the function runs a few times on a side stream (compilation, cuBLAS /
cuDNN autotuning and the caching allocator all settle there, outside the capture); the graphs share
one memory pool, which is safe because they are replayed one at a time on one stream and keep no
output in the pool (results are copied into the table's own buffers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CudaGraphs:
    """Captures functions as CUDA graphs on one device; ``capture(fn)`` returns a replay callable."""

    def __init__(self, device: torch.device, warmup_runs: int = 2):
        self.device = device
        self.warmup_runs = warmup_runs
        self._pool = None

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a model loaded while the service runs is captured on the loader's thread, beside
        # the engine's thread replaying other graphs (a global capture would fail their synchronisations)
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            fn()
        return graph.replay

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)
