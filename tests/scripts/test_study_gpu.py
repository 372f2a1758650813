"""scripts/study_gpu.sh end to end on the CPU, in miniature: four tiny trainings on a wall-clock
budget, the classifier, four studies, and what comes back under $OUT (then merged by the CLI)."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from training.study import main as study_main
from training.study import read_rows

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"


def test_study_gpu_script_in_miniature(tmp_path):
    if not (SHARED / "mnist-10k").is_dir() or not (SHARED / "fashion-mnist").is_dir():
        pytest.skip("../shared/data not available")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("mnist-10k", "fashion-mnist"):
        (data / name).symlink_to(SHARED / name)
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = dict(os.environ, OUT=str(out), RUNS=str(runs), DATA=str(data), MODEL="tiny", TRAIN_S="2", STUDY_S="900",
               N="10", STEPS="2", LONG="3", ANCHOR="2", CLF_EPOCHS="1", CLF_S="600", CLF_ARGS="--limit 200",
               STUDY_ARGS="--num-real 500", MPS="0",
               OMP_NUM_THREADS="1", PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "study_gpu.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["fashion_mnist-tiny-cosine.safetensors", "fashion_mnist-tiny-linear.safetensors",
                     "mnist-tiny-cosine.safetensors", "mnist-tiny-linear.safetensors", "study.tgz"]
    unpacked = tmp_path / "unpacked"
    with tarfile.open(out / "study.tgz") as tar:
        tar.extractall(unpacked, filter="data")
    assert not list(unpacked.rglob("*.state.safetensors"))  # training states stay behind
    # every study finished its grid: 5 schedulers at 2 steps, guidance 0-4 at the anchor (w=2 is already
    # there), the guidance cells again with seeds 1 and 2, and the long runs (LONG=3) of ddpm and ddim
    for ds in ("mnist", "fashion_mnist"):
        for s in ("linear", "cosine"):
            rows = read_rows(unpacked / f"study-{ds}-{s}" / "results.csv")
            assert len(rows) == 5 + 4 + 2 * 5 + 2, (ds, s, len(rows))
            assert {r["n_samples"] for r in rows} == {"10"}
        assert (unpacked / f"{ds}-linear" / "loss.csv").is_file()
    assert (unpacked / "fashion_mnist-classifier.safetensors").is_file()
    assert "training done" in r.stdout and "studies done" in r.stdout

    merged = tmp_path / "merged"
    assert study_main(["--merge", str(unpacked / "study-mnist-linear"), str(unpacked / "study-mnist-cosine"),
                       "--out", str(merged), "--steps", "2", "--long-steps", "3", "--guidance", "0", "0.5", "1", "2",
                       "4", "--anchor-steps", "2", "--repeat-seeds", "1", "2"]) == 0
    assert len(read_rows(merged / "results.csv")) == 2 * 21
    assert (merged / "linear_vs_cosine.png").is_file()
    shutil.rmtree(unpacked)
