"""The edit study (issue 19): image-to-image, inpainting and variations of real held-out MNIST digits
on the default model, read by this project's domain classifier. Writes docs/study/edits/ (edits.md
with every table, edits.json, variations.png, inpainting.png).

    python scripts/edit_study.py --data-dir ../shared/data/mnist-10k --out docs/study/edits [--n 200]

What it measures (DDIM/DDPM 50 steps, the model's default guidance and clipping, seeds fixed):

1. strength → 0: the error at the smallest strengths (one step of the plan: its last timestep);
2. the whole digit masked, prompt "nine": the share read as 9;
3. half of each digit masked (the left half repainted, the prompt its own class): the classifier's
   reading of the completed digit, FID (domain) of completed vs real digits and the seam (the mean
   horizontal step across the mask's edge, against real digits'), with and without RePaint;
4. variations (no condition) over strength: the share still read as the input's digit, the mean
   absolute pixel difference from the input, and FID (domain); the default strength is the largest
   whose kept-class rate is at least 80 % at the low end of its 95 % interval;
5. interleaving: plain DDIM-50 requests in the engine alone and among edits: the iterations and the
   wall time they take (an edit's rows join the same forward passes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import diffusion  # noqa: E402
from diffusion.imaging import save_grid, to_uint8  # noqa: E402
from training.classifier import load_classifier, predict  # noqa: E402
from training.data import load_idx_split  # noqa: E402
from training.metrics import DomainExtractor, fid_from_features  # noqa: E402

STEPS = 50


def unit(images_uint8) -> torch.Tensor:
    return torch.from_numpy(images_uint8.copy()).float().unsqueeze(1) / 127.5 - 1.0


def rounded(x: torch.Tensor) -> torch.Tensor:
    """Model-space images as the API returns them: clamped and rounded to 8-bit levels (0..255)."""
    return torch.stack([torch.from_numpy(to_uint8(i).astype("float32")) for i in x]).unsqueeze(1)


def run(pipe, conds, seeds, **kw) -> torch.Tensor:
    t0 = time.perf_counter()
    out = pipe.generate_rows(conds, seeds, **kw).clamp(-1, 1)
    print(f"  {len(seeds)} images, {kw.get('scheduler', 'ddim')} {kw.get('steps')} steps, "
          f"{ {k: v for k, v in kw.items() if k in ('strength', 'jump_length', 'jump_n_sample')} }: "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return out


def seam(x: torch.Tensor, col: int) -> torch.Tensor:
    """Per image, mean |x[..., col] − x[..., col − 1]| (pixel levels): the step across a vertical edge at ``col``."""
    levels = (x.clamp(-1, 1) + 1) * 127.5
    return (levels[..., col] - levels[..., col - 1]).abs().flatten(1).mean(1)


def mean_se(v: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error."""
    return v.mean().item(), (v.std() / len(v) ** 0.5).item()


