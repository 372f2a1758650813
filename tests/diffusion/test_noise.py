"""Counter-based noise: standard normal, independent across elements, seeds and counters, a function
of (seed, counter) alone (batch-invariant), and the same numbers on every device."""

import math

import pytest
import torch

from diffusion.noise import gaussian, hash32, step_counter


def test_hash_is_a_32_bit_bijection_on_a_sample_and_avalanches():
    x = torch.arange(1 << 16, dtype=torch.long) * 65537
    h = hash32(x)
    assert int(h.min()) >= 0 and int(h.max()) < 2**32 and h.unique().numel() == x.numel()
    flipped = hash32(x ^ 1)  # one input bit: about half the output bits change
    bits = bin_count(h ^ flipped)
    assert 15.5 < bits.mean().item() < 16.5


def bin_count(v: torch.Tensor) -> torch.Tensor:
    return sum(((v >> k) & 1) for k in range(32)).double()


def test_standard_normal_moments_and_tails():
    z = gaussian(torch.arange(2000), torch.zeros(2000, dtype=torch.long), (1, 16, 16)).flatten().double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(((z - z.mean()) ** 3).mean().item()) < 5 * math.sqrt(15 / n)  # skewness ~ 0
    assert abs(((z - z.mean()) ** 4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # kurtosis ~ 3
    for k, p in ((1, 0.6827), (2, 0.9545), (3, 0.9973)):  # the share within k standard deviations
        assert abs((z.abs() < k).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def _corr(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_no_correlation_across_elements_seeds_counters_or_box_muller_pairs():
    seeds = torch.arange(1000)
    z = gaussian(seeds, torch.zeros(1000, dtype=torch.long), (64,))
    limit = 5 / math.sqrt(z.numel())
    assert abs(_corr(z[:, :-1], z[:, 1:])) < limit  # neighbours (the two halves of a Box–Muller pair)
    assert abs(_corr(z[:, 0::2] ** 2, z[:, 1::2] ** 2)) < limit  # pairs share a radius: still independent
    assert abs(_corr(z[:-1], z[1:])) < limit  # consecutive seeds
    later = gaussian(seeds, torch.ones(1000, dtype=torch.long), (64,))
    assert abs(_corr(z, later)) < limit  # consecutive counters (steps)
    assert abs(_corr(z, gaussian(seeds + 2**32, torch.zeros(1000, dtype=torch.long), (64,)))) < limit  # high bits


def test_a_row_depends_on_its_seed_and_counter_only():
    alone = gaussian(torch.tensor([123]), torch.tensor([7]), (3, 8, 8))
    crowd = gaussian(torch.tensor([5, 123, 9, 123]), torch.tensor([7, 7, 7, 8]), (3, 8, 8))
    assert torch.equal(crowd[1], alone[0]) and not torch.equal(crowd[3], alone[0])
    assert step_counter(torch.tensor([0, 1]), 0).tolist() == [1, 9]  # never 0, x_T's counter


def test_pinned_values():
    """The numbers are part of the contract (a seed names an image): a change here is a breaking change."""
    z = gaussian(torch.tensor([0, 2**53]), torch.tensor([0, 3]), (4,))
    expected = torch.tensor([[1.152127, -0.810325, 0.962827, -0.080064], [-0.965322, 1.561905, -1.439429, -1.003609]])
    torch.testing.assert_close(z, expected, rtol=0, atol=2e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_same_numbers_on_the_gpu():
    seeds, counters = torch.arange(64) * 977, torch.arange(64) % 5
    cpu = gaussian(seeds, counters, (3, 32, 32))
    gpu = gaussian(seeds.cuda(), counters.cuda(), (3, 32, 32)).cpu()
    assert (cpu - gpu).abs().max().item() <= 1e-6
