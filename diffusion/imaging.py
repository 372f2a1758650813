"""Turning model-space tensors ([-1, 1]) into images, PNG bytes and grids."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> uint8 [H, W] (grey) or [H, W, 3]."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(x))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """[N, C, H, W] -> one [C, H', W'] image tiled ``nrow`` per row, padded with -1 (black)."""
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    out = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), -1.0)
    for k in range(n):
        r, col = divmod(k, nrow)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[k].float().cpu()
    return out


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    to_pil(grid(x, nrow)).save(path)
