"""training.study: the cell plan, and a tiny grid run end to end on two tiny models (linear and cosine
β-schedules) trained for a few steps on real MNIST digits."""

import json
import math

import pytest
from PIL import Image

import diffusion
import training.study as study_mod
from training.study import REDUCED, Cell, Grid, Study, aggregate, image_evaluations, main, read_rows
from tests.training.test_evaluate import train_tiny

TINY = dict(schedulers=("ddim", "heun"), steps=(2, 3), long_steps=(), guidance=(0.0, 2.0), anchor_scheduler="ddim",
            anchor_steps=2, anchor_guidance=2.0, repeat_seeds=(1,), num_samples=10, num_real=100)


def test_cells_are_the_two_sweeps_without_duplicates():
    g = Grid(schedulers=("ddpm", "ddim", "heun"), steps=(10, 20), long_steps=(1000,), guidance=(0.0, 2.0),
             anchor_scheduler="ddim", anchor_steps=20, anchor_guidance=2.0, repeat_seeds=(1,))
    cells = g.cells("m")
    keys = [(c.scheduler, c.steps, c.guidance, c.seed) for c in cells]
    assert len(keys) == len(set(keys))
    assert keys[:7] == [("ddpm", 10, 2.0, 0), ("ddpm", 20, 2.0, 0), ("ddpm", 1000, 2.0, 0), ("ddim", 10, 2.0, 0),
                        ("ddim", 20, 2.0, 0), ("ddim", 1000, 2.0, 0), ("heun", 10, 2.0, 0)]
    assert ("heun", 1000, 2.0, 0) not in keys  # long runs only for the long schedulers
    assert set(keys[8:]) == {("ddim", 20, 0.0, 0), ("ddim", 20, 0.0, 1), ("ddim", 20, 2.0, 1)}
    full = Grid(**{**g.__dict__, "full": True}).cells("m")
    assert len(full) == (2 * 3 + 2) * 2 + 2  # scheduler×steps (+1000 for two) × guidance, + the repeats
    reduced = Grid(**REDUCED).cells("m")
    assert len(reduced) == 5 * 2 + 3 + 4 and {c.steps for c in reduced} == {10, 25}
    assert 0.5 in {c.guidance for c in reduced}  # the seed study compares w = 0, 0.5 and 2
    cost = image_evaluations(Cell("m", "heun", 10, 1.0, 0), 100)
    assert cost == 100 * diffusion.SAMPLERS["heun"].evaluations(10) * 2
    assert image_evaluations(Cell("m", "ddim", 10, 0.0, 0), 100) == 1000


