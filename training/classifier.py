"""A small CNN classifier for the evaluation metrics (the "domain classifier").

It reads images in [-1, 1] of any C×H×W (global average pooling makes it size-agnostic) and exposes
  - ``logits(x)``   [N, num_classes]: conditional accuracy and the Inception Score "(domain)",
  - ``features(x)`` [N, feature_dim]: the penultimate layer, for FID / KID "(domain)".

Saved as safetensors with its config, class names and measured test accuracy in the metadata (never
pickle). Train and save one:

    python -m training.classifier --dataset mnist --data-dir DIR --out checkpoints/classifiers/mnist.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from training.data import DataError, dataset_tensors, load_dataset

FORMAT = "diffusion-serve/classifier"
FORMAT_VERSION = 1


class ClassifierError(ValueError):
    """A classifier file that cannot be used: missing, corrupt, or not a classifier of this format."""


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, int, int] = (32, 64, 128)  # stage widths; the last one is the feature dimension
    dropout: float = 0.2

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Classifier(nn.Module):
    """conv-pool, conv-pool, conv-conv, global average pooling (the features), a linear head."""

    def __init__(self, config: ClassifierConfig, class_names: tuple[str, ...] | None = None):
        super().__init__()
        w1, w2, w3 = config.widths
        self.config = config
        self.class_names = tuple(class_names) if class_names is not None else tuple(map(str, range(config.num_classes)))
        if len(self.class_names) != config.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {config.num_classes} classes")
        self.body = nn.Sequential(
            _conv(config.in_channels, w1), nn.MaxPool2d(2),
            _conv(w1, w2), nn.MaxPool2d(2),
            _conv(w2, w3), _conv(w3, w3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(w3, config.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [N, feature_dim] of images [N, C, H, W] in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    logits = forward


# ---------------------------------------------------------------------------------------- save / load

def save_classifier(model: Classifier, path: str | Path, extra: dict | None = None) -> None:
    """Write weights + config (JSON in the safetensors metadata). ``extra`` adds JSON-able facts
    (dataset, test accuracy, training command) to the metadata."""
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(asdict(model.config)),
        "class_names": json.dumps(list(model.class_names)),
        "info": json.dumps(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def read_metadata(path: str | Path) -> dict:
    """The parsed metadata of a classifier file (config, class_names, info); raises ClassifierError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ClassifierError(f"classifier file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ClassifierError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise ClassifierError(f"{path} is not a classifier file (metadata format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ClassifierError(f"{path} has classifier format version {meta.get('format_version')}, "
                              f"this code reads {FORMAT_VERSION}")
    try:
        cfg = json.loads(meta["config"])
        cfg["widths"] = tuple(cfg["widths"])
        return {"config": ClassifierConfig(**cfg), "class_names": tuple(json.loads(meta["class_names"])),
                "info": json.loads(meta.get("info", "{}"))}
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ClassifierError(f"{path} has malformed classifier metadata: {e}") from e


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """The classifier saved at ``path``, in eval mode, with ``.info`` holding the saved facts."""
    meta = read_metadata(path)
    model = Classifier(meta["config"], meta["class_names"])
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ClassifierError(f"{path} is corrupt: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ClassifierError(f"{path} does not match its own config: {e}") from e
    model.info = meta["info"]
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------- training

def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge pixels repeat into the gap)."""
    n, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = shifts[:, 0] * 2 / w
    theta[:, 1, 2] = shifts[:, 1] * 2 / h
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels [N] for images [N, C, H, W] in [-1, 1]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds = [model(images[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Share of ``images`` whose predicted label equals ``labels``."""
    return (predict(model, images, batch_size) == labels.cpu()).float().mean().item()


def fit(model: Classifier, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int = 0,
        batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 1e-4, max_shift: int = 2,
        progress: bool = True) -> Classifier:
    """Train ``model`` in place on tensors: AdamW, one-cycle learning rate (warm-up then cosine decay),
    random shifts of up to ``max_shift`` pixels."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    model.to(memory_format=torch.channels_last).train()  # faster convolutions on CPU and GPU
    bar = tqdm(total=epochs * steps_per_epoch, desc="classifier", unit="step", disable=not progress)
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), batch_size):
            idx = order[i:i + batch_size]
            x = images[idx]
            if max_shift > 0:
                x = _random_shift(x, max_shift, gen)
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def train_classifier(dataset_name: str, data_dir: str | None, out_path: str | Path | None, epochs: int = 8,
                     seed: int = 0, batch_size: int = 128, lr: float = 2e-3, widths: tuple[int, int, int] = (32, 64, 128),
                     limit: int | None = None, device: str = "cpu", progress: bool = True,
                     image_size: int | None = None) -> tuple[Classifier, float]:
    """Train a classifier on the train split of ``dataset_name``, measure it on the test split, save it
    to ``out_path`` (when given) and return (model, test accuracy). ``limit`` trains on the first
    ``limit`` training images only (for tests)."""
    torch.manual_seed(seed)
    train = load_dataset(dataset_name, data_dir=data_dir, split="train", image_size=image_size)
    test = load_dataset(dataset_name, data_dir=data_dir, split="test", image_size=image_size)
    x, y = dataset_tensors(train)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    config = ClassifierConfig(in_channels=x.shape[1], num_classes=len(train.class_names), widths=tuple(widths))
    model = Classifier(config, train.class_names).to(device)
    start = time.perf_counter()
    fit(model, x, y, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, progress=progress)
    train_seconds = time.perf_counter() - start
    tx, ty = dataset_tensors(test)
    test_acc = accuracy(model, tx, ty)
    if out_path is not None:
        save_classifier(model.cpu(), out_path, extra={
            "dataset": dataset_name, "image_shape": list(x.shape[1:]), "train_images": len(x),
            "test_images": len(tx), "test_accuracy": round(test_acc, 5), "epochs": epochs, "seed": seed,
            "batch_size": batch_size, "lr": lr, "train_seconds": round(train_seconds, 1)})
    return model.to(device), test_acc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.classifier", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=("mnist", "fashion_mnist", "flowers102", "imagefolder"))
    p.add_argument("--data-dir", default=None, help="local copy of the dataset (default: download with torchvision)")
    p.add_argument("--out", required=True, help="where to write the .safetensors file")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--image-size", type=int, default=None, help="resolution for flowers102 / imagefolder")
    p.add_argument("--limit", type=int, default=None, help="train on the first N training images only (smoke tests)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    try:
        _, acc = train_classifier(a.dataset, a.data_dir, a.out, epochs=a.epochs, seed=a.seed,
                                  batch_size=a.batch_size, lr=a.lr, device=a.device, image_size=a.image_size,
                                  limit=a.limit)
    except DataError as e:
        p.error(str(e))
    info = load_classifier(a.out).info  # read back what was written
    print(f"{a.dataset}: test accuracy {acc * 100:.2f}% on {info['test_images']} test images "
          f"(trained on {info['train_images']} in {info['train_seconds']:.0f} s); saved {a.out}")

if __name__ == "__main__":
    main()
