"""Sample-quality metrics: FID, KID and IS (torchmetrics), conditional accuracy, the real-vs-real floor.

Images enter as float tensors [N, C, H, W] in [-1, 1]. Two feature extractors turn them into
(features, logits) once; torchmetrics then computes the statistics from those features:

  - ``DomainExtractor``: the domain classifier of ``training.classifier`` (trained on the dataset,
    works offline). Its scores are labelled "(domain)": they are comparable only with scores from the
    same classifier file.
  - ``InceptionExtractor``: the standard Inception-v3 of FID (torch-fidelity's port of the 2015
    TensorFlow graph, the one torchmetrics uses). Grey images are repeated to 3 channels, mapped to
    uint8 and resized to 299×299 (TF1-compatible bilinear) inside the network. Its weights come from a
    local file (``weights_path``: the ``weights-inception-2015-12-05-6726825d.pth`` file that
    torch-fidelity publishes, or a safetensors copy of it) or, when online, from torch-fidelity's
    release URL through the torch hub cache (``$TORCH_HOME/hub/checkpoints``).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from training.classifier import Classifier, predict
from training.data import load_dataset

METRIC_LABELS = {
    "fid_domain": "FID (domain)",
    "kid_domain_mean": "KID (domain)",
    "kid_domain_std": "KID (domain) std",
    "is_domain_mean": "IS (domain)",
    "is_domain_std": "IS (domain) std",
    "fid_inception": "FID (Inception-v3)",
    "kid_inception_mean": "KID (Inception-v3)",
    "kid_inception_std": "KID (Inception-v3) std",
    "is_inception_mean": "IS (Inception-v3)",
    "is_inception_std": "IS (Inception-v3) std",
    "conditional_accuracy": "conditional accuracy (domain classifier)",
}


class InceptionUnavailable(RuntimeError):
    """The Inception-v3 weights could not be loaded (offline with no local file, or a bad file)."""


# --------------------------------------------------------------------- statistics from features (torchmetrics)

class _Precomputed(nn.Module):
    """The identity as torchmetrics' "feature extractor": the features were extracted beforehand, once
    per image set, so each metric does not run the network again."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_features(*sets: torch.Tensor) -> None:
    for f in sets:
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"features must be [N, D] with N >= 2, got {tuple(f.shape)}")
    if len({f.shape[1] for f in sets}) != 1:
        raise ValueError(f"feature dimensions differ: {[tuple(f.shape) for f in sets]}")


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (torchmetrics' FID)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_features(real, fake)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """Kernel distance (unbiased MMD², cubic polynomial kernel) between two feature sets: mean and std
    over ``subsets`` random subsets of ``min(subset_size, N)`` rows (torchmetrics' KID)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_features(real, fake)
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # torchmetrics draws the subsets from the global generator
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score_from_logits(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) ‖ p(y))) from classifier logits [N, K]: mean and std over ``splits`` splits
    (torchmetrics' IS)."""
    from torchmetrics.image.inception import InceptionScore

    if logits.ndim != 2 or len(logits) < 1:
        raise ValueError(f"logits must be [N, K], got {tuple(logits.shape)}")
    splits = max(1, min(splits, len(logits)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # std of a single split
        torch.manual_seed(seed)  # torchmetrics shuffles before splitting
        mean, std = metric.compute()
    return float(mean), (float(std) if splits > 1 else 0.0)


# ---------------------------------------------------------------------------------- feature extractors

def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor [N, C, H, W] in [-1, 1], got {images.dtype} "
                         f"{tuple(images.shape)}")


class DomainExtractor:
    """(penultimate features, logits) of the domain classifier."""

    name = "domain"

    def __init__(self, classifier: Classifier, batch_size: int = 500):
        self.classifier, self.batch_size = classifier.eval(), batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_images(images)
        want = self.classifier.config.in_channels
        if images.shape[1] != want:
            raise ValueError(f"the domain classifier reads {want}-channel images, got {images.shape[1]} channels")
        device = next(self.classifier.parameters()).device
        feats, logits = [], []
        for i in range(0, len(images), self.batch_size):
            f = self.classifier.features(images[i:i + self.batch_size].to(device))
            feats.append(f.float().cpu())
            logits.append(self.classifier.head(f).float().cpu())
        return torch.cat(feats), torch.cat(logits)


def _load_inception_state(weights_path: str | Path | None) -> dict[str, torch.Tensor]:
    """The Inception state dict, read without executing pickled code."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if weights_path is None:
        try:
            return torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu", weights_only=True,
                                                      progress=False)
        except Exception as e:  # URLError, HTTPError, socket errors: all mean "not here, not downloadable"
            raise InceptionUnavailable(
                f"cannot download the Inception-v3 FID weights ({e}). Offline, pass a local copy of "
                f"{URL_INCEPTION_V3.rsplit('/', 1)[-1]} as weights_path (--inception-weights), or put it in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}; or use the domain metrics only.") from e
    path = Path(weights_path)
    if not path.is_file():
        raise InceptionUnavailable(f"Inception-v3 weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors / unpickler errors: corrupt file, or a pickle that carries code
        raise InceptionUnavailable(f"cannot read Inception-v3 weights from {path}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionUnavailable(f"{path} does not hold a state dict of tensors")
    return state


class InceptionExtractor:
    """(pool features, 1008 unbiased logits) of the FID Inception-v3, as torchmetrics uses them:
    ``feature`` "2048" (the standard; torchmetrics also offers "768", "192", "64") for FID/KID and
    "logits_unbiased" for IS."""

    name = "inception"
    FEATURES = ("64", "192", "768", "2048")

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64, feature: str = "2048"):
        if str(feature) not in self.FEATURES:
            raise ValueError(f"feature must be one of {self.FEATURES}, got {feature!r}")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise InceptionUnavailable("the Inception-v3 metrics need torch-fidelity (pip install torch-fidelity)") from e
        state = _load_inception_state(weights_path)
        with tempfile.TemporaryDirectory() as tmp:
            # torch-fidelity only takes a file path; hand it the tensors just read (no foreign pickle).
            clean = Path(tmp) / "inception.pth"
            torch.save(state, clean)
            try:
                self.net = FeatureExtractorInceptionV3("inception-v3-compat", [str(feature), "logits_unbiased"],
                                                       feature_extractor_weights_path=str(clean))
            except RuntimeError as e:  # load_state_dict: missing / unexpected keys, wrong shapes
                raise InceptionUnavailable(f"the weights are not those of the FID Inception-v3: {e}") from e
        self.net = self.net.to(device).eval()
        self.device, self.batch_size = device, batch_size

    @staticmethod
    def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] float [N, C, H, W] → uint8 [N, 3, H, W] (grey repeated to three channels)."""
        _check_images(images)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"Inception-v3 reads grey or RGB images, got {images.shape[1]} channels")
        x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.to_uint8_rgb(images)
        feats, logits = [], []
        for i in range(0, len(x), self.batch_size):
            f, lg = self.net(x[i:i + self.batch_size].to(self.device))  # resizes to 299×299 inside
            feats.append(f.float().cpu())
            logits.append(lg.float().cpu())
        return torch.cat(feats), torch.cat(logits)


# ------------------------------------------------------------------------------------------ the API

def conditional_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: Classifier,
                         batch_size: int = 500) -> float:
    """Share of ``images`` (generated for class ``labels[i]``) that ``classifier`` reads as that class."""
    _check_images(images)
    labels = torch.as_tensor(labels).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return (predict(classifier, images, batch_size) == labels.cpu()).float().mean().item()


