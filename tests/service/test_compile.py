"""The acceleration settings: validated, mapped onto the runner's Acceleration per device, and an
engine whose models are compiled at warm-up gives the same images as an eager one."""

import pytest
import torch
from pydantic import ValidationError

from diffusion import Acceleration
from service.engine import Engine, GenerationSpec


def test_acceleration_settings(make_settings):
    s = make_settings()
    assert s.compile == "off" and not s.cuda_graphs
    assert s.buckets() == [1, 2, 4, 8, 16, 32, 64]  # rows; guided rows double the network's batch inside
    assert not s.acceleration("cpu").padded
    s = make_settings(compile="Max-Autotune-No-Cudagraphs", compile_buckets="8, 2,4,4", max_batch_rows=8)
    assert s.acceleration("cuda") == Acceleration(compile="max-autotune-no-cudagraphs", buckets=(2, 4, 8))
    s = make_settings(compile="reduce-overhead", device="auto")  # the old spelling: compile + CUDA graphs
    assert s.acceleration("cuda").cuda_graphs and s.acceleration("cuda").compile == "default"
    assert not s.acceleration("cpu").cuda_graphs  # never on a CPU
    for bad in (dict(compile="fast"), dict(compile="max-autotune"), dict(compile_buckets="0,4"),
                dict(compile_buckets="a"), dict(cuda_graphs=True, device="cpu")):
        with pytest.raises(ValidationError):
            make_settings(**bad)


def test_a_compiled_engine_matches_the_eager_one(pipelines):
    pipe = pipelines["tiny-digits"]
    specs = [GenerationSpec("tiny-digits", pipe.resolve(class_label=3), "dpmpp_2m", 3, 2.0, (5, 6, 7)),
             GenerationSpec("tiny-digits", pipe.resolve(class_label=1), "ddim", 4, 0.0, (8,), clip="dynamic")]
    images = []
    for accel in (Acceleration(), Acceleration(compile="default", backend="aot_eager", buckets=(4,))):
        eng = Engine({"tiny-digits": pipe}, max_rows=4, accel=accel)
        eng.warm_up()
        jobs = [eng.submit(s, 60) for s in specs]
        while not all(j.future.done() for j in jobs):
            eng.iterate()
        images.append(torch.cat([j.future.result().images for j in jobs]))
        assert eng.batches["tiny-digits"].runner.buckets == ((4,) if accel.padded else (1, 2, 4))
    torch.testing.assert_close(images[1], images[0], rtol=1e-4, atol=1e-4)
