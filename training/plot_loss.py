"""Plot the loss curves of training runs (their ``loss.csv``) in one figure.

    python -m training.plot_loss runs/a/loss.csv runs/b/loss.csv --out loss.png [--labels a b] [--smooth 5]

The x axis is the training step, the y axis the MSE loss (log scale), one line per run; ``--smooth N``
draws the running mean over N logged points over the raw values."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_loss(path: str | Path) -> tuple[list[int], list[float]]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step") and r.get("loss")]
    if not rows:
        raise ValueError(f"{path} holds no step,loss rows")
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def running_mean(values: list[float], n: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - n] if i >= n else 0.0)
        out.append(acc / min(i + 1, n))
    return out


def plot_losses(paths: list[str], out: str | Path, labels: list[str] | None = None, smooth: int = 1) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(p).parent.name or Path(p).stem for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(paths)} files but {len(labels)} labels")
    fig, ax = plt.subplots(figsize=(7, 4))
    for path, label in zip(paths, labels):
        steps, loss = read_loss(path)
        if smooth > 1:
            line, = ax.plot(steps, loss, alpha=0.25)
            ax.plot(steps, running_mean(loss, smooth), color=line.get_color(), label=label)
        else:
            ax.plot(steps, loss, label=label)
    ax.set(xlabel="training step", ylabel="loss (MSE)", yscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.plot_loss", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="loss.csv files written by python -m training")
    p.add_argument("--out", required=True)
    p.add_argument("--labels", nargs="+")
    p.add_argument("--smooth", type=int, default=1)
    a = p.parse_args(argv)
    try:
        path = plot_losses(a.files, a.out, a.labels, max(1, a.smooth))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
