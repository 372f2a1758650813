"""training.evaluate on a tiny class-conditional model trained for a few steps on real MNIST digits,
scored with the repository's MNIST domain classifier."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import diffusion
from training.classifier import load_classifier
from training.config import PRESETS, TrainConfig
from training.evaluate import (Reference, class_plan, evaluate_cell, generate_samples, main, nfe,
                               real_test_images, sample_sheet)
from training.loop import train
from training.metrics import InceptionExtractor, evaluate_images, real_floor
from tests.training.test_metrics import random_inception_weights  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[2]
CLASSIFIER = ROOT / "checkpoints" / "classifiers" / "mnist.safetensors"


def train_tiny(mnist_dir, out: Path, schedule: str = "linear", steps: int = 15) -> Path:
    """A tiny class model trained for ``steps`` steps: poor samples, but a real, non-degenerate network."""
    cfg = TrainConfig(**{**PRESETS["smoke"], "data_dir": str(mnist_dir), "out": str(out), "schedule": schedule,
                         "max_steps": steps, "batch_size": 8, "lr": 1e-3, "name": f"tiny-{schedule}"})
    return train(cfg, progress=False)


@pytest.fixture(scope="module")
def tiny(mnist_dir, tmp_path_factory):
    return train_tiny(mnist_dir, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(tiny):
    return diffusion.load(str(tiny), device="cpu")


@pytest.fixture(scope="module")
def clf():
    return load_classifier(CLASSIFIER)


def test_class_plan_balances_the_classes(pipe):
    plan = class_plan(pipe, 25)
    assert [c for c, _ in plan] == list(range(10))
    assert [k for _, k in plan] == [3] * 5 + [2] * 5
    assert [c for c, _ in class_plan(pipe, 3)] == [0, 1, 2]


def test_generate_samples_labels_and_seeds(pipe):
    x, y, seconds = generate_samples(pipe, 12, "ddim", 2, 1.0, seed=0, batch_size=2, progress=False)
    assert x.shape == (12, 1, 28, 28) and x.min() >= -1 and x.max() <= 1 and seconds > 0
    assert y.tolist() == [0, 0, 1, 1] + list(range(2, 10))
    again, _, _ = generate_samples(pipe, 12, "ddim", 2, 1.0, seed=0, batch_size=5, progress=False)
    # Batching (classes mix in a batch) does not change an image beyond float rounding of batched kernels.
    torch.testing.assert_close(x, again, atol=1e-4, rtol=0)
    other, _, _ = generate_samples(pipe, 12, "ddim", 2, 1.0, seed=1, batch_size=5, progress=False)
    assert not torch.allclose(x, other)
    sheet = sample_sheet(x, y, per_class=1)
    assert sheet.shape == (10, 1, 28, 28) and torch.equal(sheet[2], x[4])


def test_reference_scores_equal_evaluate_images(mnist_dir, clf):
    real = real_test_images("mnist", str(mnist_dir), 300, seed=0)
    labels = torch.arange(100) % 10
    fake = real[200:300]
    ref = Reference.build(real[:200], clf, kid_subsets=10, kid_subset_size=50)
    got = ref.score(fake, labels)
    want = evaluate_images(fake, real[:200], clf, fake_labels=labels, kid_subsets=10, kid_subset_size=50)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k


def test_evaluate_cell_cost_and_sane_scores(mnist_dir, pipe, clf):
    real = real_test_images("mnist", str(mnist_dir), 200)
    ref = Reference.build(real, clf, kid_subsets=10)
    for scheduler, steps in (("heun", 3), ("pndm", 5), ("ddim", 2)):
        m, images, labels = evaluate_cell(pipe, ref, 20, scheduler, steps, 2.0, progress=False)
        assert m["nfe"] == diffusion.SAMPLERS[scheduler].evaluations(steps) == nfe(scheduler, steps)
        assert m["images_per_s"] == pytest.approx(20 / m["sample_seconds"]) and m["images_per_s"] > 0
        assert len(images) == 20 and labels.bincount().tolist() == [2] * 10
        assert 0 <= m["conditional_accuracy"] <= 1 and 1 <= m["is_domain_mean"] <= 10
        assert all(math.isfinite(m[k]) for k in ("fid_domain", "kid_domain_mean", "kid_domain_std"))
    floor = real_floor("mnist", str(mnist_dir), clf, n=20)
    assert m["fid_domain"] > floor["fid_domain"]  # 15 training steps are far from real digits


def test_matched_floor_is_balanced_train_images_scored_like_a_cell(mnist_dir, clf):
    from training.evaluate import balanced_train_images, matched_floor

    x, y = balanced_train_images("mnist", str(mnist_dir), 25, 10, seed=3)
    assert len(x) == 25 and y.bincount(minlength=10).tolist() == [3] * 5 + [2] * 5  # class_plan's counts
    again, y2 = balanced_train_images("mnist", str(mnist_dir), 25, 10, seed=3)
    assert torch.equal(x, again) and torch.equal(y, y2)
    plain, none = balanced_train_images("mnist", str(mnist_dir), 7, 0)
    assert len(plain) == 7 and none is None
    ref = Reference.build(real_test_images("mnist", str(mnist_dir), 300), clf, kid_subsets=10)
    floor = matched_floor(ref, "mnist", str(mnist_dir), 25, 10, seed=3)
    assert floor == ref.score(x, y, seed=3)  # the same scoring as the samples, against the same reference
    assert floor["n_real"] == 300 and floor["conditional_accuracy"] > 0.9
    with pytest.raises(ValueError, match="only"):
        balanced_train_images("mnist", str(mnist_dir), 10**6, 10)


def test_inception_scores_with_random_weights(mnist_dir, random_inception_weights):  # noqa: F811
    inc = InceptionExtractor(random_inception_weights / "inception.safetensors", batch_size=4, feature="64")
    real = real_test_images("mnist", str(mnist_dir), 8)
    ref = Reference.build(real[:4], None, inc, kid_subsets=2, is_splits=1)
    got = ref.score(real[4:])
    want = evaluate_images(real[4:], real[:4], None, inception=inc, kid_subsets=2, is_splits=1)
    assert "fid_domain" not in got and "conditional_accuracy" not in got
    assert got["fid_inception"] == pytest.approx(want["fid_inception"], rel=1e-9)


def test_cli_prints_labelled_metrics_beside_the_floor(tiny, mnist_dir, tmp_path, capsys):
    out_json, grid = tmp_path / "m.json", tmp_path / "grid.png"
    rc = main(["--checkpoint", str(tiny), "--data-dir", str(mnist_dir), "--scheduler", "dpmpp_2m", "--steps", "3",
               "--guidance", "1.5", "--num-samples", "20", "--num-real", "200", "--device", "cpu",
               "--json", str(out_json), "--grid", str(grid)])
    text = capsys.readouterr().out
    assert rc == 0
    for label in ("FID (domain)", "KID (domain)", "IS (domain)", "conditional accuracy (domain classifier)",
                  "real vs real", "images/s (sampling, this machine)", "98.60%",
                  "20 samples, dpmpp_2m 3 steps, guidance 1.5, against 200 test images"):
        assert label in text, label
    assert re.search(r"^NFE \(model evaluations per image\) +3$", text, re.M)
    saved = json.loads(out_json.read_text())
    assert saved["metrics"]["n_fake"] == 20 and saved["metrics"]["n_real"] == 200 and saved["steps"] == 3
    assert saved["floor"]["n_fake"] == 20 and saved["floor"]["conditional_accuracy"] > 0.8
    assert saved["floor"]["n_real"] == 200  # the floor is scored against the samples' own reference
    assert Image.open(grid).size == (302, 62)  # 2 images per class: 2 rows of 10 tiles of 28+2 pixels


def test_cli_refuses_missing_files(tiny, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert main(["--checkpoint", str(tiny), "--classifier", str(tmp_path / "none.safetensors")]) == 2
    assert main(["--checkpoint", str(tiny), "--inception-weights", str(tmp_path / "none.pth")]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint" in err and "does not exist" in err
