"""PNDM (Liu et al. 2022, "Pseudo numerical methods for diffusion models on manifolds").

The transfer φ(x_t, ε, t → t') is the deterministic DDIM step. The first step, from the noisiest
timestep, is φ with ε(x_t) alone (one evaluation; see "The first step" below). The next three
steps are the warm-up, pseudo Runge–Kutta (4 evaluations each, at t, the midpoint twice, and t'):

    e1 = ε(x_t, t)            x1 = φ(x_t, e1, t → m)
    e2 = ε(x1, m)             x2 = φ(x_t, e2, t → m)
    e3 = ε(x2, m)             x3 = φ(x_t, e3, t → t')
    e4 = ε(x3, t')            x_t' = φ(x_t, (e1 + 2e2 + 2e3 + e4)/6, t → t')

Every later step is pseudo linear multistep (4th-order Adams–Bashforth on ε, one evaluation):

    e' = (55 e_t − 59 e_{t+δ} + 37 e_{t+2δ} − 9 e_{t+3δ}) / 24,  x_t' = φ(x_t, e', t → t')

where the history holds ε evaluated at the start of each earlier step (the first step's included).
A step whose target is the clean end (t' = -1; no model evaluation is possible there) is never a
Runge–Kutta step: it uses multistep with the history available (orders 1 to 4).
NFE = S + 3·min(3, S − 2) for S ≥ 2 (S + 9 from S = 5 on), 1 for S = 1.
The midpoint m is (t + t') // 2 (an integer timestep, as the model needs).

The first step. In σ = sqrt((1−ᾱ)/ᾱ) and x̃ = x/sqrt(ᾱ), φ is x̃' = x̃ + (σ' − σ)·ε̄: an Euler step
with the slope ε̄. With ε̄ = ε(x_t) it is exact while ε stays put along the path, which it nearly
does while σ is well above the data's scale. Any other ε̄ (the Runge–Kutta average, a multistep
combination) mixes in ε evaluated at other points, and its mismatch with ε(x_t) is multiplied by
about σ/σ' in x̃'. The step from the noisiest timestep has the largest σ/σ' of the plan: 71 → 3
(24×) for 5 trailing steps on the cosine schedule, 71 → 5.9 (12×) for 10. Run as a Runge–Kutta
step there (as this sampler did before issue 14), e3 came out 7% off and x3 changed sign, and the
samples of the Gaussian oracle (data N(0.3, 0.5²)) ended with 5.6× (5 steps) or 1.13× (10 steps)
the true spread; a trained cosine model gave noise. As a DDIM step it costs nothing measurable at
any step count (tests/diffusion/test_few_steps.py) and the warm-up starts where the steps are
short (σ/σ' of 2-3.5).

PNDM starts at σ = 80 rather than at t = T−1 (σ ≈ 2·10⁴ on the clipped cosine schedule): that
bounds how much a trained model's ε error at the first step, multiplied by sqrt(ᾱ'/ᾱ), can move
the sample (x_T ~ N(0, I) is exact there to a relative 10⁻⁴).
"""

from __future__ import annotations

import torch

from diffusion.guidance import Denoised
from diffusion.samplers.base import RowState, Sampler, alpha_bar, bcast, current_t
from diffusion.samplers.ddim import ddim_step
from diffusion.schedules import Schedule

