"""The condition cache: new conditions encoded together in one call, vectors kept within a byte
bound, least recently used first out; and negative prompts on this project's own text model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import diffusion
from diffusion import Condition
from diffusion.conditions import ConditionCache


def _encoder(dim=10, calls=None):
    def encode(keys):
        if calls is not None:
            calls.append(list(keys))
        return torch.stack([torch.full((dim,), float(k)) for k in keys])
    return encode


def test_new_conditions_are_encoded_in_one_batch_and_cached():
    calls = []
    cache = ConditionCache(_encoder(calls=calls), max_bytes=10_000)
    got = cache.fill([1, 2, 1, 3])
    assert calls == [[1, 2, 3]] and float(got[3][0]) == 3.0
    cache.fill([2, 3, 4])
    assert calls == [[1, 2, 3], [4]]  # only the new one
    assert float(cache.get(1)[0]) == 1.0 and len(calls) == 2
    assert cache.bytes == 4 * 10 * 4 and cache.hits == 4 and cache.misses == 4


def test_the_bound_is_in_bytes_and_least_recently_used_go_first():
    cache = ConditionCache(_encoder(dim=25), max_bytes=300)  # a vector is 100 bytes: three fit
    cache.fill([1, 2, 3])
    cache.get(1)  # 1 is now the most recent
    cache.fill([4])
    assert 2 not in cache and {1, 3, 4} <= {k for k in (1, 3, 4) if k in cache} and cache.bytes == 300
    big = ConditionCache(_encoder(dim=1000), max_bytes=300)
    assert big.get(7).shape == (1000,) and len(big) == 0 and big.bytes == 0  # too large to keep, still answered


def test_a_cached_vector_does_not_hold_its_batch():
    cache = ConditionCache(_encoder(dim=1000), max_bytes=10**6)
    cache.fill(list(range(8)))
    assert cache.get(3).untyped_storage().nbytes() == 4000


@pytest.fixture(scope="module")
def text_pipe():
    """The default model (a trained text model): an untrained one barely reads its conditioning."""
    path = Path(__file__).resolve().parents[2] / "checkpoints" / "mnist-text-compact.safetensors"
    return diffusion.load(str(path), "cpu")


def test_negative_prompt_on_our_text_model(text_pipe):
    """The empty negative prompt is the null condition itself (the same image); another changes it."""
    base = dict(prompt="seven", steps=4, guidance=3.0, seed=1)
    plain = text_pipe.generate_tensor(**base)
    torch.testing.assert_close(text_pipe.generate_tensor(negative_prompt="", **base), plain, rtol=0, atol=0)
    assert not torch.allclose(text_pipe.generate_tensor(negative_prompt="3", **base), plain)
    assert text_pipe.card.negative_prompts
    with pytest.raises(Exception, match="at most"):
        text_pipe.negative("word " * 40)


def test_batched_encoding_equals_one_at_a_time(text_pipe):
    conds = [Condition(None, "three"), Condition(None, "nine"), Condition(None, None), Condition(None, "")]
    batched = text_pipe.model.encode(conds)
    for k, c in enumerate(conds):
        torch.testing.assert_close(batched[k], text_pipe.model.encode([c])[0], rtol=1e-5, atol=1e-6)
