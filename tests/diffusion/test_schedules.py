import math

import pytest
import torch

from diffusion.schedules import (gather_alpha_bar, gather_sigma, karras_timesteps, make_schedule,
                                 sampling_timesteps, sigma_to_t)


def test_linear_matches_ddpm():
    s = make_schedule("linear", 1000)
    assert s.betas.shape == (1000,) and s.alphas_cumprod.shape == (1000,)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(s.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))


def test_cosine_matches_formula():
    T, eps = 1000, 0.008
    s = make_schedule("cosine", T)
    f = lambda t: math.cos(((t / T + eps) / (1 + eps)) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 500, 900, 990):  # the paper's t; our index is t - 1
        assert s.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
        beta = min(1 - (f(t) / f(0)) / (f(t - 1) / f(0)), 0.999)
        assert s.betas[t - 1].item() == pytest.approx(beta, rel=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)  # the clip bites at the end
    assert bool((s.betas > 0).all()) and bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())


def test_unknown_kind_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("quadratic")


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_spacings(spacing):
    for S in (1, 2, 10, 50, 999, 1000):
        ts = sampling_timesteps(1000, S, spacing)
        assert len(ts) == S and all(a > b for a, b in zip(ts, ts[1:])) and 0 <= min(ts) and max(ts) <= 999
    assert sampling_timesteps(1000, 1000, spacing) == list(range(999, -1, -1))


def test_spacing_conventions():
    assert sampling_timesteps(1000, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert sampling_timesteps(1000, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert sampling_timesteps(1000, 4, "linspace") == [999, 666, 333, 0]
    with pytest.raises(ValueError):
        sampling_timesteps(1000, 0)
    with pytest.raises(ValueError):
        sampling_timesteps(1000, 1001)


def test_karras_grid():
    s = make_schedule("linear")
    ts = karras_timesteps(s, 20)
    assert len(ts) == 20 and all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] == 0
    assert s.sigmas[ts[0]].item() == pytest.approx(80, rel=0.05)  # EDM's σ_max
    assert ts == sampling_timesteps(1000, 20, "karras", s)


def test_gather_per_row_and_clean_end():
    s = make_schedule("linear")
    t = torch.tensor([0, 999, -1, 500])
    ab = gather_alpha_bar(s, t, 4)
    assert ab.shape == (4, 1, 1, 1)
    assert ab[2].item() == 1.0 and ab[1].item() == pytest.approx(s.alphas_cumprod[999].item())
    assert gather_sigma(s, t, 2)[2].item() == 0.0
    assert sigma_to_t(s, s.sigmas[[3, 400, 999]]).tolist() == [3, 400, 999]
