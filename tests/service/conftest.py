"""Tiny real checkpoints (random weights: the API does not care what they draw) and app fixtures."""

from __future__ import annotations

import pytest
import torch

import diffusion
from service.settings import Settings

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """A class-conditional model and a text model, 16x16, T = 100, saved as training saves them."""
    d = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    common = dict(num_classes=10, class_names=DIGITS, num_timesteps=100, default_steps=4)
    diffusion.save(diffusion.DiffusionModel(diffusion.model_config("tiny", (1, 16, 16), **common)),
                   d / "tiny-digits.safetensors")
    diffusion.save(diffusion.DiffusionModel(diffusion.model_config(
        "tiny", (1, 16, 16), text=diffusion.TextEncoderConfig(context_length=8), **common)),
        d / "tiny-text.safetensors")
    return d


@pytest.fixture(scope="session")
def pipelines(checkpoint_dir):
    return {p.stem: diffusion.load(str(p), "cpu") for p in sorted(checkpoint_dir.glob("*.safetensors"))}


@pytest.fixture
def make_settings(checkpoint_dir):
    def make(**kw) -> Settings:
        return Settings(**{"checkpoint_dir": checkpoint_dir, "device": "cpu", "default_model": "tiny-digits", **kw})
    return make
