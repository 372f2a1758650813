"""FID, KID, IS and conditional accuracy on inputs whose answer is known."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from training.classifier import Classifier, ClassifierConfig, load_classifier
from training.data import load_dataset
from training.metrics import (METRIC_LABELS, DomainExtractor, InceptionExtractor, InceptionUnavailable,
                              conditional_accuracy, evaluate_images, fid_from_features, format_metrics,
                              inception_score_from_logits, kid_from_features, per_class_accuracy, real_floor)

REPO = Path(__file__).resolve().parents[2]
MNIST = REPO.parent / "shared" / "data" / "mnist-10k"
MNIST_CLF = REPO / "checkpoints" / "classifiers" / "mnist.safetensors"
needs_mnist_clf = pytest.mark.skipif(not (MNIST.is_dir() and MNIST_CLF.is_file()),
                                     reason="../shared/data/mnist-10k or the committed MNIST classifier missing")


def gaussian(n, mean, cov_sqrt, seed):
    g = torch.Generator().manual_seed(seed)
    mean, cov_sqrt = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov_sqrt, dtype=torch.float64)
    return torch.randn(n, len(mean), generator=g, dtype=torch.float64) @ cov_sqrt.T + mean


# ----------------------------------------------------------------------------------------------- FID

def test_identical_sets_have_zero_fid():
    x = gaussian(2000, torch.zeros(16), torch.eye(16), seed=0)
    assert abs(fid_from_features(x, x)) < 1e-6


def test_fid_of_shifted_and_scaled_gaussians_is_closed_form():
    # X ~ N(0, I_d), Y ~ N(mu, s^2 I_d):  FID = |mu|^2 + Tr(I + s^2 I - 2 (s^2 I)^(1/2)) = |mu|^2 + d (1 - s)^2.
    # With n samples per set the estimate is biased up by about (Tr S1 + Tr S2)/n from the means and
    # O(d^2/n) from the covariances (< 0.01 here); its spread is about 2|mu| sqrt((1 + s^2)/n) ~ 0.03.
    d, n = 8, 50_000
    mu = torch.zeros(d, dtype=torch.float64)
    mu[:2] = 1.0
    for s, expected in ((1.0, 2.0), (2.0, 2.0 + d)):
        x = gaussian(n, torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64), seed=1)
        y = gaussian(n, mu, s * torch.eye(d, dtype=torch.float64), seed=2)
        assert fid_from_features(x, y) == pytest.approx(expected, abs=0.15)


def test_fid_with_non_commuting_covariances_matches_scipy_closed_form():
    # Population FID from the true parameters, computed independently with scipy's sqrtm.
    d, n = 6, 60_000
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a = np.diag(rng.uniform(0.5, 2.0, d))           # Σ1^(1/2)
    b = q @ np.diag(rng.uniform(0.3, 3.0, d)) @ q.T  # Σ2^(1/2), not diagonal in Σ1's basis
    s1, s2 = a @ a, b @ b
    mu = rng.normal(size=d) * 0.5
    expected = float(mu @ mu + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    x = gaussian(n, torch.zeros(d, dtype=torch.float64), torch.from_numpy(a), seed=3)
    y = gaussian(n, torch.from_numpy(mu), torch.from_numpy(b), seed=4)
    assert fid_from_features(x, y) == pytest.approx(expected, rel=0.03, abs=0.05)


def test_fid_refuses_mismatched_features():
    with pytest.raises(ValueError):
        fid_from_features(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ValueError):
        fid_from_features(torch.zeros(1, 3), torch.zeros(10, 3))


# ----------------------------------------------------------------------------------------------- KID

def test_kid_is_unbiased_around_zero_for_same_distribution():
    # The unbiased MMD^2 estimator has expectation 0 when both sets come from one distribution, so
    # over independent draws its values straddle 0 (a biased estimator would stay positive).
    d = 8
    values = []
    for seed in range(30):
        x = gaussian(200, torch.zeros(d), torch.eye(d), seed=2 * seed)
        y = gaussian(200, torch.zeros(d), torch.eye(d), seed=2 * seed + 1)
        values.append(kid_from_features(x, y, subsets=5, subset_size=100, seed=seed)[0])
    values = torch.tensor(values)
    stderr = values.std() / math.sqrt(len(values))
    assert abs(values.mean()) < 4 * stderr + 1e-4, (values.mean(), stderr)
    assert (values < 0).any() and (values > 0).any()

    shifted = gaussian(200, torch.full((d,), 0.5), torch.eye(d), seed=99)
    far = kid_from_features(gaussian(200, torch.zeros(d), torch.eye(d), seed=98), shifted, subsets=5, subset_size=100)
    assert far[0] > values.max() * 3


def test_kid_is_reproducible_for_a_seed():
    x = gaussian(300, torch.zeros(4), torch.eye(4), seed=0)
    y = gaussian(300, torch.ones(4) * 0.2, torch.eye(4), seed=1)
    assert kid_from_features(x, y, 10, 100, seed=5) == kid_from_features(x, y, 10, 100, seed=5)


# ------------------------------------------------------------------------------------------------ IS

def test_inception_score_of_known_classifiers():
    k = 10
    confident_uniform = 50.0 * torch.eye(k).repeat(30, 1)   # each image sure of its class, classes uniform
    assert inception_score_from_logits(confident_uniform, splits=1)[0] == pytest.approx(k, rel=1e-6)
    one_class = 50.0 * torch.eye(k)[torch.zeros(300, dtype=torch.long)]  # sure, but always the same class
    assert inception_score_from_logits(one_class, splits=1)[0] == pytest.approx(1.0, abs=1e-6)
    unsure = torch.zeros(300, k)                              # p(y|x) uniform: no information
    assert inception_score_from_logits(unsure, splits=3)[0] == pytest.approx(1.0, abs=1e-6)
    # Confident over 4 of 10 classes, used equally: exp(log 4).
    four = 50.0 * torch.eye(k)[torch.arange(400) % 4]
    assert inception_score_from_logits(four, splits=1)[0] == pytest.approx(4.0, rel=1e-6)


# --------------------------------------------------------------------- images through the extractors

def random_classifier(in_channels=1):
    torch.manual_seed(0)
    return Classifier(ClassifierConfig(in_channels=in_channels, widths=(4, 8, 16))).eval()


def test_evaluate_images_on_identical_sets():
    torch.manual_seed(1)
    images = torch.rand(64, 1, 28, 28) * 2 - 1
    labels = torch.randint(0, 10, (64,))
    clf = random_classifier()
    m = evaluate_images(images, images, clf, fake_labels=labels, kid_subset_size=32, kid_subsets=5, is_splits=2)
    assert abs(m["fid_domain"]) < 1e-4
    assert m["kid_subset_size"] == 32 and m["n_fake"] == 64
    for key in ("kid_domain_mean", "kid_domain_std", "is_domain_mean", "is_domain_std", "conditional_accuracy"):
        assert math.isfinite(m[key])
    assert m["is_domain_mean"] >= 1.0
    assert "FID (domain)" in format_metrics(m)
    assert set(k for k in m if k in METRIC_LABELS) == {
        "fid_domain", "kid_domain_mean", "kid_domain_std", "is_domain_mean", "is_domain_std", "conditional_accuracy"}


def test_domain_extractor_checks_channels():
    with pytest.raises(ValueError):
        DomainExtractor(random_classifier(in_channels=1))(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError):
        evaluate_images(torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), None)


@needs_mnist_clf
def test_conditional_accuracy_with_the_committed_classifier():
    clf = load_classifier(MNIST_CLF)
    test = load_dataset("mnist", str(MNIST), "test")
    x, y = test.images[:500], test.labels[:500]
    assert conditional_accuracy(x, y, clf) > 0.97
    assert conditional_accuracy(x, (y + 1) % 10, clf) < 0.05
    per_class = per_class_accuracy(x, y, clf)
    assert set(per_class) == set(range(10)) and min(per_class.values()) > 0.85


@needs_mnist_clf
def test_real_floor_is_small_and_below_degraded_images():
    clf = load_classifier(MNIST_CLF)
    floor = real_floor("mnist", str(MNIST), clf, n=500, kid_subset_size=250, kid_subsets=20)
    assert floor["n_fake"] == floor["n_real"] == 500
    assert floor["conditional_accuracy"] > 0.97
    test = load_dataset("mnist", str(MNIST), "test").images[:500]
    train = load_dataset("mnist", str(MNIST), "train").images[:500]
    g = torch.Generator().manual_seed(0)
    noisy = (train + 0.6 * torch.randn(train.shape, generator=g)).clamp(-1, 1)
    degraded = evaluate_images(noisy, test, clf, kid_subset_size=250, kid_subsets=20)
    assert 0 < floor["fid_domain"] < degraded["fid_domain"] / 5
    assert floor["kid_domain_mean"] < degraded["kid_domain_mean"] / 5
    assert floor["is_domain_mean"] > degraded["is_domain_mean"]


# --------------------------------------------------------------- Inception-v3 with random weights

@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A state dict with the FID Inception-v3's exact keys and shapes but random values (the real weights
    cannot be downloaded here)."""
    tfi = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    mp = pytest.MonkeyPatch()
    mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    torch.manual_seed(0)
    net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    with torch.no_grad():  # scale-preserving random weights, so that the features do not vanish
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    mp.undo()
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("inception")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "inception.safetensors"))
    torch.save(state, folder / "inception.pth")
    return folder


