"""Classifier-free guidance and x̂0 thresholding, per row.

- Guidance (Ho & Salimans 2022): ε̄ = (1 + w)·ε(x, t, y) − w·ε(x, t, ∅), w per row. Conditional
  and unconditional evaluations share ONE forward pass: rows with w > 0 are repeated once with the
  null condition appended to the batch; rows with w = 0 are evaluated once.
- Thresholding of the implied x̂0 = (x_t − sqrt(1−ᾱ)·ε̄)/sqrt(ᾱ), after which ε̄ is re-derived from
  the thresholded x̂0 so that every sampler sees a plain ε:
    "static":  clamp x̂0 to [−1, 1];
    "dynamic": Imagen (Saharia et al. 2022): s = max(1, percentile p of |x̂0| per sample),
               x̂0 ← clamp(x̂0, −s, s)/s.
"""

from __future__ import annotations

from typing import Callable

import torch

from diffusion.prediction import eps_to_x0, to_eps, x0_to_eps
from diffusion.schedules import Schedule, gather_alpha_bar

CLIP_MODES = ("none", "static", "dynamic")

# net(x, t, cond) -> raw network output
Net = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def clip_code(mode: str | None) -> int:
    mode = mode or "none"
    if mode not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {mode!r}")
    return CLIP_MODES.index(mode)


def threshold_eps(eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor, schedule: Schedule,
                  clip: torch.Tensor, pct: torch.Tensor) -> torch.Tensor:
    """Apply each row's x̂0 thresholding (0 none, 1 static, 2 dynamic) and return the implied ε."""
    if clip is None or not bool((clip > 0).any()):
        return eps
    ab = gather_alpha_bar(schedule, t, x.ndim).to(x.dtype)
    x0 = eps_to_x0(eps, x, ab)
    flat = x0.abs().flatten(1)
    k = (pct.clamp(0, 1) * (flat.shape[1] - 1)).round().long().unsqueeze(1)
    s = flat.sort(dim=1).values.gather(1, k).squeeze(1).clamp(min=1.0)
    s = torch.where(clip == 2, s, torch.ones_like(s)).reshape(-1, *([1] * (x.ndim - 1)))
    x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    return torch.where((clip > 0).reshape(s.shape), x0_to_eps(x0, x, ab), eps)


def guided_eps(net: Net, schedule: Schedule, prediction: str, x: torch.Tensor, t: torch.Tensor,
               cond: torch.Tensor | None, null_cond: torch.Tensor | None, w: torch.Tensor | None,
               clip: torch.Tensor | None = None, pct: torch.Tensor | None = None) -> torch.Tensor:
    """ε̄ for every row, from one forward pass of ``net``."""
    b = x.shape[0]
    g = (w > 0).nonzero().flatten() if (w is not None and cond is not None and null_cond is not None) else None
    if g is not None and g.numel() > 0:
        x_all = torch.cat([x, x[g]])
        t_all = torch.cat([t, t[g]])
        c_all = torch.cat([cond, null_cond.to(cond.dtype).expand(g.numel(), -1)])
    else:
        x_all, t_all, c_all = x, t, cond
    out = net(x_all, t_all, c_all).to(x.dtype)
    eps_all = to_eps(prediction, out, x_all, gather_alpha_bar(schedule, t_all, x.ndim).to(x.dtype))
    eps = eps_all[:b]
    if g is not None and g.numel() > 0:
        wg = w[g].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        eps = eps.index_copy(0, g, (1 + wg) * eps[g] - wg * eps_all[b:])
    return threshold_eps(eps, x, t, schedule, clip, pct)
