"""Finished images (model-space tensors) to what the API returns: PNG bytes, base64, a grid."""

from __future__ import annotations

import base64

import torch

from diffusion.imaging import grid, png_bytes, to_pil


def pngs(images: torch.Tensor) -> list[bytes]:
    return [png_bytes(to_pil(x)) for x in images]


def b64_pngs(images: torch.Tensor) -> list[str]:
    return [base64.b64encode(p).decode("ascii") for p in pngs(images)]


def grid_png(images: torch.Tensor) -> bytes:
    """One PNG: the image itself, or a grid of them."""
    return png_bytes(to_pil(images[0] if len(images) == 1 else grid(images)))
