"""What the deployment tests share: a tiny checkpoint, free ports, waiting for and stopping processes."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``check()`` until it returns a truthy value; fail with the process log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            result = check()
            if result:
                return result
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    state = f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None else "timed out"
    pytest.fail(f"{what}: {state}\n{tail}")


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_checkpoint(directory: Path) -> str:
    """A tiny class-conditional model, saved the way training saves one. Returns its file stem."""
    import torch

    from diffusion.checkpoint import save
    from diffusion.models.model import DiffusionModel, model_config

    torch.manual_seed(0)
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    cfg = model_config("tiny", (1, 16, 16), num_classes=10, class_names=names, num_timesteps=100, default_steps=4)
    save(DiffusionModel(cfg).eval(), directory / "tiny-digits.safetensors", provenance={"purpose": "tests/deploy"})
    return "tiny-digits"
