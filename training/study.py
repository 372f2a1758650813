"""The study grid: checkpoints (one per β-schedule) × schedulers × steps × guidance rates → results.

    python -m training.study --checkpoints LINEAR.safetensors COSINE.safetensors \\
        --data-dir /path/to/mnist-idx --out docs/study/mnist [--reduced] [--full] [--dry-run]

Which cells run (each over every checkpoint):
  - the steps sweep: every scheduler × every ``--steps`` (plus ``--long-steps`` for the
    ``--long-schedulers``, by default 1000 steps for ddpm and ddim) at the anchor guidance;
  - the guidance sweep: every ``--guidance`` rate at the anchor scheduler and step count;
  - with ``--full``, the whole product schedulers × steps × guidance rates instead;
  - ``--repeat-seeds``: the guidance-sweep cells again with other seeds, for error bars.

Cells with the same seed start from the same noise (common random numbers). Every finished cell is
appended to ``results.csv`` at once; a rerun into the same ``--out`` skips the cells already there, so
an interrupted study resumes. At the end (or with ``--report-only``) it writes ``results.md`` (mean ±
std over seeds, the real-vs-real floor), the plots ``fid_vs_steps.png``, ``guidance.png`` and
``linear_vs_cosine.png``, and sample sheets under ``samples/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import diffusion
from diffusion.imaging import save_grid
from training.classifier import ClassifierError, load_classifier
from training.data import DataError
from training.evaluate import (Reference, default_classifier_path, evaluate_cell, load_inception, nfe,
                               real_test_images)
from training.metrics import InceptionUnavailable, real_floor

FIELDS = ("dataset", "checkpoint", "beta_schedule", "model_size", "training_steps", "scheduler", "steps", "nfe",
          "guidance", "seed", "n_samples", "n_real", "fid_domain", "kid_domain_mean", "kid_domain_std",
          "is_domain_mean", "is_domain_std", "conditional_accuracy", "fid_inception", "kid_inception_mean",
          "kid_inception_std", "is_inception_mean", "is_inception_std", "images_per_s", "sample_seconds", "device")


@dataclass(frozen=True)
class Cell:
    checkpoint: str  # the checkpoint's file stem
    scheduler: str
    steps: int
    guidance: float
    seed: int

    def key(self) -> tuple:
        return (self.checkpoint, self.scheduler, int(self.steps), float(self.guidance), int(self.seed))

    def slug(self) -> str:
        return f"{self.scheduler}-{self.steps}-w{self.guidance:g}-seed{self.seed}"


@dataclass
class Grid:
    schedulers: tuple[str, ...] = tuple(diffusion.SAMPLERS)
    steps: tuple[int, ...] = (10, 20, 50, 100)
    long_steps: tuple[int, ...] = (1000,)
    long_schedulers: tuple[str, ...] = ("ddpm", "ddim")
    guidance: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    anchor_scheduler: str = "ddim"
    anchor_steps: int = 50
    anchor_guidance: float = 2.0
    seed: int = 0
    repeat_seeds: tuple[int, ...] = (1, 2)
    full: bool = False
    num_samples: int = 5000
    num_real: int | None = None  # None: the whole test split
    clip: str = "none"  # x̂0 clipping for every cell: none | static | dynamic

    def steps_for(self, scheduler: str) -> tuple[int, ...]:
        return self.steps + (self.long_steps if scheduler in self.long_schedulers else ())

    def cells(self, checkpoint: str) -> list[Cell]:
        """The cells of one checkpoint, in run order, without duplicates."""
        out = []
        ws = self.guidance if self.full else (self.anchor_guidance,)
        for sch in self.schedulers:
            for s in self.steps_for(sch):
                out += [Cell(checkpoint, sch, s, w, self.seed) for w in ws]
        for seed in (self.seed, *self.repeat_seeds):
            out += [Cell(checkpoint, self.anchor_scheduler, self.anchor_steps, w, seed) for w in self.guidance]
        return list(dict.fromkeys(out))


# Small enough for a CPU: the sample count is stated in every output.
REDUCED = dict(steps=(10, 25), long_steps=(), guidance=(0.0, 1.0, 3.0), anchor_steps=25, anchor_guidance=1.0,
               repeat_seeds=(1,), num_samples=200, num_real=None)


def image_evaluations(cell: Cell, num_samples: int) -> int:
    """Network image-evaluations a cell costs: samples × NFE, doubled when guidance > 0 (the
    unconditional branch rides in the same forward pass on a doubled batch)."""
    return num_samples * nfe(cell.scheduler, cell.steps) * (2 if cell.guidance > 0 else 1)


# ------------------------------------------------------------------------------------------- results

def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_key(row: dict) -> tuple:
    return (row["checkpoint"], row["scheduler"], int(row["steps"]), float(row["guidance"]), int(row["seed"]))


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in FIELDS})


def _sheet_row(images: torch.Tensor, labels: torch.Tensor | None, width: int = 10) -> torch.Tensor:
    """The first image of each class (or the first ``width`` images of an unconditional model)."""
    if labels is None:
        return images[:width]
    return torch.stack([images[labels == c][0] for c in labels.unique().tolist()])


# -------------------------------------------------------------------------------------------- report

SCORES = ("fid_domain", "kid_domain_mean", "is_domain_mean", "conditional_accuracy", "fid_inception",
          "kid_inception_mean", "is_inception_mean", "images_per_s")
COLUMNS = (("fid_domain", "FID (domain)", "{:.3g}"), ("kid_domain_mean", "KID (domain)", "{:.2g}"),
           ("is_domain_mean", "IS (domain)", "{:.3g}"), ("conditional_accuracy", "cond. accuracy", "{:.1%}"),
           ("fid_inception", "FID (Inception-v3)", "{:.3g}"), ("kid_inception_mean", "KID (Inception-v3)", "{:.2g}"),
           ("is_inception_mean", "IS (Inception-v3)", "{:.3g}"), ("images_per_s", "images/s", "{:.3g}"))


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (checkpoint, scheduler, steps, guidance): each score's mean over seeds, its sample
    standard deviation (``<score>_sd``, None for one seed) and ``n_seeds``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(row_key(r)[:4], []).append(r)
    out = []
    for (ckpt, sch, steps, w), rs in sorted(groups.items()):
        first = rs[0]
        entry = {"checkpoint": ckpt, "beta_schedule": first["beta_schedule"], "model_size": first["model_size"],
                 "training_steps": first["training_steps"], "scheduler": sch, "steps": steps,
                 "nfe": int(first["nfe"]), "guidance": w, "n_seeds": len(rs), "n_samples": int(first["n_samples"])}
        for m in SCORES:
            vals = [float(r[m]) for r in rs if r.get(m) not in ("", None)]
            if vals:
                entry[m] = statistics.fmean(vals)
                entry[f"{m}_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(entry)
    return out


def _fmt(entry: dict, key: str, pattern: str) -> str:
    if key not in entry:
        return "–"
    sd = entry.get(f"{key}_sd")
    return pattern.format(entry[key]) + (f" ± {pattern.format(sd)}" if sd is not None else "")


def markdown(meta: dict, entries: list[dict], grid: Grid) -> str:
    floor = meta.get("floor", {})
    cols = [c for c in COLUMNS if any(c[0] in e for e in entries)]
    lines = [f"# Study results: {meta.get('dataset')}", ""]
    for name, c in meta.get("checkpoints", {}).items():
        lines.append(f"- `{name}`: {c['model_size']} model ({c['parameters']:,} parameters), β-schedule "
                     f"{c['beta_schedule']}, {c['training_steps']} training steps")
    clf = meta.get("classifier", {})
    acc = clf.get("test_accuracy")
    lines += [f"- {entries[0]['n_samples'] if entries else '?'} samples per cell, balanced over the classes; "
              f"reference: {meta.get('n_real', '?')} test images; device {meta.get('device')}",
              f"- domain classifier `{clf.get('path')}`" + (f" (test accuracy {acc:.2%})" if acc is not None else ""),
              f"- real vs real ({meta.get('floor_n', '?')} train vs test images): "
              + ", ".join(f"{label} {pattern.format(floor[key])}" for key, label, pattern in cols if key in floor),
              f"- anchor cell: {grid.anchor_scheduler}, {grid.anchor_steps} steps, guidance {grid.anchor_guidance:g}; "
              "± is the standard deviation over seeds",
              f"- x̂0 clipping in every cell: {meta.get('grid', {}).get('clip', grid.clip)}", ""]
    head = ["β-schedule", "scheduler", "steps", "NFE", "guidance", "seeds"] + [c[1] for c in cols]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for e in entries:
        cells = [e["beta_schedule"], e["scheduler"], str(e["steps"]), str(e["nfe"]), f"{e['guidance']:g}",
                 str(e["n_seeds"])] + [_fmt(e, k, p) for k, _, p in cols]
        lines.append("| " + " | ".join(cells) + " |")
    best = _best_schedulers(entries, grid.anchor_guidance)
    if best:
        lines += ["", f"Lowest FID (domain) per step count at guidance {grid.anchor_guidance:g}:", "",
                  "| β-schedule | steps | scheduler | FID (domain) |", "| --- | --- | --- | --- |"]
        lines += [f"| {b['beta_schedule']} | {b['steps']} | {b['scheduler']} | {_fmt(b, 'fid_domain', '{:.3g}')} |"
                  for b in best]
    return "\n".join(lines) + "\n"


def _best_schedulers(entries: list[dict], guidance: float) -> list[dict]:
    by: dict[tuple, dict] = {}
    for e in entries:
        if e["guidance"] == guidance and "fid_domain" in e:
            k = (e["beta_schedule"], e["checkpoint"], e["steps"])
            if k not in by or e["fid_domain"] < by[k]["fid_domain"]:
                by[k] = e
    return [by[k] for k in sorted(by)]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(ax, xs, entries, key, label, **kw):
    ys = [e[key] for e in entries]
    err = [e.get(f"{key}_sd") or 0.0 for e in entries]
    ax.errorbar(xs, ys, yerr=err if any(err) else None, marker="o", capsize=3, label=label, **kw)


def plot_fid_vs_steps(entries: list[dict], grid: Grid, floor: dict, path: Path) -> None:
    plt = _plt()
    ckpts = sorted({e["checkpoint"] for e in entries})
    fig, axes = plt.subplots(1, len(ckpts), figsize=(5 * len(ckpts), 4), squeeze=False, sharey=True)
    for ax, ck in zip(axes[0], ckpts):
        for sch in grid.schedulers:
            es = sorted((e for e in entries if e["checkpoint"] == ck and e["scheduler"] == sch
                         and e["guidance"] == grid.anchor_guidance and "fid_domain" in e), key=lambda e: e["steps"])
            if es:
                _series(ax, [e["steps"] for e in es], es, "fid_domain", sch)
        if "fid_domain" in floor:
            ax.axhline(floor["fid_domain"], color="grey", ls="--", label="real vs real")
        beta = next(e["beta_schedule"] for e in entries if e["checkpoint"] == ck)
        ticks = sorted({e["steps"] for e in entries if e["checkpoint"] == ck})
        ax.set(xscale="log", xlabel="sampling steps", title=f"{ck} ({beta})")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"FID (domain), guidance {grid.anchor_guidance:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_guidance(entries: list[dict], grid: Grid, floor: dict, path: Path) -> None:
    plt = _plt()
    sel = [e for e in entries if e["scheduler"] == grid.anchor_scheduler and e["steps"] == grid.anchor_steps]
    panels = [(k, label) for k, label in (("fid_domain", "FID (domain)"), ("is_domain_mean", "IS (domain)"),
                                          ("conditional_accuracy", "conditional accuracy"),
                                          ("fid_inception", "FID (Inception-v3)"), ("is_inception_mean", "IS (Inception-v3)"))
              if any(k in e for e in sel)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for ck in sorted({e["checkpoint"] for e in sel}):
            es = sorted((e for e in sel if e["checkpoint"] == ck and key in e), key=lambda e: e["guidance"])
            if es:
                _series(ax, [e["guidance"] for e in es], es, key, f"{ck} ({es[0]['beta_schedule']})")
        if key in floor:
            ax.axhline(floor[key], color="grey", ls="--", label="real vs real")
        ax.set(xlabel="guidance rate w", ylabel=label)
        ax.legend(fontsize=7)
    fig.suptitle(f"{grid.anchor_scheduler}, {grid.anchor_steps} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_linear_vs_cosine(entries: list[dict], grid: Grid, path: Path) -> bool:
    """FID (domain) of the cosine model against the linear one, cell by matched cell; False (and no
    file) unless both schedules are present."""
    first = {}
    for e in entries:
        first.setdefault(e["beta_schedule"], e["checkpoint"])
    if not {"linear", "cosine"} <= set(first):
        return False
    cell = lambda e: (e["scheduler"], e["steps"], e["guidance"])  # noqa: E731
    lin = {cell(e): e for e in entries if e["checkpoint"] == first["linear"] and "fid_domain" in e}
    cos = {cell(e): e for e in entries if e["checkpoint"] == first["cosine"] and "fid_domain" in e}
    common = sorted(set(lin) & set(cos))
    if not common:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for sch in grid.schedulers:
        ks = [k for k in common if k[0] == sch]
        if ks:
            ax.scatter([lin[k]["fid_domain"] for k in ks], [cos[k]["fid_domain"] for k in ks], label=sch)
    vals = [lin[k]["fid_domain"] for k in common] + [cos[k]["fid_domain"] for k in common]
    lo, hi = min(vals), max(vals)
    ax.plot([lo, hi], [lo, hi], color="grey", ls="--", label="equal")
    if lo > 0:
        ax.set(xscale="log", yscale="log")
    ax.set(xlabel=f"FID (domain), linear ({first['linear']})", ylabel=f"FID (domain), cosine ({first['cosine']})",
           title="below the line: cosine better")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def sample_figure(out: Path, checkpoint: str, rows: list[tuple[str, Cell]], path: Path) -> bool:
    """Stack the saved one-image-per-class rows of ``rows`` (label, cell) into one labelled figure."""
    import numpy as np
    from PIL import Image

    found = [(label, out / "samples" / checkpoint / f"{c.slug()}.png") for label, c in rows]
    found = [(label, p) for label, p in found if p.is_file()]
    if not found:
        return False
    plt = _plt()
    fig, axes = plt.subplots(len(found), 1, figsize=(6, 0.75 * len(found) + 0.4), squeeze=False)
    for ax, (label, p) in zip(axes[:, 0], found):
        ax.imshow(np.asarray(Image.open(p).convert("L")), cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(checkpoint, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path, grid: Grid) -> list[Path]:
    """results.md, the plots and the sample figures from results.csv and study.json; the paths written."""
    rows = read_rows(out / "results.csv")
    if not rows:
        raise ValueError(f"{out / 'results.csv'} holds no results yet")
    meta = json.loads((out / "study.json").read_text()) if (out / "study.json").is_file() else {}
    floor = meta.get("floor", {})
    entries = aggregate(rows)
    written = [out / "results.md", out / "fid_vs_steps.png", out / "guidance.png"]
    written[0].write_text(markdown(meta, entries, grid))
    plot_fid_vs_steps(entries, grid, floor, written[1])
    plot_guidance(entries, grid, floor, written[2])
    if plot_linear_vs_cosine(entries, grid, out / "linear_vs_cosine.png"):
        written.append(out / "linear_vs_cosine.png")
    for ck in sorted({e["checkpoint"] for e in entries}):
        steps_rows = [(f"{s} {n}", Cell(ck, s, n, grid.anchor_guidance, grid.seed))
                      for s in grid.schedulers for n in grid.steps_for(s)]
        w_rows = [(f"w={w:g}", Cell(ck, grid.anchor_scheduler, grid.anchor_steps, w, grid.seed)) for w in grid.guidance]
        for kind, rs in (("steps", steps_rows), ("guidance", w_rows)):
            path = out / "samples" / f"{ck}-{kind}.png"
            if sample_figure(out, ck, rs, path):
                written.append(path)
    return written


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
        clf_path = self.classifier or str(default_classifier_path(dataset))
        clf = load_classifier(clf_path, device=device)
        inception = load_inception(self.inception_weights, self.inception_download, device)
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
            if old.get("floor_n") == g.num_samples and old.get("dataset") == dataset and "floor" in old:
                meta["floor"] = old["floor"]
            else:
                meta["floor"] = real_floor(dataset, self.data_dir, clf, n=g.num_samples, inception=inception)
            meta["floor_n"] = g.num_samples
            meta_path.write_text(json.dumps(meta, indent=2))
            for cell in tqdm(todo, desc="study cells", unit="cell", disable=not self.progress):
                pipe = pipes[cell.checkpoint]
                metrics, images, labels = evaluate_cell(pipe, reference, g.num_samples, cell.scheduler, cell.steps,
                                                        cell.guidance, cell.seed, self.batch_size, g.clip,
                                                        progress=self.progress)
                append_row(csv_path, {**asdict(cell), **metrics, "dataset": dataset,
                                      "beta_schedule": pipe.cfg.schedule, "model_size": pipe.cfg.size,
                                      "training_steps": pipe.provenance.get("training_steps"),
                                      "n_samples": g.num_samples, "device": str(device)})
                save_grid(_sheet_row(images, labels), self.out / "samples" / cell.checkpoint / f"{cell.slug()}.png",
                          nrow=10)
        write_report(self.out, g)
        return csv_path

    def _meta(self, dataset, pipes, clf_path, clf, inception, device) -> dict:
        g = self.grid
        return {
            "dataset": dataset, "data_dir": self.data_dir, "device": str(device),
            "checkpoints": {name: {"path": str(Path(self.checkpoints[i])), "beta_schedule": p.cfg.schedule,
                                   "model_size": p.cfg.size, "parameters": diffusion.count_parameters(p.model),
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
    p.add_argument("--checkpoints", nargs="+", required=True, help="one checkpoint per β-schedule (same dataset)")
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
    study = Study(a.checkpoints, Path(a.out), grid, a.data_dir, a.classifier, a.inception_weights, a.inception,
                  a.device, a.batch_size, progress=not a.no_progress)
    if a.report_only:
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
