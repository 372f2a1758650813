"""One conformance suite over every registered sampler, driven by the exact ε of Gaussian data.

For x0 ~ N(μ, s²) the exact ε-predictor is known (tests/diffusion/gaussian.py), and so is where the
probability-flow ODE takes each starting sample (:func:`exact_flow`). So the deterministic samplers
(ddim, pndm, heun, dpmpp_2m) are checked path by path against that exact map, from the same
starting noise: their error is pure discretisation error, with no sampling error in it. The
ancestral samplers (ddpm, ddim η > 0) are checked in distribution, on enough numbers (64,000) that
the sampling error of the spread is under 0.3 %."""

import pytest
import torch

from diffusion import SAMPLERS, make_schedule, sample
from tests.diffusion.gaussian import gaussian_eps_model
from tests.diffusion.gaussian import path_error as gaussian_path_error

MU, S = 0.5, 0.3
SHAPE = (500, 1, 4, 4)  # 8000 numbers
DETERMINISTIC = ("ddim", "pndm", "heun", "dpmpp_2m")

# Tolerance on the RMS distance to the exact ODE sample, relative to s, at 50 steps, above the errors
# measured (cosine: ddim 4.6 %, pndm 0.16 %, heun 0.27 %, dpmpp_2m 0.03 %; linear: ddim 8.8 %,
# pndm 0.62 %, heun 0.22 %, dpmpp_2m 1.6 %; heun with its default α = ¾; α = ½ 0.05-0.09 %, α = 1 0.6 %).
# DDIM is first order; the others are second order or more.
PATH_TOL_50 = {
    "cosine": {"ddim": 0.055, "pndm": 0.01, "heun": 0.01, "dpmpp_2m": 0.005},
    "linear": {"ddim": 0.10, "pndm": 0.01, "heun": 0.01, "dpmpp_2m": 0.02},
}
# Ancestral sampling with σ² = β̃ under-disperses at 50 steps (measured -9.5 % cosine, -15.8 % linear;
# within 3 % at 1000 steps, below).
SPREAD_TOL_ANCESTRAL_50 = {"cosine": 0.11, "linear": 0.18}


def _moments(x):
    return x.mean().item(), x.std().item()


def path_error(schedule, name, steps, n=500, **opts):
    """RMS distance / s between the sampler's output and the exact ODE map of the same noise."""
    return gaussian_path_error(schedule, MU, S, name, steps, n, **opts)


@pytest.fixture(scope="module", params=["cosine", "linear"])
def schedule(request):
    return make_schedule(request.param, 1000)


def test_registry_has_the_five():
    assert set(SAMPLERS) == {"ddpm", "ddim", "pndm", "heun", "dpmpp_2m"}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_follow_the_exact_ode_at_50_steps(name, schedule):
    err = path_error(schedule, name, 50)
    assert err < PATH_TOL_50[schedule.kind][name], (name, err)


@pytest.mark.parametrize("name,opts", [("ddpm", {}), ("ddim", {"eta": 1.0})])
def test_ancestral_samplers_in_distribution_at_50_steps(name, opts, schedule):
    x = sample(gaussian_eps_model(schedule, MU, S), schedule, (4000, 1, 4, 4), name, 50, seed=0, **opts)
    mean, std = _moments(x)
    assert abs(mean - MU) < 0.005, (name, mean)
    assert abs(std / S - 1) < SPREAD_TOL_ANCESTRAL_50[schedule.kind], (name, std)


def test_ddpm_full_1000_steps():
    sch = make_schedule("linear", 1000)
    x = sample(gaussian_eps_model(sch, MU, S), sch, (400, 1, 4, 4), sampler="ddpm", steps=1000, seed=1)
    mean, std = _moments(x)
    assert abs(mean - MU) < 0.02 and abs(std / S - 1) < 0.03, (mean, std)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_error_shrinks_with_steps(name):
    """Deterministic solvers converge to the probability-flow ODE's exact answer."""
    sch = make_schedule("linear", 1000)
    errs = [path_error(sch, name, steps, n=100) for steps in (10, 50, 200)]
    assert errs[2] < errs[1] < errs[0] or errs[2] < 0.003, errs
    assert errs[2] < 0.025, errs


def test_ddim_eta_one_is_ddpm_on_the_subset():
    sch = make_schedule("cosine")
    a = sample(gaussian_eps_model(sch, MU, S), sch, (8, 1, 4, 4), "ddim", 20, seed=5, eta=1.0)
    b = sample(gaussian_eps_model(sch, MU, S), sch, (8, 1, 4, 4), "ddpm", 20, seed=5)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_any_step_count_runs_and_is_finite(name, steps, schedule):
    x = sample(gaussian_eps_model(schedule, MU, S), schedule, (16, 1, 2, 2), name, steps, seed=0)
    assert torch.isfinite(x).all()
    assert abs(x.mean().item() - MU) < 0.5  # no exceptions since issue 14 (tests/diffusion/test_few_steps.py)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_nfe_matches_model_calls(name):
    sch = make_schedule("linear")
    calls = []
    model = gaussian_eps_model(sch, MU, S)

    def counting(x, t):
        calls.append(1)
        return model(x, t)

    for steps in (1, 2, 3, 5, 20):
        calls.clear()
        sample(counting, sch, (2, 1, 2, 2), name, steps, seed=0)
        assert len(calls) == SAMPLERS[name].evaluations(steps), (name, steps)


def test_same_seed_same_sample_different_seed_differs():
    sch = make_schedule("linear")
    m = gaussian_eps_model(sch, MU, S)
    a = sample(m, sch, (2, 1, 4, 4), "ddpm", 10, seed=7)
    b = sample(m, sch, (2, 1, 4, 4), "ddpm", 10, seed=7)
    c = sample(m, sch, (2, 1, 4, 4), "ddpm", 10, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # row k uses seed + k: row 1 of seed 7 is row 0 of seed 8
    assert torch.equal(a[1], c[0])


def test_heun_alpha_half_is_midpoint_and_valid():
    sch = make_schedule("cosine")
    assert path_error(sch, "heun", 50, alpha=0.5) < 0.03
    with pytest.raises(ValueError):
        sample(gaussian_eps_model(sch, MU, S), sch, (2, 1, 2, 2), "heun", 5, alpha=0.0)


def test_static_clipping_bounds_the_prediction():
    """With x̂0 clipped to [-1, 1] at every step, data far outside ends up inside [-1, 1]."""
    sch = make_schedule("linear")
    m = gaussian_eps_model(sch, 3.0, 0.1)  # data around 3, far outside [-1, 1]
    x = sample(m, sch, (16, 1, 2, 2), "ddim", 20, seed=0, clip="static")
    assert x.max().item() <= 1.0 + 1e-4
    free = sample(m, sch, (16, 1, 2, 2), "ddim", 20, seed=0)
    assert free.mean().item() > 2.5


def test_dynamic_thresholding_keeps_in_range_data():
    sch = make_schedule("cosine")
    m = gaussian_eps_model(sch, 0.0, 0.3)
    x = sample(m, sch, (16, 1, 4, 4), "ddim", 30, seed=0, clip="dynamic", percentile=0.995)
    assert x.abs().max().item() <= 1.0 + 1e-4
    y = sample(gaussian_eps_model(sch, 3.0, 0.1), sch, (16, 1, 4, 4), "ddim", 30, seed=0, clip="dynamic")
    assert y.abs().max().item() <= 1.0 + 1e-4  # saturated data is rescaled into [-1, 1]
