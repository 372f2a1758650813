"""Few-step sweep on the Gaussian oracle (issue 14): every sampler's default at 2-50 steps, and
diffusers' PNDM and Heun schedulers driven by the same exact ε-model from the same starting noise.

Data N(0.3, 0.5²), 4,096 samples, one coordinate each; the true spread is 0.5. By default one JSON
line per cell on stdout: {"src", "kind", "sampler", "steps", "std", "mean"}; ``--markdown`` prints
the table of docs/study/few-steps/oracle.md instead. Which ``diffusion`` is measured is whichever
Python imports, so two checkouts can be compared:

    PYTHONPATH=. python scripts/few_steps_oracle.py --diffusers --markdown
"""

from __future__ import annotations

import argparse
import json

import torch

import diffusion
from diffusion import make_schedule, sample

MU, S, N = 0.3, 0.5, 4096
STEPS = (2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 50)


def eps_at(x: torch.Tensor, ab) -> torch.Tensor:
    """The exact E[ε | x_t] for data N(μ, s²) at ᾱ_t = ``ab`` (tests/diffusion/gaussian.py)."""
    ab = torch.as_tensor(ab, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * S * S + 1 - ab)


def ours(kind: str, name: str, steps: int, x_T: torch.Tensor) -> torch.Tensor:
    sch = make_schedule(kind, 1000)
    model = lambda x, t: eps_at(x, sch.alphas_cumprod[t].to(x.dtype))  # noqa: E731
    if name == "ddpm":  # ancestral: its own noise, so its own seeds
        return sample(model, sch, tuple(x_T.shape), sampler=name, steps=steps, seed=0)
    return sample(model, sch, tuple(x_T.shape), sampler=name, steps=steps, x_T=x_T)


def _betas(kind: str) -> dict:
    if kind == "linear":
        return dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    return dict(beta_schedule="squaredcos_cap_v2")


def diffusers_pndm(kind: str, steps: int, x_T: torch.Tensor, skip_prk: bool) -> torch.Tensor:
    """PNDMScheduler as its own configs use it: timestep_spacing="leading", steps_offset=1."""
    import diffusers

    sc = diffusers.PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=skip_prk, timestep_spacing="leading",
                                 steps_offset=1, **_betas(kind))
    sc.set_timesteps(steps)
    ab, x = sc.alphas_cumprod.double(), x_T.double()
    for t in sc.timesteps:
        x = sc.step(eps_at(x, ab[int(t)]), int(t), x).prev_sample
    return x


def diffusers_heun(kind: str, steps: int, x_T: torch.Tensor, karras: bool) -> torch.Tensor:
    """HeunDiscreteScheduler (default "linspace" spacing, or EDM's Karras σ grid). Its σ may fall
    between timesteps, so the oracle is evaluated at the scheduler's own σ (ᾱ = 1/(1 + σ²))."""
    import diffusers

    sc = diffusers.HeunDiscreteScheduler(num_train_timesteps=1000, use_karras_sigmas=karras, **_betas(kind))
    sc.set_timesteps(steps)
    x = x_T.double() * sc.init_noise_sigma
    for t in sc.timesteps:
        x_in = sc.scale_model_input(x, t)
        sigma = float(sc.sigmas[sc.step_index])
        x = sc.step(eps_at(x_in, 1 / (1 + sigma * sigma)), t, x).prev_sample
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--diffusers", action="store_true", help="also run diffusers' PNDM and Heun schedulers")
    p.add_argument("--label", default="ours")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (spread of the samples) instead of JSON")
    a = p.parse_args()
    rows: list[dict] = []
    x_T = torch.randn(N, 1, 1, 1, generator=torch.Generator().manual_seed(0))

    def emit(src, kind, name, steps, x):
        out(dict(src=src, kind=kind, sampler=name, steps=steps, std=round(x.std().item(), 4),
                 mean=round(x.mean().item(), 4)))

    def out(row):
        rows.append(row)
        if not a.markdown:
            print(json.dumps(row), flush=True)

    for kind in ("cosine", "linear"):
        for name in diffusion.SAMPLERS:
            for steps in STEPS:
                if steps < diffusion.SAMPLERS[name].min_steps:
                    out(dict(src=a.label, kind=kind, sampler=name, steps=steps, refused=True))
                    continue
                emit(a.label, kind, name, steps, ours(kind, name, steps, x_T))
        if a.diffusers:
            refs = {"diffusers-prk-leading": ("pndm", lambda n: diffusers_pndm(kind, n, x_T, False)),
                    "diffusers-plms-leading": ("pndm", lambda n: diffusers_pndm(kind, n, x_T, True)),
                    "diffusers-linspace": ("heun", lambda n: diffusers_heun(kind, n, x_T, False)),
                    "diffusers-karras": ("heun", lambda n: diffusers_heun(kind, n, x_T, True))}
            for steps in STEPS:
                for src, (name, run) in refs.items():
                    try:
                        emit(src, kind, name, steps, run(steps))
                    except ValueError as e:  # e.g. PNDMScheduler's Runge–Kutta warm-up needs 4 steps
                        out(dict(src=src, kind=kind, sampler=name, steps=steps, error=str(e)[:80]))
    if a.markdown:
        print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """Spread of the samples per (sampler, schedule, source) and step count; the true one is 0.5.
    Blow-ups (beyond 1.4× the true spread) in bold; n/a where diffusers refuses. A spread below the
    truth at few steps is what first-order steps do (they end at E[x0 | x_t])."""
    idx = {(r["src"], r["kind"], r["sampler"], r["steps"]): r for r in rows}
    srcs = list(dict.fromkeys(r["src"] for r in rows))

    def cell(r):
        if r is None:
            return ""
        if r.get("refused") or "error" in r:
            return "n/a"
        v = r["std"]
        return f"{v:.3f}" if v <= 0.7 else f"**{v:.3g}**"

    lines = ["| sampler | schedule | source | " + " | ".join(str(s) for s in STEPS) + " |",
             "|---|---|---|" + "---|" * len(STEPS)]
    for name in diffusion.SAMPLERS:
        for kind in ("cosine", "linear"):
            for src in srcs:
                if any(k[:3] == (src, kind, name) for k in idx):
                    lines.append(f"| {name} | {kind} | {src} | " + " | ".join(cell(idx.get((src, kind, name, s)))
                                                                             for s in STEPS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
