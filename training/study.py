"""The study grid: checkpoints (one per β-schedule) × schedulers × steps × guidance rates → results.

    python -m training.study --checkpoints LINEAR.safetensors COSINE.safetensors \\
        --data-dir /path/to/mnist-idx --out docs/study/mnist [--reduced] [--full] [--dry-run]

Which cells run (each over every checkpoint):
  - the steps sweep: every scheduler × every ``--steps`` (plus ``--long-steps`` for the
    ``--long-schedulers``, by default 1000 steps for ddpm and ddim) at the anchor guidance;
  - the guidance sweep: every ``--guidance`` rate at the anchor scheduler and step count;
  - with ``--full``, the whole product schedulers × steps × guidance rates instead;
  - ``--repeat-seeds``: the guidance-sweep cells again with other seeds, for error bars.

Studies run apart (one per checkpoint, side by side) join with ``--merge DIR [DIR ...] --out OUT``.

Cells with the same seed start from the same noise (common random numbers). Every finished cell is
appended to ``results.csv`` at once; a rerun into the same ``--out`` skips the cells already there, so
an interrupted study resumes. At the end (or with ``--report-only``) it writes ``results.md`` (mean ±
std over seeds, the real-vs-real floor), the plots ``fid_vs_steps.png``, ``guidance.png`` and
``linear_vs_cosine.png``, and sample sheets under ``samples/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import diffusion
from diffusion.imaging import save_grid
from training.classifier import ClassifierError, load_classifier
from training.data import DataError
from training.evaluate import (FLOOR_METHOD, Reference, default_classifier_path, evaluate_cell,
                               load_inception, matched_floor, real_test_images, sample_classes)
from training.metrics import InceptionUnavailable
from training.study_grid import FIELDS, REDUCED, Cell, Grid, append_row, image_evaluations, read_rows, row_key
from training.study_report import aggregate, markdown, merge_studies, write_report

__all__ = ["FIELDS", "REDUCED", "Cell", "Grid", "Study", "aggregate", "append_row", "image_evaluations", "main",
           "markdown", "merge_studies", "read_rows", "row_key", "write_report"]


def _sheet_row(images: torch.Tensor, labels: torch.Tensor | None, width: int = 10) -> torch.Tensor:
    """The first image of each class (or the first ``width`` images of an unconditional model)."""
    if labels is None:
        return images[:width]
    return torch.stack([images[labels == c][0] for c in labels.unique().tolist()])



# ----------------------------------------------------------------------------------------------- run

@dataclass
class Study:
    checkpoints: list[str]
    out: Path
    grid: Grid = field(default_factory=Grid)
    data_dir: str | None = None
    classifier: str | None = None
    inception_weights: str | None = None
    inception_download: bool = False
    device: str | None = None
    batch_size: int = 250
    progress: bool = True

    def _load(self):
        pipes = {Path(c).stem: diffusion.load(c, device=self.device) for c in self.checkpoints}
        if len(pipes) != len(self.checkpoints):
            raise ValueError("two checkpoints share a file name; the results are keyed by it")
        datasets = {p.provenance.get("dataset") for p in pipes.values()}
        if len(datasets) != 1 or None in datasets:
            raise ValueError(f"the checkpoints must name one dataset in their provenance, got {datasets}")
        return pipes, datasets.pop()

    def plan(self) -> list[Cell]:
        return [c for name in (Path(p).stem for p in self.checkpoints) for c in self.grid.cells(name)]

    def run(self) -> Path:
        """Run every cell not yet in results.csv, then write the report; returns the CSV path."""
        self.out.mkdir(parents=True, exist_ok=True)
        pipes, dataset = self._load()
        device = next(iter(pipes.values())).device
        clf_path, clf, inception = self._scorers(dataset, device)
        csv_path = self.out / "results.csv"
        done = {row_key(r) for r in read_rows(csv_path)}
        todo = [c for c in self.plan() if c.key() not in done]
        g = self.grid
        meta_path = self.out / "study.json"
        old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if done and old.get("grid", {}).get("clip", "none") != g.clip:
            raise ValueError(f"{csv_path} holds cells sampled with clip={old.get('grid', {}).get('clip', 'none')}; "
                             f"write a grid with clip={g.clip} to another --out")
        meta = self._meta(dataset, pipes, clf_path, clf, inception, device)
        if todo:
            real = real_test_images(dataset, self.data_dir, g.num_real)
            reference = Reference.build(real, clf, inception)
            meta["n_real"] = len(real)
            if (old.get("floor_n") == g.num_samples and old.get("dataset") == dataset and "floor" in old
                    and old.get("floor_method") == FLOOR_METHOD and old.get("n_real") == len(real)):
                meta["floor"] = old["floor"]
            else:
                meta["floor"] = self._floor(reference, dataset, pipes, g.num_samples)
            meta["floor_method"] = FLOOR_METHOD
            meta["floor_n"] = g.num_samples
            meta_path.write_text(json.dumps(meta, indent=2))
            for cell in tqdm(todo, desc="study cells", unit="cell", disable=not self.progress):
                pipe = pipes[cell.checkpoint]
                metrics, images, labels = evaluate_cell(pipe, reference, g.num_samples, cell.scheduler, cell.steps,
                                                        cell.guidance, cell.seed, self.batch_size, g.clip,
                                                        progress=self.progress)
                append_row(csv_path, {**asdict(cell), **metrics, "dataset": dataset,
                                      "beta_schedule": pipe.card.schedule.kind, "model_size": pipe.model.cfg.size,
                                      "training_steps": pipe.provenance.get("training_steps"),
                                      "n_samples": g.num_samples, "device": str(device)})
                save_grid(_sheet_row(images, labels), self.out / "samples" / cell.checkpoint / f"{cell.slug()}.png",
                          nrow=10)
        write_report(self.out, g)
        return csv_path

    def refloor(self) -> dict:
        """Recompute the floor in ``study.json`` the current way (:func:`training.evaluate.matched_floor`)
        without sampling anything: the checkpoints give the class count, the settings come from study.json."""
        meta_path = self.out / "study.json"
        if not meta_path.is_file():
            raise ValueError(f"{meta_path} does not exist")
        meta = json.loads(meta_path.read_text())
        pipes, dataset = self._load()
        _, clf, inception = self._scorers(dataset, next(iter(pipes.values())).device)
        real = real_test_images(dataset, self.data_dir, meta.get("grid", {}).get("num_real"))
        n = int(meta.get("floor_n") or self.grid.num_samples)
        meta.update(floor=self._floor(Reference.build(real, clf, inception), dataset, pipes, n), floor_n=n,
                    floor_method=FLOOR_METHOD, n_real=len(real))
        meta_path.write_text(json.dumps(meta, indent=2))
        return meta["floor"]

    def _scorers(self, dataset: str, device) -> tuple[str, object, object]:
        """(classifier path, domain classifier, Inception extractor or None) on ``device``."""
        clf_path = self.classifier or str(default_classifier_path(dataset))
        return clf_path, load_classifier(clf_path, device=device), \
            load_inception(self.inception_weights, self.inception_download, device)

    def _floor(self, reference: Reference, dataset: str, pipes: dict, n: int) -> dict:
        """The matched real-vs-real floor of ``n``-sample cells (:func:`training.evaluate.matched_floor`)."""
        return matched_floor(reference, dataset, self.data_dir, n, sample_classes(next(iter(pipes.values()))))

    def _meta(self, dataset, pipes, clf_path, clf, inception, device) -> dict:
        g = self.grid
        return {
            "dataset": dataset, "data_dir": self.data_dir, "device": str(device),
            "checkpoints": {name: {"path": str(Path(self.checkpoints[i])), "beta_schedule": p.card.schedule.kind,
                                   "model_size": p.model.cfg.size, "parameters": diffusion.count_parameters(p.model),
                                   "training_steps": p.provenance.get("training_steps")}
                            for i, (name, p) in enumerate(pipes.items())},
            "classifier": {"path": _display_path(clf_path), "test_accuracy": clf.info.get("test_accuracy")},
            "inception": inception is not None,
            "grid": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(g).items()},
        }


def _display_path(path) -> str:
    """A path as the results show it: relative to the working directory when it lies below it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


