"""A fake model for engine tests: real schedule, samplers and pipeline, a network that records its batches."""

from __future__ import annotations

import threading

import torch
from torch import nn

from diffusion import Condition, ModelCard, Pipeline, make_schedule
from diffusion.models.card import PixelSpace


class FakeNet(PixelSpace, nn.Module):
    """ε(x, t, c) = 0.1·x behind the model interface: cheap and deterministic. Records the batch size
    of every forward pass; ``gate`` (if set) makes each forward pass wait for a permit."""

    def __init__(self, shape, num_timesteps, fail):
        super().__init__()
        self.card = ModelCard(image_shape=shape, schedule=make_schedule("linear", num_timesteps),
                              class_names=tuple(str(k) for k in range(10)), class_conditional=True, cond_dim=2,
                              guidable=True, default_steps=min(50, num_timesteps))
        self.batches: list[int] = []
        self.encoded: list[int] = []  # conditions per encoder call
        self.fail = fail
        self.gate: threading.Semaphore | None = None

    def forward(self, x, t, cond):
        if self.gate is not None:
            self.gate.acquire()
        self.batches.append(x.shape[0])
        if self.fail:
            raise RuntimeError("boom")
        return 0.1 * x

    def encode(self, conditions: list[Condition]) -> torch.Tensor:
        self.encoded.append(len(conditions))
        return torch.tensor([[float(c.label or 0), 1.0] for c in conditions])

    def null_condition(self) -> torch.Tensor:
        return torch.zeros(1, 2)

    def token_count(self, prompt: str) -> int:
        raise ValueError("no text")


class FakeModel(Pipeline):
    """A real :class:`diffusion.Pipeline` around :class:`FakeNet` (``batches``, ``fail`` and ``gate``
    are the network's)."""

    def __init__(self, name="fake", shape=(1, 4, 4), num_timesteps=1000, fail=False):
        super().__init__(FakeNet(shape, num_timesteps, fail), "cpu", name=name)

    @property
    def batches(self) -> list[int]:
        return self.model.batches

    @property
    def gate(self):
        return self.model.gate

    @gate.setter
    def gate(self, value):
        self.model.gate = value

    @property
    def fail(self):
        return self.model.fail

    @fail.setter
    def fail(self, value):
        self.model.fail = value
