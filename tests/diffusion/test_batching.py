"""Mixed batches: rows at different steps, with different samplers, step counts, guidance and
seeds, stepped together through ONE forward pass per iteration by a :class:`diffusion.Runner`, give
the same results as each row run alone. This is what the service's step-level batching relies on."""

import pytest
import torch

from diffusion import SAMPLERS, DiffusionModel, Pipeline, RowRequest, Runner, make_schedule, model_config, sample
from diffusion.step import done
from tests.diffusion.gaussian import gaussian_eps_model

SPECS = [("ddim", 7, 1, {}), ("ddim", 3, 2, {"eta": 1.0}), ("ddpm", 12, 3, {}), ("pndm", 15, 4, {}),
         ("heun", 6, 5, {"alpha": 0.7}), ("dpmpp_2m", 9, 6, {}), ("heun", 4, 7, {}), ("ddpm", 5, 8, {"variance": "beta"})]


def _oracle_runner(sched, capacity, calls=None):
    oracle = gaussian_eps_model(sched, 0.2, 0.5)

    def net(x, t, c):
        if calls is not None:
            calls.append(x.shape[0])
        return oracle(x, t)
    return Runner(net, sched, "epsilon", None, (1, 4, 4), capacity=capacity, max_steps=20, device="cpu")


def _alone(sched, name, steps, seed, opts):
    return sample(gaussian_eps_model(sched, 0.2, 0.5), sched, (1, 1, 4, 4), name, steps, seed=[seed], **opts)[0]


def test_mixed_samplers_and_steps_match_alone_exactly():
    sched = make_schedule("cosine")
    expected = [_alone(sched, n, s, seed, o) for n, s, seed, o in SPECS]
    calls = []
    runner = _oracle_runner(sched, 8, calls)
    got, handles = {}, {}
    # rows 0-3 at once, the rest two iterations later (so they sit at different steps in the same passes)
    for k, (n, s, seed, o) in enumerate(SPECS[:4]):
        handles[runner.add([RowRequest(n, s, seed, options=o)])[0]] = k
    for _ in range(2):
        assert runner.step() == []
    for k, (n, s, seed, o) in enumerate(SPECS[4:], start=4):
        handles[runner.add([RowRequest(n, s, seed, options=o)])[0]] = k
    while len(runner):
        finished = runner.step()
        if finished:
            got.update(zip((handles[h] for h in finished), runner.take(finished)))
    assert max(calls) == len(SPECS) and calls[:3] == [4, 4, 8]  # one pass per iteration, all rows in it
    for k in range(len(SPECS)):
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=f"row {k} ({SPECS[k][0]})")


