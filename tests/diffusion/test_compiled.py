"""Bucketed compilation: padding to a bucket changes no row, and only bucket shapes reach the graph."""

import pytest
import torch

from diffusion import DiffusionModel, Pipeline, model_config
from diffusion.compiled import BucketedNet, power_of_two_buckets


def test_power_of_two_buckets():
    assert power_of_two_buckets(1) == (1,)
    assert power_of_two_buckets(8) == (1, 2, 4, 8)
    assert power_of_two_buckets(9) == (1, 2, 4, 8, 16)
    with pytest.raises(ValueError):
        power_of_two_buckets(0)


def test_bucket_choice_and_eager_fallback():
    seen = []

    def net(x, t, c):
        seen.append(x.shape[0])
        return x * 2

    b = BucketedNet(net, [4, 1, 2], backend="eager")
    assert b.buckets == (1, 2, 4)
    assert [b.bucket(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, None]
    x = torch.arange(3.0).view(3, 1, 1, 1)
    out = b(x, torch.zeros(3), None)
    assert seen == [4] and out.shape[0] == 3 and torch.equal(out, x * 2)  # padded to 4, cut back to 3
    b(torch.zeros(6, 1, 1, 1), torch.zeros(6), None)  # above the largest bucket: eager, unpadded
    assert seen[-1] == 6 and b.eager_calls == 1


@pytest.mark.parametrize("bad", [dict(buckets=[]), dict(buckets=[0, 2]), dict(buckets=[2], mode="fast")])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        BucketedNet(lambda x, t, c: x, **{"buckets": [1], **bad})


def test_pipeline_compiled_rows_match_eager():
    """A real tiny model: every batch size 1…8 through the padded, compiled path equals eager per row."""
    torch.manual_seed(0)
    model = DiffusionModel(model_config("tiny", (1, 8, 8), num_classes=3, class_names=("a", "b", "c")))
    pipe = Pipeline(model, "cpu")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (8,), generator=gen)
    cond = model.condition(labels=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    eager = pipe.net(x, t, cond)
    shapes = []
    original = pipe._eager_net

    def recording(x_, t_, c_):
        shapes.append(x_.shape[0])
        return original(x_, t_, c_)

    pipe._eager_net = recording
    pipe.compile(buckets=[2, 4, 8], backend="aot_eager")  # the graph path without a C++ compiler
    assert sorted(set(shapes)) == [2, 4, 8]  # warm-up traced every bucket
    for n in range(1, 9):
        out = pipe.net(x[:n], t[:n], cond[:n])
        assert out.shape == (n, 1, 8, 8)
        torch.testing.assert_close(out, eager[:n], rtol=1e-4, atol=1e-5)