FIRST_ORDER_STEPS = 1  # the step from the noisiest timestep is a plain DDIM step (see the module doc)
WARMUP_STEPS = 3  # then this many pseudo Runge–Kutta steps
# Adams–Bashforth coefficients by order, newest ε first.
AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PNDM(Sampler):
    name = "pndm"
    sigma_max = 80.0  # start at σ = 80 (EDM's σ_max), not at t = T-1 (see the module doc)

    def buffers(self, n, image_shape, device):
        return {"hist": torch.zeros(n, 3, *image_shape, device=device),  # ε at the last 3 step starts, newest first
                "n_hist": torch.zeros(n, dtype=torch.long, device=device),  # valid entries of hist
                "xq": torch.zeros(n, *image_shape, device=device),  # the point queried at a Runge–Kutta sub-stage
                "acc": torch.zeros(n, *image_shape, device=device)}  # running (e1 + 2e2 + 2e3 + e4)

    def evaluations(self, steps: int) -> int:
        rk = max(0, min(WARMUP_STEPS, steps - 1 - FIRST_ORDER_STEPS))
        return 4 * rk + (steps - rk)

    @staticmethod
    def _runge_kutta(state: RowState) -> torch.Tensor:
        """Rows whose current step is a warm-up step: steps FIRST_ORDER_STEPS … +WARMUP_STEPS−1,
        never the step to the clean end. All other steps go through the multistep branch, whose
        order is 1 (plain DDIM) while the history is empty, i.e. on the first step."""
        i = state.i
        return (i >= FIRST_ORDER_STEPS) & (i < FIRST_ORDER_STEPS + WARMUP_STEPS) & (current_t(state, 1) >= 0)

    @staticmethod
    def _mid(state: RowState) -> torch.Tensor:
        return (current_t(state) + current_t(state, 1)) // 2

    def query(self, schedule: Schedule, state: RowState):
        t, t_next, mid = current_t(state), current_t(state, 1), self._mid(state)
        tq = torch.where(state.stage == 0, t, torch.where(state.stage == 3, t_next, mid))
        xq = torch.where(bcast(state.stage == 0, state.x.ndim), state.x, state.extra["xq"])
        return xq, tq

    def update(self, schedule: Schedule, state: RowState, d: Denoised, noise):
        eps = d.eps
        nd, x, ex = state.x.ndim, state.x, state.extra
        t, t_next, mid = current_t(state), current_t(state, 1), self._mid(state)
        ab_t, ab_next, ab_mid = (alpha_bar(schedule, v, nd) for v in (t, t_next, mid))
        live, rk, s = t >= 0, self._runge_kutta(state), state.stage

        # Multistep rows (stage 0, not Runge–Kutta): combine ε with the history at the row's order.
        order = (ex["n_hist"] + 1).clamp(max=4)
        e_ms = eps
        for k in range(2, 5):
            e_k = AB[k][0] * eps
            for j in range(1, k):
                e_k = e_k + AB[k][j] * ex["hist"][:, j - 1]
            e_ms = torch.where(bcast(order == k, nd), e_k, e_ms)
        x_ms = ddim_step(x, e_ms, ab_t, ab_next)

        # Runge–Kutta rows, by stage.
        w = 1.0 + ((s == 1) | (s == 2)).to(eps.dtype)  # Runge–Kutta weights 1, 2, 2, 1 by stage
        acc = torch.where(bcast(s == 0, nd), torch.zeros_like(eps), ex["acc"]) + bcast(w, nd) * eps
        ab_q = torch.where(bcast(s <= 1, nd), ab_mid, ab_next)
        xq_new = ddim_step(x, eps, ab_t, ab_q)  # stages 0,1 -> midpoint; stage 2 -> t'
        x_rk = ddim_step(x, acc / 6, ab_t, ab_next)  # stage 3 completes the step

        starts = live & (s == 0)  # every step start records ε in the history
        finishing = live & ((~rk & (s == 0)) | (rk & (s == 3)))
        hist = torch.where(bcast(starts, nd + 1), torch.cat([eps.unsqueeze(1), ex["hist"][:, :2]], 1), ex["hist"])
        new_x = torch.where(bcast(rk, nd), x_rk, x_ms)
        return {"x": torch.where(bcast(finishing, nd), new_x, x), "i": state.i + finishing.long(),
                "stage": torch.where(finishing | ~live, torch.zeros_like(s), torch.where(rk, s + 1, s)),
                "hist": hist, "n_hist": torch.where(starts, (ex["n_hist"] + 1).clamp(max=3), ex["n_hist"]),
                "xq": torch.where(bcast(rk & live, nd), xq_new, ex["xq"]), "acc": acc}
