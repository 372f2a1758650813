"""The HTTP contract, field by field and error by error, on tiny real checkpoints, with the app
started as production starts it (lifespan included)."""

from __future__ import annotations

import base64
import io
import json
import logging

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api import create_app


@pytest.fixture(scope="module")
def client(checkpoint_dir):
    from service.settings import Settings

    app = create_app(Settings(checkpoint_dir=checkpoint_dir, device="cpu", default_model="tiny-digits",
                              max_images=4, max_steps=50, max_prompt_chars=40))
    with TestClient(app) as c:
        yield c


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_generate_returns_pngs_seeds_and_timings(client):
    r = client.post("/generate", json={"prompt": "nine", "steps": 3, "seed": 7, "num_images": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [7, 8] and body["model"] == "tiny-digits" and body["scheduler"] == "ddim"
    assert body["steps"] == 3 and body["guidance"] == 2.0  # the model's default guidance
    assert [decode(i).size for i in body["images"]] == [(16, 16), (16, 16)]
    t = body["timings"]
    assert 0 <= t["queued_s"] <= t["total_s"] and 0 <= t["generating_s"] <= t["total_s"]
    assert r.headers["x-request-id"] == body["request_id"]


def test_defaults_and_random_seed(client):
    body = client.post("/generate", json={"class_label": "three"}).json()
    assert body["steps"] == 4 and body["scheduler"] == "ddim" and len(body["seeds"]) == 1


def test_same_seed_same_image_through_the_api(client):
    req = {"class_label": 5, "scheduler": "heun", "steps": 3, "seed": 11, "guidance": 1.0}
    a, b = (client.post("/generate", json=req).json()["images"][0] for _ in range(2))
    assert a == b


def test_png_with_accept_header_and_a_grid_for_several(client):
    r = client.post("/generate", json={"class_label": 1, "steps": 2, "seed": 0}, headers={"accept": "image/png"})
    assert r.headers["content-type"] == "image/png" and Image.open(io.BytesIO(r.content)).size == (16, 16)
    assert r.headers["x-seeds"] == "0"
    r = client.post("/generate", json={"class_label": 1, "steps": 2, "num_images": 4}, headers={"accept": "image/png"})
    assert Image.open(io.BytesIO(r.content)).size == (2 + 2 * 18, 2 + 2 * 18)


def test_prompt_and_class_label_work_on_both_kinds_of_model(client):
    assert client.post("/generate", json={"prompt": "Seven", "steps": 2}).status_code == 200  # class model
    r = client.post("/generate", json={"model": "tiny-text", "class_label": 7, "steps": 2})  # text model
    assert r.status_code == 200 and r.json()["model"] == "tiny-text"
    r = client.post("/generate", json={"model": "tiny-text", "prompt": "a seven", "scheduler": "pndm", "steps": 3})
    assert r.status_code == 200


def test_models_lists_every_checkpoint(client):
    body = client.get("/models").json()
    assert body["default"] == "tiny-digits"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"tiny-digits", "tiny-text"}
    digits, text = by_name["tiny-digits"], by_name["tiny-text"]
    assert digits["conditioning"] == "class" and text["conditioning"] == "class+text"
    assert digits["class_names"][9] == "nine" and digits["image_shape"] == [1, 16, 16]
    assert digits["num_timesteps"] == 100 and digits["default_steps"] == 4 and digits["default_guidance"] == 2.0
    assert set(digits["schedulers"]) == {"ddpm", "ddim", "pndm", "heun", "dpmpp_2m"}
    assert digits["max_prompt_tokens"] is None and text["max_prompt_tokens"] == 6


INVALID = [
    ({"scheduler": "euler"}, "scheduler"),
    ({"steps": 0}, "steps"),
    ({"steps": 51}, "steps"),  # the service limit (50)
    ({"steps": 2.5}, "steps"),
    ({"steps": "ten"}, "steps"),
    ({"guidance": -0.5}, "guidance"),
    ({"guidance": "2"}, "guidance"),
    ({"num_images": 5}, "num_images"),
    ({"num_images": 0}, "num_images"),
    ({"seed": -1}, "seed"),
    ({"eta": -1.0}, "eta"),
    ({"eta": 0.5, "scheduler": "heun"}, "eta"),
    ({"class_label": 10}, "class_label"),
    ({"class_label": "ten"}, "class_label"),
    ({"class_label": True}, "class_label"),
    ({"class_label": [1]}, "class_label"),
    ({"prompt": "a cat"}, "prompt"),  # names no class of a class-conditional model
    ({"prompt": "x" * 41}, "prompt"),  # over the service's character limit
    ({"model": "tiny-text", "prompt": "one two three four five six seven"}, "prompt"),  # > 6 tokens
    ({"prompt": "one", "class_label": 1}, "prompt"),
    ({"clip": "hard"}, "clip"),
    ({"percentile": 0}, "percentile"),
    ({"spacing": "random"}, "spacing"),
    ({"colour": "red"}, "colour"),
    ({"guidance": 30.5}, "guidance"),  # above max_guidance (30)
    ({"guidance": 1e308}, "guidance"),
    ({"prompt": "nine", "model": {}}, "model"),  # once a 500: the metric labelling hashed the value
    ({"prompt": "nine", "model": ["a"]}, "model"),
]


@pytest.mark.parametrize("body,field", INVALID, ids=[f"{f}:{json.dumps(b)[:30]}" for b, f in INVALID])
def test_invalid_fields_are_422_naming_the_field(client, body, field):
    r = client.post("/generate", json={"class_label": 1, **body} if "class_label" not in body and "prompt" not in body
                    else body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert field in [d["field"] for d in detail] and all(d["msg"] for d in detail)


@pytest.mark.parametrize("raw", ['{"class_label": 1', '{"guidance": NaN}', '{"guidance": Infinity}', "[1, 2]", "",
                                 "null", '"nine"', '{"steps": 1e400}'])
def test_malformed_bodies_are_422_never_5xx(client, raw):
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["field"]


@pytest.mark.parametrize("raw", [b"\x80", b'{"prompt": "\xc3"}', b"[" * 100_000])
def test_bodies_that_cannot_be_decoded_are_422_like_malformed_json(client, raw):
    """Not UTF-8, or nested too deep for the JSON parser: once an undocumented 400."""
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [{"field": "body", "msg": "malformed JSON: the body could not be decoded",
                                   "type": "json_invalid", "loc": ["body"]}]


def test_invalid_model_values_are_labelled_unknown_in_the_metrics(client):
    for model in ({}, ["a"], 3, "nope-" * 20):
        assert client.post("/generate", json={"prompt": "nine", "model": model}).status_code in (404, 422)
    text = client.get("/metrics").text
    assert 'diffusion_requests_total{kind="generation",model="unknown",scheduler="ddim",status="422"}' in text
    assert "nope-" not in text


def test_unknown_model_is_404(client):
    r = client.post("/generate", json={"model": "nope", "prompt": "one"})
    assert r.status_code == 404 and "tiny-digits" in r.json()["detail"]


def test_the_engine_survives_every_bad_request(client):
    for body, _ in INVALID:
        client.post("/generate", json=body)
    assert client.get("/readyz").status_code == 200
    assert client.post("/generate", json={"class_label": 2, "steps": 2}).status_code == 200


def test_request_id_is_echoed_and_one_json_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="service.requests"):
        r = client.post("/generate", json={"prompt": "two", "steps": 2, "scheduler": "ddpm"},
                        headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    lines = [rec.msg for rec in caplog.records if rec.name == "service.requests"]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "abc-123" and line["status"] == 200 and line["model"] == "tiny-digits"
    assert line["scheduler"] == "ddpm" and line["steps"] == 2 and line["images"] == 1
    assert line["queue_s"] >= 0 and line["total_s"] >= 0 and "prompt" not in line
    from service.logs import JsonFormatter
    assert json.loads(JsonFormatter().format(caplog.records[-1]))["request_id"] == "abc-123"


def test_health_readiness_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/docs").status_code == 200
    assert "/generate" in client.get("/openapi.json").json()["paths"]


def test_metrics_families_present_and_counting(client):
    client.post("/generate", json={"class_label": 4, "steps": 2, "scheduler": "dpmpp_2m", "num_images": 3})
    client.post("/generate", json={"class_label": 4, "scheduler": "euler"})
    text = client.get("/metrics").text
    for family in ("diffusion_requests_total", "diffusion_request_duration_seconds_bucket",
                   "diffusion_queue_wait_seconds_bucket", "diffusion_batch_rows_bucket",
                   "diffusion_forward_duration_seconds_bucket", "diffusion_images_generated_total",
                   "diffusion_queue_depth", "diffusion_rows_in_flight", "process_cpu_seconds_total"):
        assert family in text, family
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['diffusion_requests_total{kind="generation",model="tiny-digits",scheduler="dpmpp_2m",status="200"}'] >= 1
    assert samples['diffusion_requests_total{kind="generation",model="tiny-digits",scheduler="unknown",status="422"}'] >= 1
    assert samples['diffusion_images_generated_total{model="tiny-digits"}'] >= 3
    assert samples['diffusion_batch_rows_count{model="tiny-digits"}'] >= 2


def test_readyz_is_503_until_the_app_has_started(make_settings):
    with TestClient(create_app(make_settings())) as c:
        assert c.get("/readyz").status_code == 200
    # after shutdown (engine stopped) and before startup: not ready
    assert c.get("/readyz").status_code == 503
    c2 = TestClient(create_app(make_settings()))  # no `with`: the lifespan never ran
    assert c2.get("/readyz").status_code == 503 and c2.get("/healthz").status_code == 200


def test_no_checkpoint_fails_at_startup_with_a_clear_message(tmp_path, make_settings):
    from service.registry import NoCheckpoints

    with pytest.raises(NoCheckpoints, match="no \\*.safetensors checkpoint"):
        with TestClient(create_app(make_settings(checkpoint_dir=tmp_path))):
            pass


@pytest.fixture(scope="module")
def keyed(checkpoint_dir):
    from service.settings import Settings

    app = create_app(Settings(checkpoint_dir=checkpoint_dir, device="cpu", api_keys="k1,secret-2",
                              metrics_require_key=True, cors_origins="https://ui.example"))
    with TestClient(app) as c:
        yield c


class TestApiKeys:
    def test_401_without_a_valid_key(self, keyed):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "secret-2"},
                        {"authorization": "Basic secret-2"}):
            r = keyed.post("/generate", json={"class_label": 1, "steps": 2}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert keyed.get("/models", headers=headers).status_code == 401
            assert keyed.get("/metrics", headers=headers).status_code == 401

    def test_valid_keys_pass(self, keyed):
        for key in ("k1", "secret-2"):
            h = {"authorization": f"Bearer {key}"}
            assert keyed.post("/generate", json={"class_label": 1, "steps": 2}, headers=h).status_code == 200
            assert keyed.get("/metrics", headers=h).status_code == 200

    def test_health_endpoints_stay_open(self, keyed):
        assert keyed.get("/healthz").status_code == 200 and keyed.get("/readyz").status_code == 200

    def test_cors(self, keyed):
        r = keyed.options("/generate", headers={"origin": "https://ui.example", "access-control-request-method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://ui.example"
        r = keyed.get("/healthz", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