def per_class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: Classifier,
                       batch_size: int = 500) -> dict[int, float]:
    """Conditional accuracy for each class present in ``labels``."""
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    hit = predict(classifier, images, batch_size) == labels
    return {int(c): hit[labels == c].float().mean().item() for c in labels.unique()}


def evaluate_images(fake: torch.Tensor, real: torch.Tensor, classifier: Classifier | None,
                    fake_labels: torch.Tensor | None = None, inception: InceptionExtractor | None = None,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, is_splits: int = 10,
                    seed: int = 0) -> dict[str, float]:
    """FID, KID and IS of ``fake`` against ``real`` for each extractor given (the domain classifier,
    Inception-v3 or both), plus the conditional accuracy when ``fake_labels`` are given. Keys are those
    of METRIC_LABELS, plus n_fake, n_real and kid_subset_size."""
    if classifier is None and inception is None:
        raise ValueError("give a domain classifier, an Inception extractor, or both")
    extractors = ([DomainExtractor(classifier)] if classifier is not None else []) + \
                 ([inception] if inception is not None else [])
    out: dict[str, float] = {"n_fake": len(fake), "n_real": len(real),
                             "kid_subset_size": min(kid_subset_size, len(fake), len(real))}
    for ex in extractors:
        f_real, _ = ex(real)
        f_fake, logits_fake = ex(fake)
        out[f"fid_{ex.name}"] = fid_from_features(f_real, f_fake)
        mean, std = kid_from_features(f_real, f_fake, kid_subsets, kid_subset_size, seed)
        out[f"kid_{ex.name}_mean"], out[f"kid_{ex.name}_std"] = mean, std
        mean, std = inception_score_from_logits(logits_fake, is_splits, seed)
        out[f"is_{ex.name}_mean"], out[f"is_{ex.name}_std"] = mean, std
    if fake_labels is not None:
        if classifier is None:
            raise ValueError("conditional accuracy needs the domain classifier")
        out["conditional_accuracy"] = conditional_accuracy(fake, fake_labels, classifier)
    return out


def real_floor(dataset_name: str, data_dir: str | None, classifier: Classifier | None, n: int = 2000,
               seed: int = 0, inception: InceptionExtractor | None = None, **kwargs) -> dict[str, float]:
    """The metrics of real images against real images: ``n`` training images in the role of the
    samples, ``n`` test images as the reference. The best score a generator of ``n`` samples can
    expect; ``conditional_accuracy`` here is the classifier's accuracy on those training images."""
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for split in ("train", "test"):
        ds = load_dataset(dataset_name, data_dir=data_dir, split=split)
        idx = torch.randperm(len(ds), generator=gen)[:n]
        if hasattr(ds, "images"):
            sets.append((ds.images[idx], ds.labels[idx]))
        else:
            xs, ys = zip(*(ds[int(i)] for i in idx))
            sets.append((torch.stack(xs), torch.tensor(ys)))
    (train_x, train_y), (test_x, _) = sets
    return evaluate_images(train_x, test_x, classifier, fake_labels=train_y if classifier is not None else None,
                           inception=inception, seed=seed, **kwargs)


def format_metrics(metrics: dict[str, float]) -> str:
    """One line per metric, with its human label ("FID (domain)", ...)."""
    lines = []
    for key, label in METRIC_LABELS.items():
        if key in metrics and not key.endswith("_std"):
            std = metrics.get(key.replace("_mean", "_std")) if key.endswith("_mean") else None
            value = f"{metrics[key]:.4g}" + (f" ± {std:.2g}" if std is not None else "")
            lines.append(f"{label}: {value}")
    return "\n".join(lines)