def test_inception_input_conversion():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    out = InceptionExtractor.to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 2)
    assert out[0, :, 0, 0].tolist() == [0, 0, 0] and out[0, 2].flatten().tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError):
        InceptionExtractor.to_uint8_rgb(torch.zeros(1, 2, 4, 4))


def test_inception_code_path_with_random_weights(random_inception_weights):
    # The 64-d features keep FID's eigen-decomposition cheap here; 2048 is the default and checked below.
    small = InceptionExtractor(random_inception_weights / "inception.safetensors", batch_size=2, feature="64")
    grey = torch.rand(4, 1, 28, 28) * 2 - 1
    m = evaluate_images(grey[:2], grey[2:], random_classifier(), inception=small, kid_subsets=2, is_splits=1)
    for key in ("fid_inception", "kid_inception_mean", "is_inception_mean", "fid_domain"):
        assert math.isfinite(m[key]), key
    assert m["fid_inception"] > 0
    assert "FID (Inception-v3)" in format_metrics(m)

    standard = InceptionExtractor(random_inception_weights / "inception.pth")  # the .pth form, 2048-d
    feats, logits = standard(grey[:1])  # a grey 28×28 image, read as RGB and resized to 299×299 inside
    assert feats.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.isfinite(feats).all() and feats.abs().mean() > 1e-3
    torch.testing.assert_close(logits, small(grey[:1])[1])  # same network, same weights


class NotAWeight:  # a pickled object: torch.load(weights_only=True) must refuse to build it
    pass


def test_inception_refuses_bad_weights(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    with pytest.raises(InceptionUnavailable, match="does not exist"):
        InceptionExtractor(tmp_path / "missing.pth")
    torch.save({"x": NotAWeight()}, tmp_path / "code.pth")
    with pytest.raises(InceptionUnavailable):
        InceptionExtractor(tmp_path / "code.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(InceptionUnavailable, match="not those of the FID Inception"):
        InceptionExtractor(tmp_path / "wrong.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(InceptionUnavailable):
        InceptionExtractor(tmp_path / "junk.safetensors")

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(InceptionUnavailable, match="weights_path"):
        InceptionExtractor(None)
