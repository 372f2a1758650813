"""The --compile option: validated settings, and a registry that compiles every model's buckets at load."""

import pytest
import torch
from pydantic import ValidationError

from service.registry import ModelRegistry
from service.settings import Settings


def test_compile_settings(make_settings):
    s = make_settings()
    assert s.compile == "off"
    assert s.buckets() == [1, 2, 4, 8, 16, 32, 64, 128]  # guided rows double the batch of max_batch_rows=64
    s = make_settings(compile="Reduce-Overhead", compile_buckets="8, 2,4,4", max_batch_rows=8)
    assert s.compile == "reduce-overhead" and s.buckets() == [2, 4, 8]
    for bad in (dict(compile="fast"), dict(compile_buckets="0,4"), dict(compile_buckets="a")):
        with pytest.raises(ValidationError):
            make_settings(**bad)


def test_registry_compiles_each_model(checkpoint_dir):
    eager = ModelRegistry.load(checkpoint_dir, torch.device("cpu"))
    reg = ModelRegistry.load(checkpoint_dir, torch.device("cpu"), compile="default", buckets=[2, 4],
                             compile_backend="aot_eager")  # inductor needs a C++ toolchain; same graph path
    for name in reg.names():
        assert reg[name]._bucketed is not None and reg[name]._bucketed.buckets == (2, 4)
        assert eager[name]._bucketed is None
        img = reg[name].generate_tensor(class_label=3, steps=3, seed=5, num_images=3)  # 3 rows, guided: 6 -> eager
        ref = eager[name].generate_tensor(class_label=3, steps=3, seed=5, num_images=3)
        torch.testing.assert_close(img, ref, rtol=1e-4, atol=1e-4)
        one = reg[name].generate_tensor(class_label=3, steps=3, seed=5, num_images=1, guidance=0.0)  # bucket 2
        torch.testing.assert_close(one, eager[name].generate_tensor(class_label=3, steps=3, seed=5, num_images=1,
                                                                    guidance=0.0), rtol=1e-4, atol=1e-4)
