"""The steady-state iteration is GPU-shaped: no host synchronisation, fixed shapes, compilable.

Host syncs are counted with torch.profiler as the ops that read a tensor's value into Python
(``aten::_local_scalar_dense``: ``.item()``, ``bool()``, ``int()``) or make a shape depend on values
(``aten::nonzero``: boolean indexing). On a GPU each one drains the stream."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from diffusion import SAMPLERS, Acceleration, DiffusionModel, Pipeline, RowRequest, Runner, make_schedule, model_config
from diffusion.step import iterate

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")
CASES = [("ddim", {}, "none"), ("ddim", {"eta": 0.5}, "none"), ("ddpm", {}, "none"), ("pndm", {}, "none"),
         ("heun", {}, "none"), ("dpmpp_2m", {}, "none"), ("ddim", {}, "dynamic"), ("dpmpp_2m", {}, "static")]


def syncs(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in SYNC_OPS)


def _oracle_net(sched):
    ab_all = sched.alphas_cumprod

    def net(x, t, c):  # the exact ε of N(0.2, 0.5²) data, without the checking oracle's asserts
        ab = ab_all[t].reshape(-1, 1, 1, 1).to(x.dtype)
        return (1 - ab).sqrt() * (x - ab.sqrt() * 0.2) / (ab * 0.25 + 1 - ab)
    return net


def _tiny_pipeline():
    torch.manual_seed(0)
    model = DiffusionModel(model_config("tiny", (1, 8, 8), num_classes=3, class_names=("a", "b", "c")))
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return Pipeline(model, "cpu")


def _join_one_by_one(runner, rows):
    """Add the rows one per iteration, run to the end, and return their images in row order."""
    got, handles = {}, {}
    for k, r in enumerate(rows):
        handles[runner.add([r])[0]] = k
        finished = runner.step()
        got.update(zip((handles[h] for h in finished), runner.take(finished)))
    while len(runner):
        finished = runner.step()
        got.update(zip((handles[h] for h in finished), runner.take(finished)))
    return torch.stack([got[k] for k in range(len(rows))])


@pytest.mark.parametrize("name,opts,clip", CASES)
def test_no_host_sync_in_the_steady_state_and_at_most_one_per_evaluation_overall(name, opts, clip):
    sched = make_schedule("cosine")
    runner = Runner(_oracle_net(sched), sched, "epsilon", None, (1, 4, 4), capacity=4, max_steps=12, device="cpu")
    evaluations = SAMPLERS[name].evaluations(12)
    admitted = syncs(lambda: runner.add([RowRequest(name, 12, k, clip=clip, options=opts) for k in range(4)]))
    steady = syncs(lambda: [runner.step() for _ in range(evaluations - 1)])
    assert steady == 0, (name, opts, clip)
    finished = []
    last = syncs(lambda: finished.extend(runner.step()))
    taken = syncs(lambda: runner.take(finished))
    assert len(finished) == 4 and last == 0
    assert admitted + taken <= evaluations, (admitted, taken)


def test_no_host_sync_with_guidance_through_a_real_network():
    pipe = _tiny_pipeline()
    runner = pipe.runner(6, 10)
    conds = [pipe.resolve(class_label=k) for k in range(3)]
    rows = [pipe.row_request(conds[k % 3], k, s, 10, guidance=[0.0, 2.0, 5.0][k % 3], clip=c)
            for k, (s, c) in enumerate([("ddim", "static"), ("heun", "dynamic"), ("pndm", "none"),
                                         ("dpmpp_2m", "none"), ("ddpm", "static"), ("ddim", "none")])]
    runner.add(rows)
    assert syncs(lambda: [runner.step() for _ in range(8)]) == 0


def test_the_iteration_compiles_fullgraph_and_matches_eager_per_row():
    """torch.compile(fullgraph=True) over the whole iteration, network included, for a batch that
    mixes every sampler, guidance and thresholding mode: no graph break, the same rows as eager."""
    pipe = _tiny_pipeline()
    conds = [pipe.resolve(class_label=k) for k in range(3)]
    rows = [pipe.row_request(conds[k % 3], 40 + k, name, 7, guidance=[0.0, 1.5, 3.0][k % 3], clip=clip, **opts)
            for k, (name, opts, clip) in enumerate(CASES)]
    assert_compiled_iteration_matches_eager(pipe, rows, max_steps=7, iterations=5)


def assert_compiled_iteration_matches_eager(pipe, rows, max_steps: int, iterations: int) -> None:
    """``iterate`` and ``torch.compile(iterate, fullgraph=True)`` over the same rows give the same states."""
    compiled = torch.compile(iterate, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (iterate, compiled):
        runner = pipe.runner(len(rows), max_steps)
        runner.add(rows)
        for _ in range(iterations):
            state = runner.table.view(len(runner))
            runner.table.write(len(runner), fn(state, pipe.net, pipe.schedule, "epsilon", pipe.null_cond))
        results.append(runner.table.state.x.clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_a_compiled_padded_runner_matches_the_eager_one():
    """Acceleration(compile=...): network and sampler math compiled once with a dynamic batch, rows
    padded to buckets (1, 2, 4, 8 here); every row equals the eager runner's."""
    pipe = _tiny_pipeline()
    rows = [pipe.row_request(pipe.resolve(class_label=k % 3), 70 + k, name, 5, guidance=float(k % 2) * 2, clip=clip,
                             **opts) for k, (name, opts, clip) in enumerate(CASES[:6])]
    outs = []
    for accel in (Acceleration(), Acceleration(compile="default", backend="aot_eager", buckets=(2, 4, 8))):
        runner = pipe.runner(8, 5, accel)
        runner.warm_up()
        # stepped without autograd, as the service's executor steps (and as warm_up compiled): with grad mode on,
        # dynamo would recompile every piece once more (its guards include the grad mode), doubling the test's time
        with torch.no_grad():
            outs.append(_join_one_by_one(runner, rows))  # batches 1..6 run padded to 2, 4, 8
    assert runner.buckets == (2, 4, 8)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