def test_rows_leaving_from_the_middle_keep_the_others_exact():
    """take() and remove() move the last rows into the freed slots: nobody notices."""
    sched = make_schedule("linear")
    runner = _oracle_runner(sched, 4)
    specs = [("dpmpp_2m", 5, 11, {}), ("pndm", 20, 12, {}), ("heun", 9, 13, {}), ("ddpm", 20, 14, {})]
    h = runner.add([RowRequest(n, s, seed, options=o) for n, s, seed, o in specs])
    got = {}
    while len(runner):
        finished = runner.step()
        if runner.iterations == 3:
            runner.remove([h[2]])  # a cancelled request leaves from the middle
        if finished:
            got.update(zip(finished, runner.take(finished)))
    assert set(got) == {h[0], h[1], h[3]}
    for k in (0, 1, 3):
        n, s, seed, o = specs[k]
        torch.testing.assert_close(got[h[k]], _alone(sched, n, s, seed, o), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("spacing", [None, "trailing", "leading", "linspace", "karras"])
def test_the_host_count_of_evaluations_matches_the_device_done_flags(name, spacing):
    """The engine never reads the device to learn that a row is done: it counts evaluations."""
    sched = make_schedule("cosine")
    runner = _oracle_runner(sched, 12)
    steps = [s for s in range(1, 13) if s >= SAMPLERS[name].min_steps]
    handles = runner.add([RowRequest(name, s, s, spacing=spacing) for s in steps])
    for it in range(1, 2 * max(steps)):
        flags = done(runner.table.view(len(runner))).tolist()
        for h, flag in zip(handles, flags):
            if h in runner.table._slot:
                assert not flag, (name, it)
        finished = set(runner.step())
        state = runner.table.view(len(runner))
        for h in finished:
            assert bool(done(state)[runner.table._slot[h]]), (name, spacing, it)
            assert runner.table.progress(h) == (it, SAMPLERS[name].evaluations(steps[handles.index(h)]))
        if finished:
            runner.take(list(finished))
        if not len(runner):
            break
    assert not len(runner)


def _tiny_pipeline():
    torch.manual_seed(0)
    model = DiffusionModel(model_config("tiny", (1, 8, 8), num_classes=3, class_names=("a", "b", "c")))
    with torch.no_grad():  # give the class embedding some influence
        model.class_embed.weight.mul_(50)
        for p in model.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return Pipeline(model, "cpu")


def test_guided_rows_share_one_forward_pass_and_w0_is_plain_conditional():
    pipe = _tiny_pipeline()
    sizes = []

    def net(x, t, c):
        sizes.append(x.shape[0])
        return pipe.net(x, t, c)

    rows = [pipe.row_request(pipe.resolve(class_label=k), 100 + k, sched, 6, guidance=w, clip="none")
            for k, sched, w in [(0, "ddim", 2.0), (1, "ddim", 0.0), (2, "dpmpp_2m", 4.0)]]
    alone = []
    for r in rows:
        runner = pipe.runner(1, 6)
        alone.append(runner.run_to_end(runner.add([r]))[0])
    runner = Runner(net, pipe.schedule, "epsilon", pipe.null_cond, (1, 8, 8), capacity=3, max_steps=6, device="cpu")
    out = runner.run_to_end(runner.add(rows))
    assert sizes[0] == 2 * 3  # three rows + the unconditional copies, in one pass
    for k in range(3):  # batched-conv rounding; 1/255 of the [-1, 1] range is 7.8e-3
        torch.testing.assert_close(out[k], alone[k], atol=2e-3, rtol=0)
    # w = 0: the conditional ε alone, the same as a batch with no guided row at all
    sizes.clear()
    runner = Runner(net, pipe.schedule, "epsilon", pipe.null_cond, (1, 8, 8), capacity=1, max_steps=6, device="cpu")
    plain = runner.run_to_end(runner.add([rows[1]]))[0]
    assert sizes[0] == 1
    torch.testing.assert_close(plain, out[1], atol=2e-3, rtol=0)
    assert not torch.allclose(out[0], pipe.generate_tensor(class_label=0, scheduler="ddim", steps=6, seed=100,
                                                           guidance=0.0, clip="none")[0], atol=1e-4)


def test_generate_rows_mixes_conditions_and_matches_each_alone():
    pipe = _tiny_pipeline()
    conds = [pipe.resolve(class_label=k) for k in (2, 0, 2, 1)]
    seeds = [7, 8, 9, 10]
    rows = pipe.generate_rows(conds, seeds, scheduler="dpmpp_2m", steps=5, guidance=1.5, clip="none")
    for i, (c, s) in enumerate(zip(conds, seeds)):
        alone = pipe.generate_tensor(class_label=c.label, scheduler="dpmpp_2m", steps=5, guidance=1.5, seed=s,
                                     clip="none")[0]
        torch.testing.assert_close(rows[i], alone, atol=2e-3, rtol=0)  # batched-conv rounding, as above
    assert not torch.allclose(rows[0], rows[2], atol=1e-3)  # same class, other seed: another image
    with pytest.raises(ValueError, match="one seed per condition"):
        pipe.generate_rows(conds, seeds[:2])


def test_a_full_runner_refuses_rows_and_invalid_rows_change_nothing():
    sched = make_schedule("linear")
    runner = _oracle_runner(sched, 2)
    runner.add([RowRequest("ddim", 5, 0)])
    with pytest.raises(ValueError, match="do not fit"):
        runner.add([RowRequest("ddim", 5, 1), RowRequest("ddim", 5, 2)])
    with pytest.raises(ValueError, match="limit of 20"):
        runner.add([RowRequest("ddim", 30, 1)])
    with pytest.raises(ValueError, match="alpha"):
        runner.add([RowRequest("heun", 5, 1, options={"alpha": 0.0})])
    assert len(runner) == 1


def test_urgent_rows_go_in_front_and_a_limited_step_pauses_bulk_rows_only():
    """Priority-0 rows are kept in the first slots, so step(limit) runs a smaller batch that holds
    all of them; bulk rows beyond the limit wait unchanged. Every row still ends exactly as alone."""
    sched = make_schedule("cosine")
    calls = []
    runner = _oracle_runner(sched, 8, calls)
    bulk = runner.add([RowRequest(n, s, seed, options=o) for n, s, seed, o in SPECS[:5]])
    runner.step()
    urgent = runner.add([RowRequest(n, s, seed, options=o) for n, s, seed, o in SPECS[5:]], priority=0)
    assert [runner.table.rows[j].handle for j in range(3)] == urgent  # moved to the front
    assert runner.table.urgent == 3
    before = runner.table.state.x[3:5].clone()
    x_rows = {r.handle: j for j, r in enumerate(runner.table.rows)}
    runner.step(limit=2)  # the 3 urgent rows only (the limit never excludes an urgent row)
    assert calls[-1] == 3
    paused = [h for h in bulk if x_rows[h] >= 3]
    assert all(runner.table.progress(h)[0] == 1 for h in paused)  # only the first step counted
    torch.testing.assert_close(runner.table.state.x[3:5], before, rtol=0, atol=0)
    runner.step(limit=5)
    assert calls[-1] == 5
    got = {}
    while len(runner):
        finished = runner.step(limit=4)
        if finished:
            got.update(zip(finished, runner.take(finished)))
        assert runner.table.rows[:runner.table.urgent] == [r for r in runner.table.rows if r.priority == 0]
    for h, (n, s, seed, o) in zip(bulk + urgent, SPECS):
        torch.testing.assert_close(got[h], _alone(sched, n, s, seed, o), rtol=0, atol=0)
