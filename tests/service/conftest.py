"""Tiny real checkpoints (random weights: the API does not care what they draw) and app fixtures."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

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


@pytest.fixture
def gate(monkeypatch):
    """Cleared: the engine's forward passes wait (rows stay in flight, deterministically)."""
    opened = threading.Event()
    opened.set()
    net = diffusion.Pipeline.net

    def gated(self, x, t, cond):
        if threading.current_thread().name == "diffusion-engine":
            assert opened.wait(60), "the test never opened the gate"
        return net(self, x, t, cond)
    monkeypatch.setattr(diffusion.Pipeline, "net", gated)
    return opened


@contextmanager
def live_server(settings: Settings):
    """The app served by a real uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    from service.api import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None, access_log=False,
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the live server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
