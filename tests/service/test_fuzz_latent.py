"""The contract fuzzed with a latent model as the default (a tiny random SD 1.x folder,
tests/sd_models.py): the generation endpoints, the edit endpoint and the model listings, as
tests/service/test_fuzz.py fuzzes them with the pixel models (its checks, its rules). Sizes, negative
prompts, guidance scales and edits of any size reach the latent engine; every answer is documented."""

from __future__ import annotations

import shutil

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (a dev dependency) is needed")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from schemathesis import GenerationMode  # noqa: E402
from schemathesis.python.asgi import shutdown_lifespans  # noqa: E402

from service.api import create_app  # noqa: E402
from tests.sd_models import SD_SPECS, save  # noqa: E402
from tests.service.test_fuzz import fuzz  # noqa: E402

BUDGET = {("POST", "/generate"): 300, ("POST", "/v1/images/generations"): 200, ("POST", "/v1/images/edits"): 200,
          ("GET", "/models"): 20, ("GET", "/v1/models/{model}"): 50}
NEGATIVE = {("POST", "/generate"): 200}
MODES = [(m, p, GenerationMode.POSITIVE, n) for (m, p), n in BUDGET.items()] + \
        [(m, p, GenerationMode.NEGATIVE, n) for (m, p), n in NEGATIVE.items()]


@pytest.fixture(scope="module")
def schema(checkpoint_dir, tmp_path_factory):
    from service.settings import Settings

    d = tmp_path_factory.mktemp("fuzz-latent")
    for p in checkpoint_dir.glob("*.safetensors"):
        shutil.copy(p, d / p.name)
    save(SD_SPECS["sd1"], d / "sd-tiny")
    app = create_app(Settings(checkpoint_dir=d, device="cpu", default_model="sd-tiny", max_steps=3, max_images=2,
                              max_prompt_chars=40, max_size=64, request_timeout_s=30, min_preview_every=1))
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
    yield loaded
    shutdown_lifespans()


@pytest.mark.parametrize("method,path,mode,budget", MODES, ids=[f"{m} {p} {g.value}" for m, p, g, _ in MODES])
def test_contract_with_a_latent_default_model(schema, method, path, mode, budget):
    answers = fuzz(schema[path][method], mode, budget, f"{method} {path}")
    if path == "/generate" and mode is GenerationMode.POSITIVE:  # the latent engine ran
        assert answers[200, "application/json"] or answers[200, "text/event-stream"], answers
