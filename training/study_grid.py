"""The study's grid and its results file: which cells run, what one costs, and the rows of
``results.csv`` (one per finished cell, appended at once so an interrupted study resumes)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import diffusion
from training.evaluate import nfe

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
REDUCED = dict(steps=(10, 25), long_steps=(), guidance=(0.0, 0.5, 1.0, 3.0),  # 0.5: the seed study's w
               anchor_steps=25, anchor_guidance=1.0,
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

