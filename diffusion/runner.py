"""Rows of one model stepped together: a :class:`~diffusion.table.RowTable` plus the way each
iteration runs (eager, compiled, or replayed as a CUDA graph).

Every caller shares this path: :func:`diffusion.sample`, :meth:`diffusion.Pipeline.generate_rows`
and the service's engine. One :meth:`Runner.step` is ONE forward pass over every row in flight,
whatever their samplers, steps, guidance and conditions, followed by every row's sampler update,
with no host synchronisation: the host picks the variant from what it knows of the rows (their
count, whether any is guided or thresholds dynamically) and counts evaluations down to know which
rows are done.

- Eager (the default; the CPU's): the iteration runs over exactly the rows in flight and computes
  only the samplers they use.
- ``compile``: the network and the sampler math go through ``torch.compile`` with a dynamic batch
  dimension (compiled once, not per size), and the batch is padded to a bucket size.
- ``cuda_graphs``: at :meth:`Runner.warm_up` every (bucket, guided, dynamic) variant of the whole
  iteration (sampler math, noise, guidance, edits and network together) is captured as one CUDA graph
  over the table's fixed buffers; a step is then one graph replay.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffusion.graphs import CudaGraphs
from diffusion.guidance import Net, combine, split
from diffusion.schedules import Schedule
from diffusion.step import ALL_KINDS, advance, is_guided, prepare
from diffusion.table import RowRequest, RowTable

log = logging.getLogger("diffusion.runner")

# torch.compile modes; those that record CUDA graphs of their own ("reduce-overhead", "max-autotune")
# are left out: the runner captures the whole iteration itself (cuda_graphs).
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")


def power_of_two_buckets(largest: int) -> tuple[int, ...]:
    """1, 2, 4, … up to ``largest`` (which is always the last bucket)."""
    if largest < 1:
        raise ValueError(f"largest bucket must be >= 1, got {largest}")
    sizes, s = [], 1
    while s < largest:
        sizes.append(s)
        s *= 2
    return (*sizes, largest)


@dataclass(frozen=True)
class Acceleration:
    """How a runner executes its iterations (see the module docstring)."""
    compile: str = "off"  # torch.compile mode for the network and the sampler math, or "off"
    cuda_graphs: bool = False  # capture every bucket's iteration at warm-up (CUDA only)
    buckets: tuple[int, ...] = ()  # padded row counts; default powers of two up to the capacity
    backend: str = "inductor"

    def __post_init__(self):
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if any(b < 1 for b in self.buckets):
            raise ValueError(f"bucket sizes must be >= 1, got {list(self.buckets)}")

    @property
    def padded(self) -> bool:
        return self.compile != "off" or self.cuda_graphs


class Runner:
    def __init__(self, net: Net, schedule: Schedule, prediction: str, null_cond: torch.Tensor | None,
                 image_shape: Sequence[int], *, capacity: int, max_steps: int, device: torch.device | str,
                 accel: Acceleration = Acceleration(), capturer=None, cond_dim: int | None = None,
                 clip_range: float = 1.0):
        """``cond_dim``: the length of a conditioning vector (default: the null condition's; give it
        for a conditional model that has no null condition), ``clip_range``: static clipping's bound."""
        self.device = torch.device(device)
        if accel.cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.net, self.prediction, self.accel, self.clip_range = net, prediction, accel, float(clip_range)
        self.schedule = schedule.to(self.device)
        self.null_cond = None if null_cond is None else null_cond.to(self.device)
        if cond_dim is None and null_cond is not None:
            cond_dim = int(null_cond.shape[-1])
        self.table = RowTable(capacity, image_shape, max_steps, schedule, cond_dim, self.device,
                              null_cond=self.null_cond)
        wanted = accel.buckets or power_of_two_buckets(capacity)
        self.buckets = tuple(sorted({min(int(b), capacity) for b in wanted} | {capacity}))
        self.iterations = 0
        # Three compiled pieces around the network, so that the host-side variants (guided, dynamic)
        # recompile only small functions: the sampler updates (the big one) compile once.
        self._net, self._prepare, self._combine, self._advance = net, prepare, combine, advance
        if accel.compile != "off":
            # Dynamo caches compilations per code object, shared by every runner of the process: each
            # model shape and host-side variant is one entry, more than its default limit of 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            opts = {"mode": accel.compile} if accel.backend == "inductor" else {}
            fn = lambda f, full=True: torch.compile(f, fullgraph=full, dynamic=True, backend=accel.backend, **opts)  # noqa: E731
            self._net = fn(net, full=False)
            self._prepare, self._combine, self._advance = fn(prepare), fn(combine), fn(advance)
        self.graphs: dict[tuple[int, bool, bool], object] = {}  # variant -> replay()
        # capture(fn) -> replay callable; a test may hand in its own to exercise the graph path on a CPU
        self.capturer = capturer if capturer is not None else (CudaGraphs(self.device) if accel.cuda_graphs else None)
        self.padded = accel.padded or self.capturer is not None

    # --- rows ---------------------------------------------------------------------------------
    def add(self, rows: Sequence[RowRequest], priority: int = 1) -> list[int]:
        return self.table.add(rows, priority)

    def take(self, handles: Sequence[int]) -> torch.Tensor:
        return self.table.take(handles)

    def remove(self, handles: Sequence[int]) -> None:
        self.table.remove(handles)

    def __len__(self) -> int:
        return len(self.table)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    # --- iterations ---------------------------------------------------------------------------
    def _run(self, b: int, *, kinds: tuple[int, ...], guided: bool, dynamic: bool, noise: bool, edit: bool) -> None:
        state = self.table.view(b)
        guided = is_guided(state, self.null_cond, guided)
        x_in, t_in, x_all, t_all, c_all = self._prepare(self.schedule, state, self.null_cond, kinds=kinds,
                                                        guided=guided)
        out_c, out_u = split(self._net(x_all, t_all, c_all), b, guided)
        d = self._combine(out_c, out_u, x_in, t_in, self.schedule, self.prediction, state.w, state.clip, state.pct,
                          dynamic=dynamic, clip_range=self.clip_range)
        self.table.write(b, self._advance(self.schedule, state, d, kinds=kinds, noise=noise, edit=edit))

    def step(self, limit: int | None = None) -> list[int]:
        """One iteration; the handles of the rows it finished. Every row in flight is stepped, or,
        with ``limit``, the priority-0 rows and bulk rows up to ``limit`` rows in all (the rest wait,
        unchanged: a smaller batch is a faster iteration for the latency-sensitive rows)."""
        n = len(self.table)
        if n == 0:
            return []
        stepped = n if not limit else min(n, max(limit, self.table.urgent))
        if not self.padded:
            self._run(stepped, **self.table.flags(stepped))
            b = stepped
        else:
            b = self.bucket(stepped)
            flags = self.table.flags(b)
            replay = self.graphs.get((b, flags["guided"], flags["dynamic"]))
            if replay is not None:
                replay()
            else:
                self._run(b, kinds=ALL_KINDS, guided=flags["guided"], dynamic=flags["dynamic"], noise=True, edit=True)
        self.iterations += 1
        return self.table.advance(b)

    @property
    def can_guide(self) -> bool:
        """Whether an iteration may be guided (the model has a null condition)."""
        return self.null_cond is not None and self.table.state.uncond is not None

    @torch.no_grad()
    def run_inert(self, b: int, guided: bool) -> None:
        """One iteration over the first ``b`` slots of an empty table (inert: nothing changes), as a
        batch of that size would run it (its CUDA graph replayed where captured): for timing it."""
        if len(self.table):
            raise RuntimeError("an inert iteration needs the empty table")
        replay = self.graphs.get((b, guided, False))
        if replay is not None:
            replay()
        else:
            self._run(b, kinds=ALL_KINDS, guided=guided, dynamic=False, noise=True, edit=True)

    def variants(self) -> list[tuple[int, bool, bool]]:
        """(bucket, guided, dynamic) of every iteration a padded runner may run."""
        guided = (False, True) if self.null_cond is not None else (False,)
        return [(b, g, d) for b in self.buckets for g in guided for d in (False, True)]

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile every variant (and capture its CUDA graph) now, before any request: on the empty
        table, where every slot is inert, so running the iteration changes no row."""
        if not self.padded:
            return
        if len(self.table):
            raise RuntimeError("warm up a runner before adding rows")
        for b, guided, dynamic in self.variants():
            kw = dict(kinds=ALL_KINDS, guided=guided, dynamic=dynamic, noise=True, edit=True)
            if self.capturer is None:
                self._run(b, **kw)
            else:
                self.graphs[(b, guided, dynamic)] = self.capturer.capture(lambda b=b, kw=kw: self._run(b, **kw))
        if self.capturer is not None:
            self.capturer.synchronize()
        log.info("runner warmed up: %d variants over buckets %s (compile=%s, cuda_graphs=%s)",
                 len(self.variants()), self.buckets, self.accel.compile, self.accel.cuda_graphs)

    def run_to_end(self, handles: Sequence[int]) -> torch.Tensor:
        """Step until these rows, the only ones in flight, are done; their samples, in order."""
        if len(self.table) != len(handles):
            raise RuntimeError("run_to_end needs the runner to itself; drive a shared runner with step()")
        got: dict[int, torch.Tensor] = {}
        while len(self.table):
            finished = self.step()
            if finished:
                got.update(zip(finished, self.take(finished)))
        return torch.stack([got[h] for h in handles])
