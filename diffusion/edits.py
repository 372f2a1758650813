"""Editing a given image, per row, inside the same fixed-shape step as generation.

- **Image-to-image** (SDEdit, Meng et al. 2021). A row of strength s ∈ (0, 1] starts part-way down
  its sampler's plan: at the planned timestep nearest s·T − 1 (s = 1: the top of the plan, t = T−1
  for trailing spacing), from

      x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε,   ε the row's own starting noise (counter 0),

  and runs the rest of the plan as a row of that many steps: its step index starts at 0, so
  multistep history starts empty and PNDM's and Heun's first-step rules apply to its first step,
  exactly as at the top of a plan. An edit of k remaining steps costs ``sampler.evaluations(k)``
  model evaluations (a strength-0.5 DDIM-50 edit: 25). However small s is, at least the plan's last
  step runs. s = 1 is plain generation: the row starts from its noise alone, as without an image.
- **Inpainting.** A row may carry a known image and a keep mask (1: keep the known pixel, 0:
  repaint). After every update that moves the row to its next timestep t', the kept pixels are
  replaced by the known image forward-noised to t',

      x ← keep·(sqrt(ᾱ_t')·x0_known + sqrt(1 − ᾱ_t')·z) + (1 − keep)·x,

  with z counter-based noise keyed apart from the sampler's own draws; at the clean end (ᾱ = 1) that
  is the known image itself, so kept pixels come back exactly.
- **RePaint resampling** (Lugmayr et al. 2022). With ``jump_length`` J > 0 and ``jump_n_sample``
  R > 1 the plan goes back up: at every J-th planned timestep counted from the last one (and at
  least J steps below the top), the row is noised forward J planned steps,

      x_{t+J} = sqrt(ᾱ_{t+J}/ᾱ_t)·x_t + sqrt(1 − ᾱ_{t+J}/ᾱ_t)·z,

  with no model evaluation, and denoised down again, R − 1 times per point; so the known and the
  generated regions are harmonised R times around each point. A jump is an entry of the plan that
  is higher than the one before it; it costs no evaluation, it is applied right after the update that
  lands on its start. Only one-evaluation-per-step samplers without history (DDPM, DDIM) resample:
  a jump would leave a multistep sampler's history at the wrong timesteps.

Everything here is a fixed-shape tensor function of the per-row state (no host sync); rows without
an image have keep = 0 and plans without jumps, on which it changes nothing.
"""

from __future__ import annotations

import torch

from diffusion.noise import gaussian, step_counter
from diffusion.samplers.base import RowState, Sampler, bcast, planned_t
from diffusion.schedules import Schedule, gather_alpha_bar

KNOWN_STAGE = 4  # noise counter sub-stages (diffusion.noise.step_counter) the samplers never use (0-3)
JUMP_STAGE = 5


# --- plans (host side) -----------------------------------------------------------------------------
def start_index(plan: list[int], strength: float, num_timesteps: int) -> int:
    """Where a row of this strength starts in ``plan``: the step nearest s·T − 1 (the noisier of two
    equally near), at least the last one; 0 for s = 1."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if strength == 1:
        return 0
    target = strength * num_timesteps - 1
    return min(range(len(plan)), key=lambda k: (abs(plan[k] - target), k))


def resample(plan: list[int], jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's plan (module docstring): ``plan`` with the jumps back up written in."""
    if jump_length < 0 or jump_n_sample < 1:
        raise ValueError("jump_length must be >= 0 and jump_n_sample >= 1")
    if jump_length == 0 or jump_n_sample == 1:
        return list(plan)
    last = len(plan) - 1
    left = {k: jump_n_sample - 1 for k in range(last, jump_length - 1, -jump_length)}
    out, k = [plan[0]], 0
    while k < last:
        k += 1
        out.append(plan[k])
        if left.get(k, 0) > 0:
            left[k] -= 1
            k -= jump_length
            out.append(plan[k])
    return out


def jumps(plan: list[int]) -> int:
    """Entries of a plan that go back up (each costs no model evaluation)."""
    return sum(b > a for a, b in zip(plan, plan[1:]))


def row_plan(sampler: Sampler, schedule: Schedule, steps: int, spacing: str | None = None, strength: float = 1.0,
             jump_length: int = 0, jump_n_sample: int = 1) -> list[int]:
    """The timesteps a row visits: its sampler's plan, cut to the strength, with RePaint's jumps."""
    plan = sampler.plan(schedule, steps, spacing)
    plan = plan[start_index(plan, strength, schedule.num_timesteps):]
    if jump_length > 0 and jump_n_sample > 1 and not sampler.resamples:
        raise ValueError(f"RePaint resampling (jump_length, jump_n_sample) needs a sampler with one evaluation "
                         f"per step and no history (ddpm or ddim), not {sampler.name}")
    return resample(plan, jump_length, jump_n_sample)


def evaluations(sampler: Sampler, plan: list[int]) -> int:
    """Model evaluations a row of this plan needs: its sampler's count for the steps that go down."""
    return sampler.evaluations(len(plan) - jumps(plan))


# --- the per-row tensor side ------------------------------------------------------------------------
def start(x_T: torch.Tensor, image: torch.Tensor, alpha_bar: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Starting samples: sqrt(ᾱ_t0)·image + sqrt(1 − ᾱ_t0)·x_T where ``edited`` [B], else x_T
    (``alpha_bar`` [B]: ᾱ at each row's first planned timestep)."""
    ab = bcast(alpha_bar, x_T.ndim)
    noised = ab.sqrt().to(x_T.dtype) * image + (1 - ab).sqrt().to(x_T.dtype) * x_T
    return torch.where(bcast(edited, x_T.ndim), noised, x_T)


def apply(schedule: Schedule, state: RowState, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kept region and RePaint's jumps after the samplers' update (module docstring): new
    ``x``, ``x0`` and ``i`` for the rows that moved to their next timestep."""
    x, i, nd = new["x"], new["i"], state.x.ndim
    moved = i != state.i
    t = planned_t(state.ts, i)
    ab = gather_alpha_bar(schedule, t, nd)
    z = gaussian(state.seed, step_counter(i, KNOWN_STAGE), tuple(x.shape[1:]), x.dtype)
    known_t = ab.sqrt().to(x.dtype) * state.known + (1 - ab).sqrt().to(x.dtype) * z
    keep = (state.keep > 0.5) & bcast(moved, nd)
    x = torch.where(keep, known_t, x)
    x0 = torch.where(state.keep > 0.5, state.known, new["x0"])  # previews show the kept region as it is

    t_up = planned_t(state.ts, i + 1)
    up = moved & (t >= 0) & (t_up > t)
    ratio = gather_alpha_bar(schedule, t_up, nd) / ab
    z_up = gaussian(state.seed, step_counter(i, JUMP_STAGE), tuple(x.shape[1:]), x.dtype)
    jumped = ratio.sqrt().to(x.dtype) * x + (1 - ratio).clamp(min=0).sqrt().to(x.dtype) * z_up
    return {**new, "x": torch.where(bcast(up, nd), jumped, x), "x0": x0, "i": i + up.long()}
