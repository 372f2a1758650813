"""The conditional-accuracy check of a checkpoint: generate images for every class (by prompt
for a text model: the class name, e.g. "nine"; by label for a class model) and let an independent
classifier read them.

    python -m training.quality --checkpoint checkpoints/mnist-text-compact.safetensors \\
        --classifier checkpoints/classifiers/mnist.safetensors --per-class 50 --scheduler ddim \\
        --steps 50 --guidance 2 [--json out.json] [--grid out.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from tqdm import tqdm

import diffusion
from diffusion.imaging import save_grid
from training.classifier import load_classifier, predict


def evaluate(pipe: diffusion.Pipeline, classifier, per_class: int, scheduler: str = "ddim", steps: int = 50,
             guidance: float = 2.0, seed: int = 0, batch: int = 50, classes: list[int] | None = None,
             progress: bool = True) -> dict:
    names = pipe.card.class_names
    classes = list(range(len(names))) if classes is None else classes
    per, images = {}, []
    t0 = time.perf_counter()
    with tqdm(total=per_class * len(classes), disable=not progress, unit="img") as bar:
        for c in classes:
            xs = []
            for start in range(0, per_class, batch):
                n = min(batch, per_class - start)
                kw = {"prompt": names[c]} if pipe.card.text_conditional else {"class_label": c}
                xs.append(pipe.generate_tensor(scheduler=scheduler, steps=steps, guidance=guidance,
                                               seed=seed + 100_000 * c + start, num_images=n, **kw).cpu())
                bar.update(n)
            x = torch.cat(xs).clamp(-1, 1)
            per[names[c]] = (predict(classifier, x) == c).float().mean().item()
            images.append(x)
    overall = sum(per.values()) / len(per)
    return {"per_class": per, "overall": overall, "per_class_n": per_class, "scheduler": scheduler,
            "steps": steps, "guidance": guidance, "seconds": time.perf_counter() - t0,
            "images": torch.cat(images)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--classifier", required=True)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--scheduler", default="ddim", choices=sorted(diffusion.SAMPLERS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, nargs="*")
    p.add_argument("--device", default=None)
    p.add_argument("--json")
    p.add_argument("--grid", help="PNG with one row per class (first 10 images of each)")
    a = p.parse_args(argv)
    try:
        pipe = diffusion.load(a.checkpoint, device=a.device)
        clf = load_classifier(a.classifier)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = evaluate(pipe, clf, a.per_class, a.scheduler, a.steps, a.guidance, a.seed, classes=a.classes)
    images = res.pop("images")
    for name, acc in res["per_class"].items():
        print(f"{name:>12}: {acc:6.1%}")
    print(f"{'overall':>12}: {res['overall']:6.1%}  ({a.per_class} per class, {a.scheduler} {a.steps} steps, "
          f"w={a.guidance}, {res['seconds']:.0f}s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**res, "checkpoint": a.checkpoint, "classifier": a.classifier}, f, indent=2)
    if a.grid:
        k = min(10, a.per_class)
        rows = [images[i * a.per_class:i * a.per_class + k] for i in range(len(res["per_class"]))]
        save_grid(torch.cat(rows), a.grid, nrow=k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
