"""Datasets: MNIST, Fashion-MNIST, Flowers102 and any folder of class subfolders.

Every dataset yields (image, label) with the image a float tensor scaled to [-1, 1] at the model's
resolution, and knows its class names. Sources, in order of preference:
  1. ``data_dir`` given: a local copy. For MNIST / Fashion-MNIST either a folder holding the four
     IDX ``.gz`` files (as torchvision's ``raw/`` folder) or torchvision's root layout. For
     Flowers102 torchvision's root layout. For ``imagefolder``, one subfolder per class.
  2. no ``data_dir``: torchvision downloads into ``~/.cache/diffusion-serve/data`` (needs internet).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

MNIST_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DATASETS = ("mnist", "fashion_mnist", "flowers102", "imagefolder")
DEFAULT_ROOT = Path(os.environ.get("DIFFUSION_DATA_ROOT", Path.home() / ".cache" / "diffusion-serve" / "data"))
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(ValueError):
    """A dataset that cannot be read: missing folder, malformed files, unknown name."""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {body.size} bytes")
    return body.reshape(dims)


def _find_idx(folder: Path, split: str) -> tuple[Path, Path] | None:
    prefix = "train" if split == "train" else "t10k"
    for base in (folder, folder / "raw", folder / "MNIST" / "raw", folder / "FashionMNIST" / "raw"):
        for ext in (".gz", ""):
            img = base / f"{prefix}-images-idx3-ubyte{ext}"
            lab = base / f"{prefix}-labels-idx1-ubyte{ext}"
            if img.is_file() and lab.is_file():
                return img, lab
    return None


def load_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] uint8 and labels [N] of one split of an IDX folder."""
    found = _find_idx(Path(folder), split)
    if found is None:
        raise DataError(f"no {split} IDX files ({'train' if split == 'train' else 't10k'}-images-idx3-ubyte[.gz] "
                        f"and -labels-idx1-ubyte[.gz]) under {folder}")
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"malformed IDX pair in {found[0].parent}: images {images.shape}, labels {labels.shape}")
    return images, labels


class TensorImages(Dataset):
    """In-memory images [N, C, H, W] in [-1, 1] with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...], flip: bool = False):
        self.images, self.labels, self.class_names, self.flip = images, labels, class_names, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[i])


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]


def _to_unit_range(images_uint8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(images_uint8, copy=True)).float() / 127.5 - 1.0
    return x.unsqueeze(1) if x.ndim == 3 else x


def _idx_dataset(name: str, data_dir: str | None, split: str, classes: tuple[str, ...]) -> TensorImages:
    if data_dir is not None:
        images, labels = load_idx_split(Path(data_dir), split)
    else:
        import torchvision

        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        ds = cls(str(DEFAULT_ROOT), train=split == "train", download=True)
        images, labels = ds.data.numpy(), ds.targets.numpy()
    return TensorImages(_to_unit_range(images), torch.from_numpy(labels.astype(np.int64)), classes)


def _transform(size: int, flip: bool):
    from torchvision import transforms as T

    steps = [T.Resize(size), T.CenterCrop(size)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    return T.Compose(steps)


def _flowers(data_dir: str | None, split: str, size: int) -> Dataset:
    import torchvision

    root = Path(data_dir) if data_dir else DEFAULT_ROOT
    if data_dir is not None and not (root / "flowers-102").is_dir():
        raise DataError(f"{root} has no flowers-102/ folder (torchvision's Flowers102 layout)")
    tv_split = {"train": "train", "test": "test"}[split]
    ds = torchvision.datasets.Flowers102(str(root), split=tv_split, transform=_transform(size, split == "train"),
                                         download=data_dir is None)
    ds.class_names = flower_names()
    return ds


def flower_names() -> tuple[str, ...]:
    from training.flowers import FLOWERS102_CLASSES

    return FLOWERS102_CLASSES


class ImageFolderDataset(Dataset):
    """Any folder with one subfolder per class; images resized/cropped to ``size``, RGB or grey."""

    def __init__(self, root: str, size: int, channels: int, flip: bool):
        root_path = Path(root)
        classes = sorted(p.name for p in root_path.iterdir() if p.is_dir()) if root_path.is_dir() else []
        if not classes:
            raise DataError(f"{root} must hold one subfolder per class with images in it")
        self.items = [(f, i) for i, c in enumerate(classes) for f in sorted((root_path / c).iterdir())
                      if f.suffix.lower() in IMAGE_EXTS]
        if not self.items:
            raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in the class folders of {root}")
        self.class_names = tuple(classes)
        self.channels = channels
        self.tf = _transform(size, flip)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        img = Image.open(path).convert("RGB")
        x = self.tf(img)
        if self.channels == 1:
            x = x.mean(0, keepdim=True)
        return x, label


def dataset_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of a dataset as two tensors (IDX datasets hold them already)."""
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        return dataset.images, dataset.labels
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor(ys)


def dataset_spec(name: str, image_size: int | None = None, data_dir: str | None = None, channels: int = 3) -> DatasetSpec:
    if name == "mnist":
        return DatasetSpec(name, (1, 28, 28), MNIST_CLASSES)
    if name == "fashion_mnist":
        return DatasetSpec(name, (1, 28, 28), FASHION_CLASSES)
    if name == "flowers102":
        s = image_size or 64
        return DatasetSpec(name, (3, s, s), flower_names())
    if name == "imagefolder":
        if data_dir is None:
            raise DataError("--dataset imagefolder needs --data-dir (a folder with one subfolder per class)")
        s = image_size or 64
        return DatasetSpec(name, (channels, s, s), ImageFolderDataset(data_dir, s, channels, False).class_names)
    raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def load_dataset(name: str, data_dir: str | None = None, split: str = "train", image_size: int | None = None,
                 channels: int = 3) -> Dataset:
    """The dataset ``name`` ("mnist", "fashion_mnist", "flowers102", "imagefolder") at ``split``
    ("train" or "test"). Every returned dataset has ``class_names``."""
    if split not in ("train", "test"):
        raise DataError(f"split must be train or test, got {split!r}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    if name == "mnist":
        return _idx_dataset(name, data_dir, split, MNIST_CLASSES)
    if name == "fashion_mnist":
        return _idx_dataset(name, data_dir, split, FASHION_CLASSES)
    if name == "flowers102":
        return _flowers(data_dir, split, image_size or 64)
    if name == "imagefolder":
        spec = dataset_spec(name, image_size, data_dir, channels)
        return ImageFolderDataset(data_dir, spec.image_shape[-1], channels, flip=split == "train")
    raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
