"""Classifier-free guidance and x̂0 thresholding, per row, in fixed shapes.

- Guidance (Ho & Salimans 2022): ε̄ = (1 + w)·ε(x, t, y) − w·ε(x, t, ∅), computed as
  ε_c + w·(ε_c − ε_u), w per row. Conditional and unconditional evaluations share ONE forward pass:
  with ``guided`` on, the batch is the rows followed by the same rows under their unconditional
  vector (2B rows; a row with w = 0 gets ε̄ = ε(x, t, y) exactly); with it off (no row is guided), the
  B rows alone. No shape depends on tensor values. The unconditional vector is per row: the model's
  null condition, or the row's negative prompt in its place (so rows with and without one share the
  pass). diffusers' ``guidance_scale`` s is ε_u + s·(ε_c − ε_u), that is w = s − 1.
- Thresholding of the implied x̂0 = (x_t − sqrt(1−ᾱ)·ε̄)/sqrt(ᾱ), after which ε̄ is re-derived from
  the thresholded x̂0 so that every sampler sees a plain ε:
    "static":  clamp x̂0 to [−1, 1];
    "dynamic": Imagen (Saharia et al. 2022): s = max(1, percentile p of |x̂0| per sample),
               x̂0 ← clamp(x̂0, −s, s)/s.
  The percentile needs a per-row sort, so it is computed only when the caller says a row of the
  batch may use it (``dynamic``); static clipping is a clamp and always applied by mask.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from diffusion.prediction import eps_to_x0, to_eps_x0, x0_to_eps
from diffusion.schedules import Schedule, gather_alpha_bar

CLIP_MODES = ("none", "static", "dynamic")

# net(x, t, cond) -> raw network output
Net = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class Denoised(NamedTuple):
    """What one evaluation tells every row's sampler."""
    eps: torch.Tensor  # ε̄ consistent with x0: (x_t − sqrt(ᾱ)·x0)/sqrt(1−ᾱ) (re-derived where x̂0 was thresholded)
    x0: torch.Tensor  # the (guided, thresholded) prediction x̂0
    eps_model: torch.Tensor  # the guided ε̄ before thresholding (diffusers' DDIM steps with it)


def clip_code(mode: str | None) -> int:
    mode = mode or "none"
    if mode not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {mode!r}")
    return CLIP_MODES.index(mode)


def threshold_x0(x0: torch.Tensor, clip: torch.Tensor, pct: torch.Tensor, dynamic: bool,
                 clip_range: float = 1.0) -> torch.Tensor:
    """Each row's x̂0 thresholded by its mode (0 none, 1 static: clamped to [−r, r] with r the
    model's ``clip_range``, 2 dynamic)."""
    shape = (-1, *([1] * (x0.ndim - 1)))
    s = torch.ones_like(pct)
    if dynamic:
        flat = x0.abs().flatten(1)
        k = (pct.clamp(0, 1) * (flat.shape[1] - 1)).round().long().unsqueeze(1)
        q = flat.sort(dim=1).values.gather(1, k).squeeze(1).clamp(min=1.0)
        s = torch.where(clip == 2, q.to(s.dtype), s)
    s = s.to(x0.dtype).reshape(shape)
    clipped = torch.maximum(torch.minimum(x0, s), -s) / s
    if clip_range != 1.0:
        clipped = torch.where((clip == 1).reshape(shape), x0.clamp(-clip_range, clip_range), clipped)
    return torch.where((clip > 0).reshape(shape), clipped, x0)


def net_inputs(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, uncond: torch.Tensor | None,
               guided: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The forward pass's batch: the rows, then (``guided``) the same rows under their own
    unconditional vector ``uncond`` ([B, D]: the null condition, or a row's negative prompt; a [1, D]
    vector serves every row)."""
    if not guided:
        return x, t, cond
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond.to(cond.dtype).expand(x.shape[0], -1)])


def combine(out_c: torch.Tensor, out_u: torch.Tensor, x: torch.Tensor, t: torch.Tensor, schedule: Schedule,
            prediction: str, w: torch.Tensor, clip: torch.Tensor, pct: torch.Tensor, *,
            dynamic: bool, clip_range: float = 1.0) -> Denoised:
    """(ε̄, x̂0, ε̄ before thresholding) per row from the network's conditional and unconditional
    outputs (pass the conditional output twice when no row is guided: ε̄ = ε_c + w·(ε_c − ε_u) is
    then exactly ε_c)."""
    ab = gather_alpha_bar(schedule, t, x.ndim).to(x.dtype)
    eps_c, x0_c = to_eps_x0(prediction, out_c.to(x.dtype), x, ab)
    eps_u, x0_u = to_eps_x0(prediction, out_u.to(x.dtype), x, ab)
    w = w.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    eps = eps_c + w * (eps_c - eps_u)
    # x̂0 is affine in ε (x̂0 = (x − sqrt(1−ᾱ)·ε)/sqrt(ᾱ)), so guiding it is guiding ε; for ε-models this
    # is that formula itself, bit for bit, and v- and x0-models keep their well-conditioned x̂0
    x0 = eps_to_x0(eps, x, ab) if prediction == "epsilon" else x0_c + w * (x0_c - x0_u)
    x0_t = threshold_x0(x0, clip, pct, dynamic, clip_range)
    clipped = (clip > 0).reshape(-1, *([1] * (x.ndim - 1)))
    return Denoised(torch.where(clipped, x0_to_eps(x0_t, x, ab), eps), x0_t, eps)


def split(out: torch.Tensor, rows: int, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditional and unconditional halves of a forward pass over :func:`net_inputs`'s batch."""
    return (out[:rows], out[rows:]) if guided else (out, out)


def guided_eps(net: Net, schedule: Schedule, prediction: str, x: torch.Tensor, t: torch.Tensor,
               cond: torch.Tensor | None, uncond: torch.Tensor | None, w: torch.Tensor, clip: torch.Tensor,
               pct: torch.Tensor, *, guided: bool, dynamic: bool) -> Denoised:
    """:class:`Denoised` for every row from one forward pass of ``net``; ``guided`` needs ``cond`` and ``uncond``."""
    out_c, out_u = split(net(*net_inputs(x, t, cond, uncond, guided)), x.shape[0], guided)
    return combine(out_c, out_u, x, t, schedule, prediction, w, clip, pct, dynamic=dynamic)
