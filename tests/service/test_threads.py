"""The engine's CPU thread count: one thread for an iteration below the measured crossover, every
core above it, a fixed number when configured; set on the engine's own thread only."""

from __future__ import annotations

import threading

import torch

from diffusion import Condition
from service.engine import Engine, GenerationSpec
from service.engine.threads import PARALLEL_FLOPS, CpuThreads, flops_per_row


def test_auto_is_one_thread_below_the_crossover_and_every_core_above():
    threads = CpuThreads("auto", per_row=PARALLEL_FLOPS / 10, cores=4)
    assert [threads.count(n) for n in (1, 9, 10, 64)] == [1, 1, 4, 4]
    assert CpuThreads("3", per_row=1.0, cores=4).count(1) == 3


def test_flops_are_counted_from_one_forward_pass(pipelines):
    pipe = pipelines["tiny-digits"]
    per_row = flops_per_row(pipe.net, pipe.card.image_shape, pipe.null_cond, torch.device("cpu"))
    assert per_row > 1e5  # a real count, and it scales with the rows by construction
    x = torch.zeros(2, *pipe.card.image_shape)
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        pipe.net(x, torch.zeros(2, dtype=torch.long), pipe.null_cond.expand(2, -1))
    assert fc.get_total_flops() == 2 * per_row


def _threads_during_iterations(pipe, setting, rows):
    """The engine thread's intra-op count while it runs a request of ``rows`` images (and the caller's after)."""
    seen = {}

    def run():
        torch.set_num_threads(2)
        eng = Engine({"m": pipe}, cpu_threads=setting)
        job = eng.submit(GenerationSpec("m", Condition(1, None), "ddim", 3, 2.0, tuple(range(rows))), 60)
        eng.iterate()
        seen["engine"] = torch.get_num_threads()
        while not job.future.done():
            eng.iterate()
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return seen["engine"]


def test_the_engine_sets_its_own_threads_and_nobody_elses(pipelines):
    pipe = pipelines["tiny-digits"]
    before = torch.get_num_threads()
    assert _threads_during_iterations(pipe, "auto", 1) == 1  # a tiny model: always below the crossover
    assert _threads_during_iterations(pipe, "2", 1) == 2
    assert torch.get_num_threads() == before  # per thread: the caller's count is untouched
