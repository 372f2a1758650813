"""Format detection: which reader a path needs. The only place that knows the formats apart;
everything after it sees the model interface (:mod:`diffusion.models.card`).

- a file: this project's self-describing safetensors checkpoint (:mod:`diffusion.checkpoint`);
- a folder whose ``model_index.json`` names a VAE: a Stable Diffusion–family latent pipeline folder
  (:mod:`diffusion.sd_format`);
- another folder with ``model_index.json`` or ``config.json``: a pixel-space diffusers pipeline or
  model folder (:mod:`diffusion.diffusers_format`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffusion import checkpoint, diffusers_format, sd_format
from diffusion.checkpoint import CheckpointError
from diffusion.models.card import Model

FORMATS = ("diffusion-serve checkpoint (*.safetensors)", "diffusers pipeline folder (pixel or Stable Diffusion)",
           "diffusers model folder")


def is_model(path: Path) -> bool:
    """Whether ``path`` is something :func:`load_model` reads (by its layout, before reading it)."""
    return (path.is_file() and path.suffix == ".safetensors") or diffusers_format.is_model_folder(path)


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Model, dict]:
    """(model, provenance) of a checkpoint file or a diffusers folder; CheckpointError names what is wrong."""
    path = Path(path)
    if path.is_dir():
        if not diffusers_format.is_model_folder(path):
            raise CheckpointError(f"{path}: a folder, but neither a diffusers pipeline (model_index.json) nor a "
                                  "diffusers model (config.json)")
        if sd_format.is_latent_folder(path):
            return sd_format.load_folder(path, device)
        return diffusers_format.load_folder(path, device)
    return checkpoint.load_model(path, device)
