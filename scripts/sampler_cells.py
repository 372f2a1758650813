"""Score a few sampler settings on one checkpoint, options included (e.g. heun's ``alpha``), the way
``python -m training.evaluate`` scores one (``generate_samples`` with seed 0: class-balanced samples,
image j of class c from seed 100,000·c + j, so every cell starts from the same noise), FID (domain) and conditional accuracy read by the
dataset's domain classifier. One CSV row per cell, appended (the file may already hold other cells).

    PYTHONPATH=. python scripts/sampler_cells.py --checkpoint CKPT --data-dir DIR --csv out.csv \\
        --cells heun/5/1/2/none heun/5/0.5/2/none      # scheduler/steps/alpha (- = default)/w/clip

docs/study/few-steps/heun-alpha.csv was made so (issue 14: the choice of heun's default α).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import diffusion
from training.classifier import load_classifier
from training.evaluate import Reference, default_classifier_path, generate_samples, nfe, real_test_images

FIELDS = ["checkpoint", "sampler", "steps", "alpha", "guidance", "clip", "nfe", "fid_domain", "accuracy", "seconds"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--cells", nargs="+", required=True, help="scheduler/steps/alpha/guidance/clip; alpha '-' = default")
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--csv", required=True)
    a = p.parse_args(argv)
    pipe = diffusion.load(a.checkpoint, device="cpu")
    dataset = pipe.provenance.get("dataset")
    reference = Reference.build(real_test_images(dataset, a.data_dir, None),
                                load_classifier(default_classifier_path(dataset), device=pipe.device))
    new = not Path(a.csv).exists()
    with open(a.csv, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(FIELDS)
        for cell in a.cells:
            scheduler, steps, alpha, guidance, clip = cell.split("/")
            options = {} if alpha == "-" else {"alpha": float(alpha)}
            images, labels, seconds = generate_samples(pipe, a.num_samples, scheduler, int(steps), float(guidance),
                                                       seed=0, clip=clip, progress=False, **options)
            m = reference.score(images, labels, seed=0)
            out = [Path(a.checkpoint).stem, scheduler, int(steps), alpha, float(guidance), clip,
                   nfe(scheduler, int(steps)), f"{m['fid_domain']:.3f}", f"{m['conditional_accuracy']:.3f}",
                   f"{seconds:.0f}"]
            w.writerow(out)
            f.flush()
            print(*out, flush=True)


if __name__ == "__main__":
    main()
