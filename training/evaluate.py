"""Sample quality and sampling cost of one checkpoint for one scheduler, step count and guidance rate.

    python -m training.evaluate --checkpoint runs/mnist-class-small-linear/mnist-class-small-linear.safetensors \\
        --data-dir /path/to/mnist-idx --scheduler ddim --steps 50 --guidance 2 --num-samples 2000 \\
        [--classifier checkpoints/classifiers/mnist.safetensors] [--inception-weights PATH | --inception] \\
        [--json out.json] [--grid out.png]

It generates ``--num-samples`` images, the same number for every class (by class label, or by the
class name as the prompt for a text model), and scores them against the real test split:
FID, KID and IS on the domain classifier's features ("(domain)"), on Inception-v3's as well when its
weights are given or downloadable, the conditional accuracy (share read by the classifier as the
class asked for), NFE (model evaluations per image) and images/s on this machine. Beside every
number it prints the real-vs-real floor: ``num_samples`` training images, with the samples' class
counts, scored the same way against the same test images.

The real images' features are extracted once (:class:`Reference`), so a grid of many cells
(``training.study``) pays for them once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import diffusion
from diffusion.imaging import save_grid
from training.classifier import Classifier, ClassifierError, load_classifier
from training.data import DataError, dataset_tensors, load_dataset
from training.metrics import (METRIC_LABELS, DomainExtractor, InceptionExtractor, InceptionUnavailable,
                              conditional_accuracy, fid_from_features, inception_score_from_logits,
                              kid_from_features)

ROOT = Path(__file__).resolve().parents[1]


def default_classifier_path(dataset: str) -> Path:
    """Where the repository keeps the domain classifier of ``dataset``."""
    return ROOT / "checkpoints" / "classifiers" / f"{dataset}.safetensors"


# ------------------------------------------------------------------------------------------ sampling

def sample_classes(pipe: diffusion.Pipeline) -> int:
    """How many classes a checkpoint's samples are spread over: its classes (by label, or by name as
    the prompt of a text model); 0 for an unconditional model."""
    return len(pipe.card.class_names) if (pipe.card.class_conditional or pipe.card.text_conditional) else 0


def class_counts(n: int, k: int) -> list[int]:
    """``n`` shared as evenly as possible over ``k`` classes: class i gets one more while i < n mod k."""
    return [n // k + (c < n % k) for c in range(k)]


def class_plan(pipe: diffusion.Pipeline, n: int) -> list[tuple[int | None, int]]:
    """(class index, count) pairs: ``n`` images shared over the model's classes by
    :func:`class_counts`, classes with none left out; [(None, n)] for an unconditional model."""
    k = sample_classes(pipe)
    if k == 0:
        return [(None, n)]
    return [(c, m) for c, m in enumerate(class_counts(n, k)) if m > 0]


def class_condition(pipe: diffusion.Pipeline, c: int | None) -> diffusion.Condition:
    """What a sample of class ``c`` is generated with: the class label, or the class name as the
    prompt of a text model; None means unconditional."""
    if c is None:
        return pipe.resolve()
    return pipe.resolve(prompt=pipe.card.class_names[c]) if pipe.card.text_conditional else pipe.resolve(class_label=c)


def generate_samples(pipe: diffusion.Pipeline, n: int, scheduler: str, steps: int, guidance: float,
                     seed: int = 0, batch_size: int = 250, clip: str = "none", progress: bool = True,
                     desc: str | None = None, **options) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(images [n, C, H, W] clamped to [-1, 1], class labels [n] or None, seconds spent sampling).
    ``options`` go to the sampler (e.g. heun's ``alpha``).

    Image j of class c uses seed ``seed * 1_000_000 + 100_000 * c + j``: a cell with the same
    ``seed`` starts every other cell from the same noise (common random numbers), a different
    ``seed`` gives an independent repeat."""
    if n < 1:
        raise ValueError("num_samples must be >= 1")
    plan = class_plan(pipe, n)
    rows = [(c, j) for c, count in plan for j in range(count)]
    conds = {c: class_condition(pipe, c) for c, _ in plan}
    images, seconds = [], 0.0
    with tqdm(total=n, desc=desc or f"{scheduler} {steps} steps w={guidance:g}", unit="img",
              disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):  # classes mix in a batch: every row has its own condition and seed
            chunk = rows[start:start + batch_size]
            t0 = time.perf_counter()
            x = pipe.generate_rows([conds[c] for c, _ in chunk],
                                   [seed * 1_000_000 + 100_000 * (c or 0) + j for c, j in chunk],
                                   scheduler=scheduler, steps=steps, guidance=guidance, clip=clip, **options)
            if x.is_cuda:
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            images.append(x.float().cpu().clamp(-1, 1))
            bar.update(len(chunk))
    labels = None if rows[0][0] is None else torch.tensor([c for c, _ in rows], dtype=torch.long)
    return torch.cat(images), labels, seconds


