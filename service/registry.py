"""The models the service serves: every model directly in one directory, loaded onto one device:
this project's ``*.safetensors`` checkpoints (named by file stem) and diffusers pipeline or model
folders (named by folder; pixel-space: :mod:`diffusion.diffusers_format`, Stable Diffusion family:
:mod:`diffusion.sd_format`). Other files and folders are ignored; a well-formed folder of a kind that
is not served (a ControlNet or Flux pipeline, an inpainting UNet: :class:`diffusion.UnsupportedModel`)
is skipped with a logged warning, while a broken file (truncated, mismatched) stops the start-up,
naming it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import diffusion
from diffusion import Pipeline, UnsupportedModel
from diffusion.loading import is_model

log = logging.getLogger("service.registry")

PREFERRED_DEFAULT = "mnist-text-compact"


class NoCheckpoints(RuntimeError):
    """The checkpoint directory holds nothing to serve."""


def model_name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def find_checkpoints(directory: Path) -> list[Path]:
    """The models directly in ``directory`` (``*.safetensors`` files and diffusers folders), by name; a
    clear error when there are none or two share a name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NoCheckpoints(f"checkpoint directory {directory.resolve()} does not exist "
                            "(set --checkpoint-dir / DIFFUSION_CHECKPOINT_DIR)")
    paths = sorted((p for p in directory.iterdir() if is_model(p)), key=lambda p: (model_name(p), p.name))
    if not paths:
        raise NoCheckpoints(f"no *.safetensors checkpoint nor diffusers model folder in {directory.resolve()} "
                            "(train one with `python -m training` or point --checkpoint-dir at a directory that has one)")
    names = [model_name(p) for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise NoCheckpoints(f"two models in {directory.resolve()} share the name {twice[0]!r} (a file and a folder)")
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
    def load(cls, directory: Path, device: torch.device, default: str | None = None,
             condition_cache_bytes: int = 256 * 2**20) -> "ModelRegistry":
        pipelines = {}
        for path in find_checkpoints(directory):
            try:
                pipe = diffusion.load(str(path), device, condition_cache_bytes=condition_cache_bytes)
            except UnsupportedModel as e:  # a kind of model this service does not serve: skipped, said why
                log.warning("skipping %s: %s", path, e)
                continue
            # any other CheckpointError (a truncated or mismatched file) names the file and stops the start
            pipelines[pipe.name] = pipe
            log.info("loaded model %s (%s, %s, %s, %d parameters) on %s", pipe.name, pipe.card.source,
                     pipe.card.conditioning, "x".join(map(str, pipe.card.image_shape)), pipe.card.parameters, device)
        if not pipelines:
            raise NoCheckpoints(f"no model in {Path(directory).resolve()} can be served (see the warnings above)")
        if default is None:
            default = PREFERRED_DEFAULT if PREFERRED_DEFAULT in pipelines else next(iter(pipelines))
        return cls(pipelines, default)

    def __contains__(self, name: str) -> bool:
        return name in self.pipelines

    def __getitem__(self, name: str) -> Pipeline:
        return self.pipelines[name]

    def names(self) -> list[str]:
        return list(self.pipelines)
