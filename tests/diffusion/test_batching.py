"""Mixed batches: rows at different steps, with different samplers, step counts, guidance and
seeds, stepped together through ONE forward pass per iteration, give the same results as each
row run alone. This is what the service's step-level batching relies on."""

import torch

from diffusion import SAMPLERS, DiffusionModel, Pipeline, get_sampler, make_schedule, model_config
from diffusion.samplers import cat_rows, take_rows
from diffusion.sampling import initial_noise, make_generators, run_to_end, step_groups
from tests.diffusion.gaussian import gaussian_eps_model

MNIST = tuple("zero one two three four five six seven eight nine".split())


def _row(name, sched, steps, seed, shape=(1, 4, 4), cond=None, **opts):
    gens = make_generators([seed], "cpu")
    x_T = initial_noise(gens, shape, "cpu")
    return get_sampler(name).init(sched, x_T, [steps], gens, cond=cond, **opts)


def _alone(name, sched, net, steps, seed, **opts):
    out = run_to_end({name: _row(name, sched, steps, seed, **opts)}, net, sched)
    return out[name].x[0]


def test_mixed_samplers_and_steps_match_alone():
    sched = make_schedule("cosine")
    oracle = gaussian_eps_model(sched, 0.2, 0.5)
    net = lambda x, t, c: oracle(x, t)  # noqa: E731
    specs = [("ddim", 7, 1, {}), ("ddim", 3, 2, {"eta": 1.0}), ("ddpm", 12, 3, {}), ("pndm", 15, 4, {}),
             ("heun", 6, 5, {"alpha": 0.7}), ("dpmpp_2m", 9, 6, {}), ("heun", 4, 7, {})]
    expected = [_alone(n, sched, net, s, seed, **o) for n, s, seed, o in specs]

    # All rows in one set of groups, joining at different iterations: rows 0-3 at once, the
    # rest two iterations later (so they sit at different steps in the same forward passes).
    def add(groups, n, st):
        groups[n] = cat_rows([groups[n], st]) if n in groups else st

    groups: dict = {}
    for n, s, seed, o in specs[:4]:
        add(groups, n, _row(n, sched, s, seed, **o))
    late = [(n, _row(n, sched, s, seed, **o)) for n, s, seed, o in specs[4:]]
    calls = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return net(x, t, c)

    for _ in range(2):
        groups = step_groups(groups, counting, sched)
    for n, st in late:
        add(groups, n, st)
    groups = run_to_end(groups, counting, sched)
    assert max(calls) > 4  # rows of several samplers shared forward passes

    # Gather every row's result in spec order: within a group, rows are in insertion order.
    seen = {n: 0 for n in SAMPLERS}
    for k, (n, s, seed, o) in enumerate(specs):
        got = groups[n].x[seen[n]]
        seen[n] += 1
        torch.testing.assert_close(got, expected[k], rtol=0, atol=0, msg=f"row {k} ({n})")


def test_take_rows_retires_and_keeps_the_rest_exact():
    sched = make_schedule("linear")
    oracle = gaussian_eps_model(sched, 0.0, 1.0)
    net = lambda x, t, c: oracle(x, t)  # noqa: E731
    a = _row("dpmpp_2m", sched, 5, 11)
    b = _row("dpmpp_2m", sched, 20, 12)
    groups = {"dpmpp_2m": cat_rows([a, b])}
    while not bool(get_sampler("dpmpp_2m").done(groups["dpmpp_2m"])[0]):
        groups = step_groups(groups, net, sched)
    finished = get_sampler("dpmpp_2m").done(groups["dpmpp_2m"])
    first = groups["dpmpp_2m"].x[0].clone()
    groups["dpmpp_2m"] = take_rows(groups["dpmpp_2m"], ~finished)  # retire row 0
    groups = run_to_end(groups, net, sched)
    torch.testing.assert_close(first, _alone("dpmpp_2m", sched, net, 5, 11), rtol=0, atol=0)
    torch.testing.assert_close(groups["dpmpp_2m"].x[0], _alone("dpmpp_2m", sched, net, 20, 12), rtol=0, atol=0)