def sample_sheet(images: torch.Tensor, labels: torch.Tensor | None, per_class: int = 10) -> torch.Tensor:
    """Up to ``per_class`` images of each class, class by class (rows of a grid); the first
    ``per_class``² images of an unconditional set."""
    if labels is None:
        return images[:per_class * per_class]
    return torch.cat([images[labels == c][:per_class] for c in labels.unique().tolist()])


def nfe(scheduler: str, steps: int) -> int:
    """Model evaluations per image (with guidance > 0 each one runs the network on a doubled batch)."""
    return diffusion.SAMPLERS[scheduler].evaluations(steps)


# -------------------------------------------------------------------------------------------- scoring

def real_test_images(dataset: str, data_dir: str | None, n: int | None = None, seed: int = 0,
                     image_size: int | None = None) -> torch.Tensor:
    """``n`` images of the test split (all of it when ``n`` is None or larger), a fixed random subset."""
    ds = load_dataset(dataset, data_dir=data_dir, split="test", image_size=image_size)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    idx = idx[:n] if n is not None else idx
    if hasattr(ds, "images"):
        return ds.images[idx]
    return torch.stack([ds[int(i)][0] for i in idx])


@dataclass
class Reference:
    """The real test images' features, extracted once per extractor, and the scoring settings."""
    classifier: Classifier | None
    inception: InceptionExtractor | None
    features: dict[str, torch.Tensor]
    n_real: int
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    is_splits: int = 10

    @classmethod
    def build(cls, real: torch.Tensor, classifier: Classifier | None, inception: InceptionExtractor | None = None,
              **settings) -> "Reference":
        if classifier is None and inception is None:
            raise ValueError("give a domain classifier, an Inception extractor, or both")
        feats = {ex.name: ex(real)[0] for ex in cls._extractors(classifier, inception)}
        return cls(classifier, inception, feats, len(real), **settings)

    @staticmethod
    def _extractors(classifier, inception) -> list:
        return ([DomainExtractor(classifier)] if classifier is not None else []) + \
               ([inception] if inception is not None else [])

    def score(self, fake: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0) -> dict[str, float]:
        """The keys of ``training.metrics.evaluate_images`` (same numbers), for ``fake`` against the
        cached real features."""
        out: dict[str, float] = {"n_fake": len(fake), "n_real": self.n_real,
                                 "kid_subset_size": min(self.kid_subset_size, len(fake), self.n_real)}
        for ex in self._extractors(self.classifier, self.inception):
            f_real = self.features[ex.name]
            f_fake, logits = ex(fake)
            out[f"fid_{ex.name}"] = fid_from_features(f_real, f_fake)
            out[f"kid_{ex.name}_mean"], out[f"kid_{ex.name}_std"] = kid_from_features(
                f_real, f_fake, self.kid_subsets, self.kid_subset_size, seed)
            out[f"is_{ex.name}_mean"], out[f"is_{ex.name}_std"] = inception_score_from_logits(
                logits, self.is_splits, seed)
        if labels is not None and self.classifier is not None:
            out["conditional_accuracy"] = conditional_accuracy(fake, labels, self.classifier)
        return out


FLOOR_METHOD = "class-balanced training images against the cells' reference"


