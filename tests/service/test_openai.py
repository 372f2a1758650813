"""The OpenAI Images API, spoken by the official ``openai`` package, unmodified, against a live server
(uvicorn on a loopback port, tiny real checkpoints): generate, stream, extra body fields, models,
and the client's error types for each refusal."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.service.conftest import live_server

openai = pytest.importorskip("openai", reason="the openai package (a dev dependency) is needed")


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    from service.settings import Settings

    with live_server(Settings(checkpoint_dir=checkpoint_dir, device="cpu", default_model="tiny-digits",
                              max_images=4, max_steps=50)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def native(server: str, body: dict) -> list[str]:
    r = httpx.post(server + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["images"]


def size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_generate_returns_b64_pngs_of_the_models_size(client):
    result = client.images.generate(prompt="nine", n=2, size="16x16", response_format="b64_json")
    assert isinstance(result, openai.types.ImagesResponse) and len(result.data) == 2
    assert result.created > 0 and result.size == "16x16" and result.output_format == "png"
    assert [size(d.b64_json) for d in result.data] == [(16, 16), (16, 16)] and result.data[0].url is None
    assert client.images.generate(prompt="nine", model="tiny-text", size="auto").data[0].b64_json


def test_extra_body_fields_steer_the_sampler_and_match_the_native_api(client, server):
    own = {"scheduler": "dpmpp_2m", "steps": 5, "guidance": 1.5, "seed": 42}
    result = client.images.generate(prompt="seven", model="tiny-digits", n=2, extra_body=own)
    assert [d.b64_json for d in result.data] == native(server, {"prompt": "seven", "num_images": 2, **own})
    raw = client.images.with_raw_response.generate(prompt="seven", extra_body=own)
    assert raw.headers["x-seeds"] == "42"


def test_streaming_partial_images_then_completed(client, server):
    own = {"scheduler": "ddim", "steps": 12, "seed": 5}
    events = list(client.images.generate(prompt="three", stream=True, partial_images=2, extra_body=own))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    done = events[-1]
    assert isinstance(done, openai.types.ImageGenCompletedEvent) and done.size == "16x16"
    assert done.output_format == "png" and done.usage.total_tokens == 0
    assert done.b64_json == native(server, {"prompt": "three", **own})[0]
    assert size(events[0].b64_json) == (16, 16)


def test_streaming_several_images_and_no_partials(client, server):
    own = {"steps": 4, "seed": 9}
    events = list(client.images.generate(prompt="one", n=2, stream=True, partial_images=0, extra_body=own))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert [e.b64_json for e in events] == native(server, {"prompt": "one", "num_images": 2, **own})


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert sorted(m.id for m in models) == ["tiny-digits", "tiny-text"]
    assert all(m.object == "model" and m.owned_by == "diffusion-serve" and m.created > 0 for m in models)
    assert client.models.retrieve("tiny-text").id == "tiny-text"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


@pytest.mark.parametrize("kwargs,param", [
    ({"size": "1024x1024"}, "size"),
    ({"response_format": "url"}, "response_format"),
    ({"n": 5}, "n"),  # above max_images
    ({"n": 0}, "n"),
    ({"partial_images": 4, "stream": True}, "partial_images"),
    ({"extra_body": {"steps": 51}}, "steps"),
    ({"extra_body": {"guidance": -1}}, "guidance"),
    ({"extra_body": {"colour": "red"}}, "colour"),
    ({"prompt": "a cat"}, "prompt"),  # names no class of the class-conditional model
])
def test_invalid_requests_raise_bad_request_naming_the_parameter(client, kwargs, param):
    call = {"prompt": "nine", **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        result = client.images.generate(**call)
        list(result) if call.get("stream") else None
    error = caught.value
    assert error.status_code == 400 and error.param == param and error.type == "invalid_request_error"
    assert error.body["message"] and error.code


def test_a_clear_message_names_the_models_size(client):
    with pytest.raises(openai.BadRequestError, match="16x16"):
        client.images.generate(prompt="nine", size="512x512")


def test_unknown_model_is_not_found(client, server):
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(prompt="nine", model="dall-e-3")
    assert caught.value.code == "model_not_found" and "tiny-digits" in caught.value.message
    metrics = httpx.get(server + "/metrics").text
    assert "dall-e-3" not in metrics  # a client's string is never a metric label
    assert 'diffusion_requests_total{kind="generation",model="unknown",scheduler="unknown",status="404"}' in metrics


def test_api_keys_as_bearer_tokens(checkpoint_dir):
    from service.settings import Settings

    with live_server(Settings(checkpoint_dir=checkpoint_dir, device="cpu", api_keys="k1,k2",
                              max_steps=10)) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as caught:
                bad.images.generate(prompt="nine", extra_body={"steps": 2})
            assert caught.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=url + "/v1", api_key="k2", max_retries=0) as good:
            assert len(good.images.generate(prompt="nine", extra_body={"steps": 2}).data) == 1
            assert [m.id for m in good.models.list()]


def test_a_failure_inside_the_stream_raises_an_api_error(checkpoint_dir):
    from service.settings import Settings

    with live_server(Settings(checkpoint_dir=checkpoint_dir, device="cpu", request_timeout_s=0.05)) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as c:
            with pytest.raises(openai.APIError, match="deadline"):
                list(c.images.generate(prompt="nine", stream=True, extra_body={"scheduler": "ddpm", "steps": 100}))
