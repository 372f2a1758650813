"""Turning model-space tensors ([-1, 1]) into images, PNG bytes and grids, and given images and masks
into model-space tensors.

The rule for a given image of another size or mode (:func:`image_tensor`): converted to the model's
mode (L for one channel, RGB for three; an alpha channel is dropped, not composited), centre-cropped
to the model's aspect ratio, then resized to its size with Lanczos filtering. A mask
(:func:`mask_tensor`) repaints where its alpha is 0 when it has an alpha channel (OpenAI's
convention) and where it is white (grey level ≥ 128) when it has none (diffusers' and A1111's); it is
cropped like the image and resized with nearest-neighbour sampling, so it stays binary."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> uint8 [H, W] (grey) or [H, W, 3]. In NumPy, so that the threads that
    encode images never start an OpenMP pool (service/engine/threads.py says why that matters)."""
    arr = x.detach().float().cpu().numpy()
    arr = np.rint((np.clip(arr, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(x))


def _fit(img: Image.Image, height: int, width: int, resample) -> Image.Image:
    """Centre-crop to the aspect ratio width:height, then resize to (width, height)."""
    w, h = img.size
    if w * height != h * width:  # crop the longer side
        if w * height > h * width:
            cw = max(1, round(h * width / height))
            img = img.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
        else:
            ch = max(1, round(w * height / width))
            img = img.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
    return img if img.size == (width, height) else img.resize((width, height), resample)


def image_tensor(img: Image.Image, shape: tuple[int, int, int]) -> torch.Tensor:
    """A given image as the model's input [C, H, W] in [-1, 1] (the module's rule)."""
    c, h, w = shape
    img = _fit(img.convert("L" if c == 1 else "RGB"), h, w, Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)  # NumPy: see to_uint8
    arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def mask_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Where to repaint, [1, H, W] with 1 to repaint and 0 to keep (the module's rule); ``size`` is (H, W)."""
    if has_alpha(img):
        repaint = np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., 3] == 0
    else:
        repaint = np.asarray(img.convert("L"), dtype=np.uint8) >= 128
    binary = Image.fromarray(repaint.astype(np.uint8) * 255)
    out = np.asarray(_fit(binary, size[0], size[1], Image.Resampling.NEAREST), dtype=np.uint8) >= 128
    return torch.from_numpy(out.astype(np.float32)[None])


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """[N, C, H, W] -> one [C, H', W'] image tiled ``nrow`` per row, padded with -1 (black). (NumPy, as to_uint8.)"""
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    src = x.detach().float().cpu().numpy()
    out = np.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), -1.0, dtype=np.float32)
    for k in range(n):
        r, col = divmod(k, nrow)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = src[k]
    return torch.from_numpy(out)


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    to_pil(grid(x, nrow)).save(path)
