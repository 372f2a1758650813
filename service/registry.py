"""The models the service serves: every checkpoint in one directory, loaded onto one device."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import diffusion
from diffusion import Pipeline

log = logging.getLogger("service.registry")

PREFERRED_DEFAULT = "mnist-text-compact"


class NoCheckpoints(RuntimeError):
    """The checkpoint directory holds nothing to serve."""


def find_checkpoints(directory: Path) -> list[Path]:
    """The ``*.safetensors`` files directly in ``directory``, by name; a clear error when there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NoCheckpoints(f"checkpoint directory {directory.resolve()} does not exist "
                            "(set --checkpoint-dir / DIFFUSION_CHECKPOINT_DIR)")
    paths = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if not paths:
        raise NoCheckpoints(f"no *.safetensors checkpoint in {directory.resolve()} "
                            "(train one with `python -m training` or point --checkpoint-dir at a directory that has one)")
    return paths


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {setting!r} requested but CUDA is not available")
    return device


class ModelRegistry:
    """name (the checkpoint's file stem) -> loaded :class:`diffusion.Pipeline`, plus the default name."""

    def __init__(self, pipelines: dict[str, Pipeline], default: str):
        if default not in pipelines:
            raise ValueError(f"default model {default!r} is not among {sorted(pipelines)}")
        self.pipelines, self.default = pipelines, default

    @classmethod
    def load(cls, directory: Path, device: torch.device, default: str | None = None) -> "ModelRegistry":
        pipelines = {}
        for path in find_checkpoints(directory):
            pipe = diffusion.load(str(path), device)  # CheckpointError names the bad file
            pipelines[pipe.name] = pipe
            log.info("loaded model %s (%s, %s) on %s", pipe.name, pipe.cfg.conditioning,
                     "x".join(map(str, pipe.cfg.image_shape)), device)
        if default is None:
            default = PREFERRED_DEFAULT if PREFERRED_DEFAULT in pipelines else next(iter(pipelines))
        return cls(pipelines, default)

    def __contains__(self, name: str) -> bool:
        return name in self.pipelines

    def __getitem__(self, name: str) -> Pipeline:
        return self.pipelines[name]

    def names(self) -> list[str]:
        return list(self.pipelines)
