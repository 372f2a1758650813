"""The contract, fuzzed: schemathesis generates requests from the service's own OpenAPI schema (valid
ones and deliberately invalid ones) for every operation, streaming included, and sends them to the
app in-process (its lifespan started once, tiny real checkpoints, few steps). Every answer must be
documented: no server error, a status code and content type the schema lists for the operation, a
body that matches its schema, and invalid input refused; the multipart edit endpoints included (with
schema-valid input: see NEGATIVE). At least 3,000 cases in all."""

from __future__ import annotations

import time
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (a dev dependency) is needed")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.python.asgi import shutdown_lifespans  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,  # noqa: E402
                                               response_schema_conformance, status_code_conformance)

from service.api import create_app  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# (method, path): generated cases per generation mode. The two generation endpoints carry the budget and
# are fuzzed with invalid input too; the others take no body, only GET /v1/models/{model} has a
# parameter (any string is valid), and hypothesis stops early once it has tried every distinct input.
BUDGET = {
    ("POST", "/generate"): 500,
    ("POST", "/v1/images/generations"): 500,
    ("POST", "/v1/images/edits"): 420,  # multipart: the image a binary part (mostly not an image: a 400)
    ("POST", "/v1/images/variations"): 420,
    ("GET", "/v1/models/{model}"): 200,
    ("GET", "/models"): 50, ("GET", "/v1/models"): 50, ("GET", "/healthz"): 50, ("GET", "/readyz"): 50,
    ("GET", "/metrics"): 50, ("GET", "/"): 50,
    ("GET", "/admin/models"): 20, ("POST", "/admin/scan"): 20, ("POST", "/admin/models/{name}/load"): 50,
    ("POST", "/admin/models/{name}/reload"): 50, ("POST", "/admin/models/{name}/unload"): 50,
    # jobs: the body /generate takes (and a webhook, Idempotency-Key), fuzzed with invalid input too; the job
    # routes with any id (unknown: 404) and any Last-Event-ID; the list with any status, limit and cursor
    ("POST", "/jobs"): 300, ("GET", "/jobs"): 100, ("GET", "/jobs/{job_id}"): 50,
    ("GET", "/jobs/{job_id}/events"): 50, ("DELETE", "/jobs/{job_id}"): 50, ("POST", "/jobs/{job_id}/cancel"): 50,
}
ADMIN = {"Authorization": "Bearer admin-key"}  # the admin routes are fuzzed with their key (without it: 401)
# Invalid input for the JSON bodies. The multipart ones are fuzzed with schema-valid input only (whose
# "binary" parts are mostly not images, and whose numbers are often past the limits: 400s): a text part
# carries every value as text, so a schema-violating one (a number or an array where text belongs)
# often arrives as valid text, and schemathesis 4.32's negative generation for multipart bodies fails
# on its own ("Unsupported type: 'Binary'") depending on what ran before it. Malformed multipart
# bodies are tested one by one instead (tests/service/test_openai_edits.py).
NEGATIVE = {("POST", "/generate"), ("POST", "/v1/images/generations"), ("POST", "/jobs")}
JSON_GENERATION = {("POST", "/generate"), ("POST", "/v1/images/generations")}
MODES = [(m, p, GenerationMode.POSITIVE) for m, p in BUDGET] + [(m, p, GenerationMode.NEGATIVE) for m, p in NEGATIVE]
MIN_CASES = 3000
ran: dict[tuple[str, str, str], Counter] = {}  # (method, path, mode) -> answers by (status, content type)


@pytest.fixture(scope="module")
def schema(checkpoint_dir):
    from service.settings import Settings

    # The text model by default: it takes any short prompt, so generated requests reach the engine.
    app = create_app(Settings(checkpoint_dir=checkpoint_dir, device="cpu", default_model="tiny-text",
                              max_steps=20, max_images=2, max_prompt_chars=40, request_timeout_s=30,
                              min_preview_every=1, admin_key="admin-key", webhook_timeout_s=1))
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan, once
    yield loaded
    shutdown_lifespans()


def operation(schema, method: str, path: str):
    return schema[path][method]


def fuzz(op, mode, budget: int, name: str, headers: dict | None = None) -> Counter:
    """``budget`` generated cases of one operation, each answer checked; the answers by (status, type)."""
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    answers: Counter = Counter()

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=budget, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(headers=headers)
        answers[response.status_code, (response.headers.get("content-type") or [""])[0].split(";")[0]] += 1
        case.validate_response(response, checks=checks)

    started = time.perf_counter()
    check()
    print(f"\n{name} [{mode.value}]: {answers.total()} cases in {time.perf_counter() - started:.1f} s: "
          + ", ".join(f"{n}× {s} {t}" for (s, t), n in answers.most_common()))
    return answers


def test_every_operation_is_fuzzed(schema):
    operations = {(r.ok().method.upper(), r.ok().path) for r in schema.get_all_operations()}
    assert operations == set(BUDGET), "add new operations to BUDGET"


@pytest.mark.parametrize("method,path,mode", MODES, ids=[f"{m} {p} {g.value}" for m, p, g in MODES])
def test_contract(schema, method, path, mode):
    answers = fuzz(operation(schema, method, path), mode, BUDGET[method, path], f"{method} {path}",
                   ADMIN if path.startswith("/admin/") else None)
    ran[method, path, mode.value] = answers
    if (method, path) in JSON_GENERATION and mode is GenerationMode.POSITIVE:  # the engine ran, streams included
        assert answers[200, "application/json"] and answers[200, "text/event-stream"], answers


def test_at_least_3000_cases_in_all():
    if len(ran) < len(MODES):
        pytest.skip("runs after the whole fuzz run (-k selected part of it)")
    total = sum(c.total() for c in ran.values())
    print(f"\n{total} cases in all")
    assert total >= MIN_CASES, ran


def test_every_schema_reference_resolves(checkpoint_dir):
    """Each stream event model (generation, edit) is among the document's components."""
    import json
    import re

    from service.settings import Settings

    doc = create_app(Settings(checkpoint_dir=checkpoint_dir, device="cpu")).openapi()
    refs = set(re.findall(r"#/components/schemas/([A-Za-z0-9_]+)", json.dumps(doc)))
    assert refs and refs <= set(doc["components"]["schemas"]), refs - set(doc["components"]["schemas"])
    assert {"EditPartialImageEvent", "EditCompletedEvent", "PartialImageEvent"} <= refs