def test_guidance_rows_share_one_forward_and_w0_skips_uncond():
    torch.manual_seed(0)
    model = DiffusionModel(model_config("tiny", (1, 8, 8), num_classes=3, class_names=("a", "b", "c")))
    with torch.no_grad():  # give the class embedding some influence
        model.class_embed.weight.mul_(50)
        for p in model.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pipe = Pipeline(model, "cpu")
    sizes = []

    def net(x, t, c):
        sizes.append(x.shape[0])
        return pipe.net(x, t, c)

    conds = [pipe.cond_vector(pipe.resolve(class_label=k)) for k in range(3)]
    rows = [("ddim", 0, 2.0), ("ddim", 1, 0.0), ("dpmpp_2m", 2, 4.0)]
    alone = []
    for n, k, w in rows:
        st = _row(n, pipe.schedule, 6, 100 + k, shape=(1, 8, 8), cond=conds[k].unsqueeze(0), guidance=w)
        alone.append(run_to_end({n: st}, pipe.net, pipe.schedule, "epsilon", pipe.null_cond)[n].x[0])
    groups = {}
    for n, k, w in rows:
        st = _row(n, pipe.schedule, 6, 100 + k, shape=(1, 8, 8), cond=conds[k].unsqueeze(0), guidance=w)
        groups[n] = cat_rows([groups[n], st]) if n in groups else st
    sizes.clear()
    groups = run_to_end(groups, net, pipe.schedule, "epsilon", pipe.null_cond)
    assert sizes[0] == 3 + 2  # three rows + the unconditional copies of the two guided rows
    torch.testing.assert_close(groups["ddim"].x[0], alone[0], atol=2e-3, rtol=0)  # batched-conv rounding; 1/255 of the [-1, 1] range is 7.8e-3
    torch.testing.assert_close(groups["ddim"].x[1], alone[1], atol=2e-3, rtol=0)  # batched-conv rounding; 1/255 of the [-1, 1] range is 7.8e-3
    torch.testing.assert_close(groups["dpmpp_2m"].x[0], alone[2], atol=2e-3, rtol=0)  # batched-conv rounding; 1/255 of the [-1, 1] range is 7.8e-3
    # guidance changes the result
    st = _row("ddim", pipe.schedule, 6, 100, shape=(1, 8, 8), cond=conds[0].unsqueeze(0), guidance=0.0)
    unguided = run_to_end({"ddim": st}, pipe.net, pipe.schedule, "epsilon", pipe.null_cond)["ddim"].x[0]
    assert not torch.allclose(unguided, alone[0], atol=1e-4)


def test_generate_rows_mixes_conditions_and_matches_each_alone():
    torch.manual_seed(0)
    model = DiffusionModel(model_config("tiny", (1, 8, 8), num_classes=3, class_names=("a", "b", "c")))
    with torch.no_grad():
        model.class_embed.weight.mul_(50)
        for p in model.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pipe = Pipeline(model, "cpu")
    conds = [pipe.resolve(class_label=k) for k in (2, 0, 2, 1)]
    seeds = [7, 8, 9, 10]
    rows = pipe.generate_rows(conds, seeds, scheduler="dpmpp_2m", steps=5, guidance=1.5, clip="none")
    for i, (c, s) in enumerate(zip(conds, seeds)):
        alone = pipe.generate_tensor(class_label=c.label, scheduler="dpmpp_2m", steps=5, guidance=1.5, seed=s,
                                     clip="none")[0]
        torch.testing.assert_close(rows[i], alone, atol=2e-3, rtol=0)  # batched-conv rounding, as above
    assert not torch.allclose(rows[0], rows[2], atol=1e-3)  # same class, other seed: another image
    try:
        pipe.generate_rows(conds, seeds[:2])
    except ValueError as e:
        assert "one seed per condition" in str(e)
    else:
        raise AssertionError("a seed list of the wrong length was accepted")
