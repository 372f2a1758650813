"""The domain classifier: trains on real data, saves/loads through safetensors, refuses bad files."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training.classifier import (Classifier, ClassifierConfig, ClassifierError, accuracy, load_classifier, main,
                                 save_classifier, train_classifier)
from training.data import load_dataset

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
MNIST = DATA / "mnist-10k"
FASHION = DATA / "fashion-mnist"
CHECKPOINTS = REPO / "checkpoints" / "classifiers"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist-10k not present")


def tiny_model(**kw) -> Classifier:
    torch.manual_seed(0)
    cfg = ClassifierConfig(**{"in_channels": 3, "num_classes": 5, "widths": (4, 8, 16), **kw})
    return Classifier(cfg, tuple("abcde")[:cfg.num_classes]).eval()


def test_shapes_for_any_image_size():
    model = tiny_model()
    for hw in (28, 64, 37):
        x = torch.rand(2, 3, hw, hw) * 2 - 1
        assert model(x).shape == (2, 5)
        assert model.logits(x).shape == (2, 5)
        assert model.features(x).shape == (2, model.config.feature_dim)


def test_class_names_must_match_classes():
    with pytest.raises(ValueError):
        Classifier(ClassifierConfig(num_classes=3), ("a", "b"))


@needs_mnist
def test_trains_on_a_small_real_subset_and_round_trips(tmp_path):
    out = tmp_path / "clf.safetensors"
    # A narrower network than the default keeps this quick on two busy cores (the default reaches 98.6%).
    model, acc = train_classifier("mnist", str(MNIST), out, epochs=3, batch_size=50, lr=5e-3, seed=0, limit=1000,
                                  widths=(16, 32, 64), progress=False)
    assert acc > 0.6, f"test accuracy {acc} after 3 epochs on 1000 digits; chance is 0.1"

    loaded = load_classifier(out)
    assert loaded.class_names == load_dataset("mnist", str(MNIST), "test").class_names
    assert loaded.info["test_accuracy"] == pytest.approx(acc, abs=1e-5)
    assert loaded.info["train_images"] == 1000
    x = load_dataset("mnist", str(MNIST), "test").images[:64]
    torch.testing.assert_close(loaded(x), model.eval()(x))
    torch.testing.assert_close(loaded.features(x), model.features(x))


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    with torch.no_grad():  # make the BatchNorm statistics non-trivial so that they must round-trip too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "c.safetensors"
    save_classifier(model, path, extra={"dataset": "x"})
    loaded = load_classifier(path)
    assert loaded.config == model.config and loaded.class_names == model.class_names
    assert loaded.info == {"dataset": "x"} and not loaded.training
    x = torch.rand(3, 3, 20, 20) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    model = tiny_model()
    good = tmp_path / "good.safetensors"
    save_classifier(model, good)
    data = good.read_bytes()

    cases = {}
    cases["truncated"] = data[: len(data) // 2]
    cases["garbage"] = b"\x00" * 100
    cases["flipped_header"] = data[:8] + b"{" * 20 + data[28:]
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign"))  # safetensors, but no classifier metadata
    meta_wrong = {"format": "diffusion-serve/classifier", "format_version": "1",
                  "config": json.dumps({"in_channels": 1, "num_classes": 5, "widths": [4, 8, 16], "dropout": 0.2}),
                  "class_names": json.dumps(list("abcde"))}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "mismatch"), meta_wrong)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bad_json"), {**meta_wrong, "config": "{not json"})
    newer = {**meta_wrong, "format_version": "99"}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "newer"), newer)

    for name in [*cases, "foreign", "mismatch", "bad_json", "newer", "missing"]:
        with pytest.raises(ClassifierError):
            load_classifier(tmp_path / name)


@needs_mnist
def test_cli_trains_saves_and_prints_accuracy(tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    main(["--dataset", "mnist", "--data-dir", str(MNIST), "--out", str(out), "--epochs", "1", "--limit", "256"])
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and str(out) in printed
    assert load_classifier(out).info["test_images"] == 2000


def test_cli_refuses_missing_data_dir(tmp_path):
    with pytest.raises(SystemExit):
        main(["--dataset", "mnist", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")])


@pytest.mark.parametrize("name,folder,floor", [("mnist", MNIST, 0.98), ("fashion_mnist", FASHION, 0.91)])
def test_committed_classifiers_are_accurate(name, folder, floor):
    path = CHECKPOINTS / f"{name}.safetensors"
    if not path.is_file() or not folder.is_dir():
        pytest.skip(f"{path} or {folder} not present")
    model = load_classifier(path)
    test = load_dataset(name, str(folder), "test")
    acc = accuracy(model, test.images[:2000], test.labels[:2000])
    assert acc >= floor, f"{name} classifier: {acc:.4f} on the first 2000 test images"
    assert model.info["dataset"] == name and model.info["test_accuracy"] >= floor