@pytest.fixture(scope="module")
def checkpoints(mnist_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return [str(train_tiny(mnist_dir, d, schedule)) for schedule in ("linear", "cosine")]


@pytest.fixture(scope="module")
def ran(checkpoints, mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    s = Study(checkpoints, out, Grid(**TINY), data_dir=str(mnist_dir), device="cpu", progress=False)
    s.run()
    return s


def test_grid_writes_csv_markdown_plots_and_samples(ran):
    out, plan = ran.out, ran.plan()
    rows = read_rows(out / "results.csv")
    assert len(plan) == 2 * (4 + 3) and len(rows) == len(plan)
    assert {(r["checkpoint"], r["scheduler"], int(r["steps"]), float(r["guidance"]), int(r["seed"])) for r in rows} \
        == {c.key() for c in plan}
    for r in rows:
        assert r["dataset"] == "mnist" and r["model_size"] == "tiny" and r["training_steps"] == "15"
        assert r["beta_schedule"] == r["checkpoint"].removeprefix("tiny-")
        assert int(r["nfe"]) == diffusion.SAMPLERS[r["scheduler"]].evaluations(int(r["steps"]))
        assert int(r["n_samples"]) == 10 and int(r["n_real"]) == 100 and r["fid_inception"] == ""
        assert 0 <= float(r["conditional_accuracy"]) <= 1 and 1 <= float(r["is_domain_mean"]) <= 10
        assert float(r["fid_domain"]) > 0 and math.isfinite(float(r["kid_domain_mean"]))
        assert float(r["images_per_s"]) > 0
    entries = aggregate(rows)
    assert len(entries) == 2 * 5
    anchor = [e for e in entries if (e["scheduler"], e["steps"]) == ("ddim", 2)]
    assert len(anchor) == 4 and all(e["n_seeds"] == 2 and e["fid_domain_sd"] is not None for e in anchor)

    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| linear") or line.startswith("| cosine")]
    assert len(table) == 10 + 4  # the results, then the best scheduler per step count
    assert "FID (domain)" in md and "real vs real (10 training images, class-balanced like the samples, against the same reference)" in md and "15 training steps" in md
    assert "10 samples per cell" in md and "reference: 100 test images" in md
    for name in ("fid_vs_steps.png", "guidance.png", "linear_vs_cosine.png", "samples/tiny-linear-steps.png",
                 "samples/tiny-cosine-guidance.png", "samples/tiny-linear/ddim-2-w0-seed1.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 100, name
    with Image.open(out / "samples/tiny-linear/heun-3-w2-seed0.png") as im:
        assert im.size == (302, 32)  # one image per class


def test_rerun_skips_done_cells_and_resumes(ran, monkeypatch):
    calls = []
    real_cell = study_mod.evaluate_cell
    monkeypatch.setattr(study_mod, "evaluate_cell", lambda *a, **k: calls.append(a[3:6]) or real_cell(*a, **k))
    ran.run()
    assert calls == [] and len(read_rows(ran.out / "results.csv")) == 14
    path = ran.out / "results.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # as if interrupted before the last cell
    ran.run()
    assert calls == [("ddim", 2, 2.0)]  # the last cell of the plan: cosine, repeat seed 1
    rows = read_rows(path)
    assert len(rows) == 14 and len({(r["checkpoint"], r["scheduler"], r["steps"], r["guidance"], r["seed"])
                                    for r in rows}) == 14


def test_cli_dry_run_and_bad_grid(checkpoints, tmp_path, capsys):
    args = ["--checkpoints", *checkpoints, "--out", str(tmp_path), "--schedulers", "ddim", "pndm", "--steps", "5",
            "--long-steps", "--guidance", "0", "1", "--anchor-steps", "5", "--repeat-seeds", "--num-samples", "10"]
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    # per checkpoint: ddim 5 @ w=2, pndm 5 @ w=2, ddim 5 @ w=0 and w=1
    nfe_pndm = diffusion.SAMPLERS["pndm"].evaluations(5)
    assert f"8 cells to run (0 done), 10 samples each: {2 * 10 * (10 + 2 * nfe_pndm + 5 + 10):,}" in text
    assert not (tmp_path / "results.csv").exists()
    assert main([*args, "--anchor-scheduler", "heun"]) == 2
    assert "anchor scheduler heun is not among" in capsys.readouterr().err


def test_clip_setting_is_applied_recorded_and_not_mixed(checkpoints, mnist_dir, tmp_path, monkeypatch):
    clips = []
    real_cell = study_mod.evaluate_cell
    monkeypatch.setattr(study_mod, "evaluate_cell", lambda *a, **k: clips.append(a[8]) or real_cell(*a, **k))
    grid = dict(TINY, schedulers=("ddim",), steps=(2,), guidance=(2.0,), repeat_seeds=())
    Study(checkpoints[:1], tmp_path, Grid(**grid, clip="static"), data_dir=str(mnist_dir), device="cpu",
          progress=False).run()
    assert clips == ["static"]
    assert "x̂0 clipping in every cell: static" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="clip=static"):
        Study(checkpoints[:1], tmp_path, Grid(**grid), data_dir=str(mnist_dir), device="cpu", progress=False).run()


def test_merge_joins_studies_run_apart_and_refuses_mismatches(checkpoints, mnist_dir, tmp_path, capsys):
    grid = dict(TINY, schedulers=("ddim",), steps=(2,), guidance=(0.0, 2.0), repeat_seeds=())
    parts = []
    for ck in checkpoints:  # one study per checkpoint, as scripts/study_gpu.sh runs them
        out = tmp_path / f"part-{len(parts)}"
        Study([ck], out, Grid(**grid), data_dir=str(mnist_dir), device="cpu", progress=False).run()
        parts.append(out)
    merged = tmp_path / "merged"
    args = ["--out", str(merged), "--schedulers", "ddim", "--steps", "2", "--long-steps", "--guidance", "0", "2",
            "--anchor-steps", "2", "--repeat-seeds"]
    assert main(["--merge", *map(str, parts), *args]) == 0
    assert "merged 4 cells" in capsys.readouterr().out
    rows = read_rows(merged / "results.csv")
    assert sorted((r["checkpoint"], float(r["guidance"])) for r in rows) == \
        [("tiny-cosine", 0.0), ("tiny-cosine", 2.0), ("tiny-linear", 0.0), ("tiny-linear", 2.0)]
    assert rows == read_rows(parts[0] / "results.csv") + read_rows(parts[1] / "results.csv")
    meta = json.loads((merged / "study.json").read_text())
    assert set(meta["checkpoints"]) == {"tiny-linear", "tiny-cosine"}
    assert (merged / "samples/tiny-cosine/ddim-2-w0-seed0.png").is_file()
    assert (merged / "linear_vs_cosine.png").is_file()
    md = (merged / "results.md").read_text()
    assert "`tiny-linear`" in md and "`tiny-cosine`" in md
    assert main(["--merge", *map(str, parts), *args]) == 0  # again: nothing new, nothing doubled
    assert len(read_rows(merged / "results.csv")) == 4

    other = tmp_path / "other"  # another sample count cannot join
    Study(checkpoints[:1], other, Grid(**dict(grid, num_samples=20)), data_dir=str(mnist_dir), device="cpu",
          progress=False).run()
    assert main(["--merge", str(other), *args]) == 2
    assert "samples per cell 20 differs" in capsys.readouterr().err
    assert main(["--out", str(merged)]) == 2  # neither checkpoints nor folders to merge


def test_refloor_rewrites_an_old_floor(checkpoints, mnist_dir, tmp_path):
    grid = dict(TINY, schedulers=("ddim",), steps=(2,), guidance=(2.0,), repeat_seeds=())
    Study(checkpoints[:1], tmp_path, Grid(**grid), data_dir=str(mnist_dir), device="cpu", progress=False).run()
    meta = json.loads((tmp_path / "study.json").read_text())
    assert meta["floor_method"].startswith("class-balanced") and meta["floor"]["n_real"] == 100
    fresh = meta["floor"]
    meta["floor"] = {"fid_domain": 99.0}  # as an older study wrote it: n train vs n test images
    del meta["floor_method"]
    (tmp_path / "study.json").write_text(json.dumps(meta))
    assert "train vs as many test images" in study_mod.markdown(meta, [], Grid(**grid))
    assert main(["--refloor", "--checkpoints", checkpoints[0], "--data-dir", str(mnist_dir), "--out", str(tmp_path),
                 "--schedulers", "ddim", "--steps", "2", "--long-steps", "--guidance", "2", "--anchor-steps", "2",
                 "--repeat-seeds"]) == 0
    meta = json.loads((tmp_path / "study.json").read_text())
    assert meta["floor"]["fid_domain"] == pytest.approx(fresh["fid_domain"], rel=1e-6)
    assert "class-balanced like the samples" in (tmp_path / "results.md").read_text()