def rate_se(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, required=True, help="MNIST IDX files (t10k-* are used)")
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints/mnist-text-compact.safetensors"))
    ap.add_argument("--classifier", default=str(ROOT / "checkpoints/classifiers/mnist.safetensors"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs/study/edits")
    ap.add_argument("--n", type=int, default=400, help="digits per cell")
    ap.add_argument("--strengths", default="0.2,0.3,0.35,0.4,0.45,0.5,0.6,0.8,1.0")
    ap.add_argument("--repaint", default="5,3", help="RePaint's jump_length,jump_n_sample")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pipe = diffusion.load(args.checkpoint, "cpu")
    clf = load_classifier(args.classifier)
    domain = DomainExtractor(clf)
    images_u8, labels_np = load_idx_split(args.data_dir, "t10k")
    n = args.n
    inputs, labels = unit(images_u8[:n]), torch.from_numpy(labels_np[:n].astype("int64"))
    reference = unit(images_u8[n:n + 1000])  # other held-out digits: the real side of every FID
    assert len(reference) == 1000, "needs n + 1000 held-out digits"
    f_real, _ = domain(reference)
    names = pipe.card.class_names
    seeds = list(range(1000, 1000 + n))
    nothing = [pipe.resolve()] * n
    own = [pipe.resolve(prompt=names[int(c)]) for c in labels]
    results: dict = {"n": n, "steps": STEPS, "checkpoint": Path(args.checkpoint).name,
                     "guidance": pipe.card.default_guidance, "clip": pipe.card.default_clip}

    def fid(x):
        return fid_from_features(f_real, domain(x)[0])

    def reads(x, target):
        return (predict(clf, x) == target).float().mean().item()

    # 1. strength -> 0
    print("strength -> 0", flush=True)
    small = []
    for steps in (STEPS, 1000):
        for s in (1e-6, 0.01):
            out = run(pipe, nothing[:64], seeds[:64], scheduler="ddim", steps=steps, image=inputs[:64], strength=s)
            diff = (rounded(out) - rounded(inputs[:64])).abs()
            t = pipe.plan("ddim", steps, strength=s)
            small.append({"steps": steps, "strength": s, "timesteps": t, "mean_abs_levels": diff.mean().item(),
                          "max_abs_levels": diff.max().item(), "unchanged_share": (diff == 0).float().mean().item()})
    results["strength_to_zero"] = small

    # 2. the whole digit masked, "nine"
    print("whole digit masked", flush=True)
    everything = torch.ones(1, 28, 28)
    out = run(pipe, [pipe.resolve(prompt="nine")] * n, seeds, scheduler="ddim", steps=STEPS, image=inputs,
              mask=everything)
    results["whole_mask_nine"] = {"read_as_nine": reads(out, torch.full((n,), 9)), "fid_domain": fid(out)}
    whole = out

    # 3. half masked: the left half repainted, each digit's own prompt
    print("half masked", flush=True)
    half = torch.zeros(1, 28, 28)
    half[..., :14] = 1
    jl, jn = (int(v) for v in args.repaint.split(","))
    cells = [("ddim", {}), ("ddpm", {}), ("ddpm", {"jump_length": jl, "jump_n_sample": jn})]
    results["half_mask"] = []
    completed, seams = {}, {}
    for sched, extra in cells:
        out = run(pipe, own, seeds, scheduler=sched, steps=STEPS, image=inputs, mask=half, **extra)
        kept = rounded(out)[..., 14:] - rounded(inputs)[..., 14:]
        label = f"{sched}" + (f" + RePaint (jump_length {jl}, jump_n_sample {jn})" if extra else "")
        completed[label], seams[label] = out, seam(out, 14)
        read = reads(out, labels)
        results["half_mask"].append({"sampler": label, "evaluations": pipe.evaluations(sched, STEPS, **extra),
                                     "read_as_own_digit": read, "read_se": rate_se(read, n), "fid_domain": fid(out),
                                     "seam_levels": mean_se(seams[label]),
                                     "kept_pixels_changed": int(kept.abs().sum() > 0)})
    plain, resampled = list(seams.values())[1:3]  # ddpm and ddpm + RePaint: the same digits and seeds
    results["repaint_seam_change"] = mean_se(resampled - plain)
    results["half_mask_real"] = {"read_as_own_digit": reads(inputs, labels), "fid_domain": fid(inputs),
                                 "seam_levels": mean_se(seam(inputs, 14))}

    # 4. variations over strength
    print("variations", flush=True)
    rows, pictures = [], [inputs[:8]]
    for s in (float(v) for v in args.strengths.split(",")):
        out = run(pipe, nothing, seeds, scheduler="ddim", steps=STEPS, image=inputs, strength=s)
        kept = reads(out, labels)
        rows.append({"strength": s, "evaluations": pipe.evaluations("ddim", STEPS, strength=s),
                     "kept_class": kept, "kept_se": rate_se(kept, n),
                     "mean_abs_levels": (rounded(out) - rounded(inputs)).abs().mean().item(), "fid_domain": fid(out)})
        pictures.append(out[:8])
    results["variations"] = rows
    ok = [r for r in rows if r["kept_class"] - 1.96 * r["kept_se"] >= 0.8]
    results["variation_strength"] = max(r["strength"] for r in ok) if ok else None

    # 5. interleaving in the engine
    results["interleaving"] = interleaving(pipe, inputs, half)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "edits.json").write_text(json.dumps(results, indent=1))
    save_grid(torch.cat(pictures), args.out / "variations.png", nrow=8)
    save_grid(torch.cat([inputs[:8], inputs[:8] * (1 - half) - half, *(completed[k][:8] for k in completed),
                         whole[:8]]), args.out / "inpainting.png", nrow=8)
    (args.out / "edits.md").write_text(report(results, list(completed)))
    print(report(results, list(completed)))


def interleaving(pipe, inputs, half) -> dict:
    """Plain DDIM-50 requests alone, then among edits (strength ½, and inpainting with RePaint), in one
    engine: the iterations until the plain ones are done and the wall time."""
    from service.engine import Engine, GenerationSpec

    def go(with_edits: bool):
        eng = Engine({"m": pipe}, cpu_threads="auto")
        nine = pipe.resolve(prompt="nine")
        plain = [eng.submit(GenerationSpec("m", nine, "ddim", STEPS, 2.0, (k,)), 600) for k in range(4)]
        edits = []
        if with_edits:
            edits = [eng.submit(GenerationSpec("m", nine, "ddim", STEPS, 2.0, (10 + k,), image=inputs[k],
                                               strength=0.5, kind="edit"), 600) for k in range(4)]
            edits += [eng.submit(GenerationSpec("m", nine, "ddpm", STEPS, 2.0, (20 + k,), image=inputs[k], mask=half,
                                                jump_length=5, jump_n_sample=3, kind="edit"), 600) for k in range(4)]
        t0, it = time.perf_counter(), 0
        while not all(j.future.done() for j in plain):
            eng.iterate()
            it += 1
        wall = time.perf_counter() - t0
        while not all(j.future.done() for j in edits):
            eng.iterate()
        return {"plain_done_after_iterations": it, "plain_wall_s": wall,
                "edit_evaluations": sorted({j.work for j in edits})}
    return {"alone": go(False), "among_edits": go(True)}


def report(r: dict, cells: list[str]) -> str:
    lines = [f"# Edits on the default model ({r['checkpoint']})", "",
             f"{r['n']} held-out MNIST digits per cell (t10k), {r['steps']} steps, guidance {r['guidance']} (the "
             f"model's default), clipping {r['clip']}; the domain classifier reads the results; FID (domain) "
             "against 1,000 other held-out digits. Made by `scripts/edit_study.py`.", "",
             "## Strength → 0", "", "| steps | strength | timesteps run | mean abs. diff (levels) | max | unchanged |",
             "|---|---|---|---|---|---|"]
    for s in r["strength_to_zero"]:
        lines.append(f"| {s['steps']} | {s['strength']:g} | {s['timesteps']} | {s['mean_abs_levels']:.2f} | "
                     f"{s['max_abs_levels']:.0f} | {100 * s['unchanged_share']:.1f} % |")
    w = r["whole_mask_nine"]
    lines += ["", "## The whole digit masked, prompt \"nine\"", "",
              f"Read as 9: **{100 * w['read_as_nine']:.1f} %** (FID (domain) {w['fid_domain']:.2f}).", "",
              "## Half of each digit masked (left half repainted, prompt: its own digit)", "",
              "| sampler | evaluations | read as its digit | FID (domain) | seam (levels) | kept pixels changed |",
              "|---|---|---|---|---|---|"]
    for h in r["half_mask"]:
        lines.append(f"| {h['sampler']} | {h['evaluations']} | {100 * h['read_as_own_digit']:.1f} ± "
                     f"{100 * h['read_se']:.1f} % | {h['fid_domain']:.2f} | {h['seam_levels'][0]:.1f} ± "
                     f"{h['seam_levels'][1]:.1f} | {'yes' if h['kept_pixels_changed'] else 'none'} |")
    real = r["half_mask_real"]
    change = r["repaint_seam_change"]
    lines += [f"| (the real digits) | | {100 * real['read_as_own_digit']:.1f} % | {real['fid_domain']:.2f} | "
              f"{real['seam_levels'][0]:.1f} ± {real['seam_levels'][1]:.1f} | |", "",
              "± one standard error. The seam is the mean step in pixel levels between the mask's two edge "
              "columns (the 14th and 15th). RePaint changes it, digit by digit against plain DDPM on the same "
              f"digits and seeds, by **{change[0]:+.1f} ± {change[1]:.1f}** levels.", "",
              "## Variations (no condition) by strength", "",
              "| strength | evaluations | read as the input's digit | mean abs. diff (levels) | FID (domain) |",
              "|---|---|---|---|---|"]
    for v in r["variations"]:
        lines.append(f"| {v['strength']:g} | {v['evaluations']} | {100 * v['kept_class']:.1f} ± "
                     f"{100 * v['kept_se']:.1f} % | {v['mean_abs_levels']:.1f} | {v['fid_domain']:.2f} |")
    lines += ["", "Default variation strength (the largest whose kept rate is ≥ 80 % at the low end of its 95 % "
              f"interval): **{r['variation_strength']}**.", "",
              "![variations: inputs, then one row per strength](variations.png)", "",
              "![inpainting: inputs, masked, then " + ", ".join(cells) + ", then the whole digit as nine]"
              "(inpainting.png)", "", "## Interleaving with generation (in-process engine)", "",
              "| | plain requests done after (iterations) | their wall time (s) | edits' evaluations |", "|---|---|---|---|"]
    for k, v in r["interleaving"].items():
        lines.append(f"| {k.replace('_', ' ')} | {v['plain_done_after_iterations']} | {v['plain_wall_s']:.2f} | "
                     f"{v['edit_evaluations'] or '—'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