def balanced_train_images(dataset: str, data_dir: str | None, n: int, num_classes: int, seed: int = 0,
                          image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` training images (and labels) drawn with the same class counts as the samples of a cell
    (:func:`class_counts`); a plain random draw when ``num_classes`` is 0 (an unconditional model)."""
    images, labels = dataset_tensors(load_dataset(dataset, data_dir=data_dir, split="train", image_size=image_size))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    if num_classes == 0:
        return images[order[:n]], None
    picks = []
    for c, want in enumerate(class_counts(n, num_classes)):
        mine = order[labels[order] == c][:want]
        if len(mine) < want:
            raise ValueError(f"the {dataset} training split has only {len(mine)} images of class {c}, {want} needed")
        picks.append(mine)
    idx = torch.cat(picks)
    return images[idx], labels[idx]


def matched_floor(reference: Reference, dataset: str, data_dir: str | None, n: int, num_classes: int,
                  seed: int = 0) -> dict[str, float]:
    """The real-vs-real floor of a cell: ``n`` training images, with the cell's class counts, scored
    exactly like the samples (same reference features, same KID subsets and IS splits). A perfect
    generator would score about this; a smaller reference or an unbalanced draw would inflate it."""
    images, labels = balanced_train_images(dataset, data_dir, n, num_classes, seed)
    return reference.score(images, labels, seed=seed)


def evaluate_cell(pipe: diffusion.Pipeline, reference: Reference, num_samples: int, scheduler: str, steps: int,
                  guidance: float, seed: int = 0, batch_size: int = 250, clip: str = "none",
                  progress: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """Generate and score one (scheduler, steps, guidance, seed) cell: (metrics, images, labels).
    The metrics hold every score plus nfe, images_per_s and sample_seconds."""
    images, labels, seconds = generate_samples(pipe, num_samples, scheduler, steps, guidance, seed,
                                               batch_size, clip, progress)
    metrics = reference.score(images, labels, seed=seed)
    metrics.update(nfe=nfe(scheduler, steps), sample_seconds=seconds, images_per_s=num_samples / seconds)
    return metrics, images, labels


def load_inception(weights: str | None, download: bool, device) -> InceptionExtractor | None:
    """The Inception-v3 extractor from a local file, or downloaded when ``download``; None if neither."""
    if weights is None and not download:
        return None
    return InceptionExtractor(weights, device=device)


def format_report(metrics: dict, floor: dict | None) -> str:
    """One labelled line per metric, the real-vs-real floor beside it."""
    lines = []
    for key, label in METRIC_LABELS.items():
        if key not in metrics or key.endswith("_std"):
            continue
        std_key = key.replace("_mean", "_std") if key.endswith("_mean") else None
        value = f"{metrics[key]:.4g}" + (f" ± {metrics[std_key]:.2g}" if std_key in metrics else "")
        ref = ""
        if floor is not None and key in floor:
            ref = f"{floor[key]:.4g}" + (f" ± {floor[std_key]:.2g}" if std_key in floor else "")
            ref = f"   (real vs real: {ref})"
        lines.append(f"{label:<42} {value:<18}{ref}")
    lines.append(f"{'NFE (model evaluations per image)':<42} {metrics['nfe']}")
    lines.append(f"{'images/s (sampling, this machine)':<42} {metrics['images_per_s']:.3g}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", default=None, help="default: the dataset in the checkpoint's provenance")
    p.add_argument("--data-dir", default=None, help="local copy of the dataset (default: torchvision download)")
    p.add_argument("--classifier", default=None,
                   help="domain classifier (default: checkpoints/classifiers/<dataset>.safetensors)")
    p.add_argument("--inception-weights", default=None, help="local Inception-v3 FID weights (.pth / .safetensors)")
    p.add_argument("--inception", action="store_true", help="also score on Inception-v3, downloading its weights")
    p.add_argument("--scheduler", default="ddim", choices=sorted(diffusion.SAMPLERS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--clip", default="none", choices=("none", "static", "dynamic"))
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--num-real", type=int, default=None, help="test images for the reference (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--no-floor", action="store_true", help="skip the real-vs-real floor")
    p.add_argument("--device", default=None)
    p.add_argument("--json", help="write the metrics (and floor) as JSON")
    p.add_argument("--grid", help="PNG of up to 10 samples per class, one row per class")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        pipe = diffusion.load(a.checkpoint, device=a.device)
        dataset = a.dataset or pipe.provenance.get("dataset")
        if dataset is None:
            raise ValueError(f"{a.checkpoint} does not name its dataset; pass --dataset")
        clf = load_classifier(a.classifier or default_classifier_path(dataset), device=pipe.device)
        inception = load_inception(a.inception_weights, a.inception, pipe.device)
        real = real_test_images(dataset, a.data_dir, a.num_real)
    except (ValueError, OSError, ClassifierError, DataError, InceptionUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"checkpoint {a.checkpoint}: {pipe.model.cfg.size} model, β-schedule {pipe.card.schedule.kind}, "
          f"{pipe.provenance.get('training_steps', '?')} training steps on {dataset}; device {pipe.device}")
    print(f"domain classifier: test accuracy {clf.info.get('test_accuracy', float('nan')):.2%}")
    reference = Reference.build(real, clf, inception)
    metrics, images, labels = evaluate_cell(pipe, reference, a.num_samples, a.scheduler, a.steps, a.guidance,
                                       a.seed, a.batch_size, a.clip)
    floor = None if a.no_floor else matched_floor(reference, dataset, a.data_dir, a.num_samples, sample_classes(pipe))
    print(f"{a.num_samples} samples, {a.scheduler} {a.steps} steps, guidance {a.guidance:g}, "
          f"against {len(real)} test images:")
    print(format_report(metrics, floor))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"checkpoint": a.checkpoint, "dataset": dataset, "scheduler": a.scheduler, "steps": a.steps,
                       "guidance": a.guidance, "seed": a.seed, "metrics": metrics, "floor": floor}, f, indent=2)
    if a.grid:
        save_grid(sample_sheet(images, labels), a.grid, nrow=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
