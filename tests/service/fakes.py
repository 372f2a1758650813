"""A fake model for engine tests: real schedule and samplers, a network that records its batches."""

from __future__ import annotations

import threading

import torch

from diffusion import Condition, make_schedule


class FakeModel:
    """ε(x, t, c) = 0.1·x: cheap and deterministic. Records the batch size of every forward pass;
    ``gate`` (if set) makes each forward pass wait for a permit, so a test can hold the engine."""

    def __init__(self, name="fake", shape=(1, 4, 4), num_timesteps=1000, fail=False):
        self.name = name
        self.device = torch.device("cpu")
        self.schedule = make_schedule("linear", num_timesteps)
        self.null_cond = torch.zeros(1, 2)
        self.cfg = type("Cfg", (), {"image_shape": shape, "prediction": "epsilon"})()
        self.batches: list[int] = []
        self.fail = fail
        self.gate: threading.Semaphore | None = None

    def cond_vector(self, condition: Condition) -> torch.Tensor:
        return torch.tensor([float(condition.label or 0), 1.0])

    def net(self, x, t, cond):
        if self.gate is not None:
            self.gate.acquire()
        self.batches.append(x.shape[0])
        if self.fail:
            raise RuntimeError("boom")
        return 0.1 * x