# ----------------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    d = Grid()
    p = argparse.ArgumentParser(prog="python -m training.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", help="one checkpoint per β-schedule (same dataset)")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="gather these study folders (run apart, e.g. one per checkpoint) into --out and report")
    p.add_argument("--out", required=True, help="folder for results.csv / .md, plots and samples")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--classifier", default=None, help="default: checkpoints/classifiers/<dataset>.safetensors")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--inception", action="store_true", help="also score on Inception-v3, downloading its weights")
    p.add_argument("--reduced", action="store_true",
                   help=f"the CPU grid: {', '.join(f'{k}={v}' for k, v in REDUCED.items())} (other flags override)")
    p.add_argument("--full", action="store_true", help="every scheduler × steps × guidance, not the two sweeps")
    p.add_argument("--schedulers", nargs="+", choices=sorted(diffusion.SAMPLERS))
    p.add_argument("--steps", nargs="+", type=int)
    p.add_argument("--long-steps", nargs="*", type=int)
    p.add_argument("--long-schedulers", nargs="*", choices=sorted(diffusion.SAMPLERS))
    p.add_argument("--guidance", nargs="+", type=float)
    p.add_argument("--anchor-scheduler", choices=sorted(diffusion.SAMPLERS))
    p.add_argument("--anchor-steps", type=int)
    p.add_argument("--anchor-guidance", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--repeat-seeds", nargs="*", type=int)
    p.add_argument("--num-samples", type=int, help=f"samples per cell (default {d.num_samples}; reduced "
                                                   f"{REDUCED['num_samples']})")
    p.add_argument("--num-real", type=int, help="test images in the reference (default: the whole split)")
    p.add_argument("--clip", choices=("none", "static", "dynamic"),
                   help="x̂0 clipping in every cell (default none: the samplers as published)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the cells and their cost, run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md and the plots from results.csv")
    p.add_argument("--refloor", action="store_true",
                   help="recompute the real-vs-real floor in study.json (needs --checkpoints and --data-dir), then report")
    p.add_argument("--no-progress", action="store_true")
    return p


def grid_from_args(a: argparse.Namespace) -> Grid:
    values = dict(REDUCED) if a.reduced else {}
    for name in ("schedulers", "steps", "long_steps", "long_schedulers", "guidance", "anchor_scheduler",
                 "anchor_steps", "anchor_guidance", "seed", "repeat_seeds", "num_samples", "num_real", "clip"):
        v = getattr(a, name)
        if v is not None:
            values[name] = tuple(v) if isinstance(v, list) else v
    grid = Grid(full=a.full, **values)
    if grid.anchor_scheduler not in grid.schedulers:
        raise ValueError(f"the anchor scheduler {grid.anchor_scheduler} is not among --schedulers")
    if min(grid.steps + grid.long_steps + (grid.anchor_steps,)) < 1 or grid.num_samples < 2:
        raise ValueError("steps must be >= 1 and --num-samples >= 2")
    return grid


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        grid = grid_from_args(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.merge:
        try:
            added = merge_studies([Path(d) for d in a.merge], Path(a.out))
            write_report(Path(a.out), grid)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"merged {added} cells into {a.out}; wrote {Path(a.out) / 'results.md'}")
        return 0
    if not a.checkpoints and not a.report_only:
        print("error: give --checkpoints (or --merge, or --report-only)", file=sys.stderr)
        return 2
    study = Study(a.checkpoints or [], Path(a.out), grid, a.data_dir, a.classifier, a.inception_weights, a.inception,
                  a.device, a.batch_size, progress=not a.no_progress)
    if a.refloor:
        try:
            study.refloor()
        except (ValueError, OSError, ClassifierError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if a.report_only or a.refloor:
        write_report(study.out, grid)
        print(f"wrote {study.out / 'results.md'}")
        return 0
    if a.dry_run:
        cells = study.plan()
        done = {row_key(r) for r in read_rows(study.out / "results.csv")}
        todo = [c for c in cells if c.key() not in done]
        for c in todo:
            print(f"{c.checkpoint:<32} {c.scheduler:<9} {c.steps:>5} steps  w={c.guidance:<4g} seed {c.seed}  "
                  f"{image_evaluations(c, grid.num_samples):>12,} image-evaluations")
        total = sum(image_evaluations(c, grid.num_samples) for c in todo)
        print(f"{len(todo)} cells to run ({len(cells) - len(todo)} done), {grid.num_samples} samples each: "
              f"{total:,} network image-evaluations")
        return 0
    try:
        path = study.run()
    except (ValueError, OSError, ClassifierError, DataError, InceptionUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}, {path.with_suffix('.md')} and plots in {path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