class ReplayingCapturer:
    """Stands in for CUDA graphs on a CPU: capture() runs the function twice (the warm-up) and hands
    back a replay that runs it again over the same buffers. It checks the runner's graph bookkeeping
    (every variant captured on an empty table, the right one replayed, rows admitted between
    replays seen by the next one), not the CUDA mechanics."""

    def __init__(self):
        self.captured, self.replays = [], []

    def capture(self, fn):
        fn(), fn()
        key = len(self.captured)
        self.captured.append(fn)

        def replay():
            self.replays.append(key)
            fn()
        return replay

    def synchronize(self):
        pass


def test_the_graph_path_replays_one_captured_variant_per_iteration_and_matches_eager():
    pipe = _tiny_pipeline()
    rows = [pipe.row_request(pipe.resolve(class_label=k % 3), 90 + k, name, 5, guidance=[0.0, 2.0][k % 2], clip=clip,
                             **opts) for k, (name, opts, clip) in enumerate(CASES)]
    eager = pipe.runner(8, 5)
    expected = eager.run_to_end(eager.add(rows))
    fake = ReplayingCapturer()
    runner = Runner(pipe.net, pipe.schedule, "epsilon", pipe.null_cond, (1, 8, 8), capacity=8, max_steps=5,
                    device="cpu", accel=Acceleration(buckets=(2, 4, 8)), capturer=fake)
    runner.warm_up()
    assert len(fake.captured) == len(runner.variants()) == 3 * 2 * 2
    assert not runner.table.state.x.abs().sum()  # warm-up on the empty table changed no row
    got = _join_one_by_one(runner, rows)
    assert len(fake.replays) == runner.iterations  # every iteration was a replay
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
