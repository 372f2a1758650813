"""The study's report: results.md (mean ± std over seeds, the real-vs-real floor), the plots, the
sample figures, and the merging of study folders that were run apart."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from training.study_grid import Cell, Grid, append_row, read_rows, row_key

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
              (f"- real vs real ({meta.get('floor_n', '?')} training images, class-balanced like the samples, "
               "against the same reference): " if meta.get("floor_method") else
               f"- real vs real ({meta.get('floor_n', '?')} train vs as many test images): ")
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
        if all(e["fid_domain"] > 0 for e in entries if "fid_domain" in e):
            ax.set_yscale("log")  # a diverged cell (FID in the hundreds) must not flatten the rest
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
    # A diverged cell (FID 10× the median or more) would squeeze the rest into a corner: it is named
    # under the plot instead of drawn.
    median = statistics.median([lin[k]["fid_domain"] for k in common] + [cos[k]["fid_domain"] for k in common])
    off = [k for k in common if max(lin[k]["fid_domain"], cos[k]["fid_domain"]) > 10 * median]
    shown = [k for k in common if k not in off] or common
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5.3 if off else 5))
    for sch in grid.schedulers:
        ks = [k for k in shown if k[0] == sch]
        if ks:
            ax.scatter([lin[k]["fid_domain"] for k in ks], [cos[k]["fid_domain"] for k in ks], label=sch)
    vals = [lin[k]["fid_domain"] for k in shown] + [cos[k]["fid_domain"] for k in shown]
    lo, hi = min(vals), max(vals)
    ax.plot([lo, hi], [lo, hi], color="grey", ls="--", label="equal")
    if lo > 0:
        ax.set(xscale="log", yscale="log")
    ax.set(xlabel=f"FID (domain), linear ({first['linear']})", ylabel=f"FID (domain), cosine ({first['cosine']})",
           title="below the line: cosine better")
    if off:
        note = "; ".join(f"{k[0]} {k[1]} steps w={k[2]:g}: {lin[k]['fid_domain']:.3g} vs {cos[k]['fid_domain']:.3g}"
                         for k in off)
        fig.text(0.5, 0.01, f"off scale (linear vs cosine): {note}", ha="center", fontsize=7, wrap=True)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.05 if off else 0, 1, 1))
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



# --------------------------------------------------------------------------------------------- merge

def merge_studies(sources: list[Path], out: Path) -> int:
    """Gather study folders that were run apart (say one per checkpoint, side by side on one GPU) into
    ``out``: their result rows, their per-cell sample rows and their checkpoint entries. All must
    agree on the dataset, the samples per cell, the clipping and the classifier; a cell already in
    ``out`` is kept. Returns the number of rows added. Write the report afterwards."""
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "study.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    have = {row_key(r) for r in read_rows(out / "results.csv")}
    added = 0
    for src in map(Path, sources):
        if not (src / "study.json").is_file():
            raise ValueError(f"{src} holds no study.json: not a study folder")
        m = json.loads((src / "study.json").read_text())
        if not meta:
            meta = m
        else:
            _check_compatible(meta, m, src)
            meta.setdefault("checkpoints", {}).update(m.get("checkpoints", {}))
        for row in read_rows(src / "results.csv"):
            if row_key(row) not in have:
                append_row(out / "results.csv", row)
                have.add(row_key(row))
                added += 1
        samples = src / "samples"
        if samples.is_dir():
            shutil.copytree(samples, out / "samples", dirs_exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2))
    return added


def _check_compatible(meta: dict, other: dict, src: Path) -> None:
    checks = (("dataset", lambda m: m.get("dataset")), ("samples per cell", lambda m: m.get("floor_n")),
              ("clipping", lambda m: m.get("grid", {}).get("clip", "none")),
              ("classifier accuracy", lambda m: m.get("classifier", {}).get("test_accuracy")),
              ("Inception scores", lambda m: m.get("inception", False)))
    for what, get in checks:
        if get(meta) != get(other):
            raise ValueError(f"{src}: {what} {get(other)!r} differs from the merged studies' {get(meta)!r}")
