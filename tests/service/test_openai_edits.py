"""OpenAI's edits and variations endpoints, spoken by the official ``openai`` package against a live
server (``images.edit`` with and without a mask, as a list, streamed; ``images.create_variation``;
this service's fields as extra form fields; the client's error types), and the multipart body's
every malformation answered 400 (or 413) in OpenAI's error shape."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import live_server
from tests.service.test_edits import digit, half_mask

openai = pytest.importorskip("openai", reason="the openai package (a dev dependency) is needed")


def file(img: Image.Image, name: str = "image.png") -> tuple[str, bytes, str]:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return name, buf.getvalue(), "image/png"


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    from service.settings import Settings

    with live_server(Settings(checkpoint_dir=checkpoint_dir, device="cpu", default_model="tiny-digits",
                              max_images=4, max_steps=50, max_image_bytes=32 * 1024)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_edit_with_a_mask_repaints_only_there(client):
    result = client.images.edit(image=file(digit()), mask=file(half_mask(), "mask.png"), prompt="seven", n=2,
                                size="16x16", extra_body={"seed": 3, "steps": 6, "scheduler": "ddpm"})
    assert len(result.data) == 2 and result.size == "16x16"
    for d in result.data:
        out = pixels(d.b64_json)
        assert np.array_equal(out[:, 8:], np.asarray(digit())[:, 8:])
    again = client.images.edit(image=[file(digit())], mask=file(half_mask(), "mask.png"), prompt="seven", n=2,
                               extra_body={"seed": 3, "steps": 6, "scheduler": "ddpm"})  # image[] (a list)
    assert [d.b64_json for d in again.data] == [d.b64_json for d in result.data]


def test_edit_without_a_mask_is_image_to_image_at_the_given_strength(client, server):
    raw = client.images.with_raw_response.edit(image=file(digit()), prompt="two",
                                               extra_body={"strength": "0.5", "steps": 10, "seed": 1})
    assert raw.headers["x-evaluations"] == "5"
    assert pixels(raw.parse().data[0].b64_json).shape == (16, 16)


def test_a_transparent_image_without_a_mask_repaints_its_transparent_pixels(client):
    rgba = np.dstack([np.asarray(digit())] * 3 + [np.full((16, 16), 255, np.uint8)])
    rgba[:, :8, 3] = 0
    out = pixels(client.images.edit(image=file(Image.fromarray(rgba, "RGBA")), prompt="one",
                                    extra_body={"steps": 4, "seed": 0}).data[0].b64_json)
    assert np.array_equal(out[:, 8:], np.asarray(digit())[:, 8:])


def test_a_streamed_edit_sends_partial_images_then_the_completed_ones(client):
    events = list(client.images.edit(image=file(digit()), mask=file(half_mask(), "mask.png"), prompt="four",
                                     stream=True, partial_images=2, n=2, extra_body={"steps": 8, "seed": 4}))
    kinds = [e.type for e in events]
    assert kinds.count("image_edit.partial_image") == 4 and kinds[-2:] == ["image_edit.completed"] * 2
    assert all(e.size == "16x16" for e in events)


def test_create_variation_keeps_the_image_recognisable_but_new(client):
    result = client.images.create_variation(image=file(digit()), n=2, extra_body={"seed": 5, "steps": 10})
    outs = [pixels(d.b64_json).astype(float) for d in result.data]
    assert len(outs) == 2 and not np.array_equal(outs[0], outs[1])
    # toward a class (the tiny test model's conditioning starts at zero, so no visible change is asserted
    # here: the edit study measures it on the real model)
    toward = client.images.create_variation(image=file(digit()), extra_body={"seed": 5, "steps": 10,
                                                                            "class_label": "nine"})
    assert pixels(toward.data[0].b64_json).shape == (16, 16)
    again = client.images.create_variation(image=file(digit()), n=2, extra_body={"seed": 5, "steps": 10})
    assert [d.b64_json for d in again.data] == [d.b64_json for d in result.data]


def test_the_clients_error_types(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=file(digit()), prompt="one", extra_body={"seed": "abc"})
    assert e.value.body["param"] == "seed"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=file(digit()), prompt="one", extra_body={"strength": "2"})
    assert e.value.body["param"] == "strength"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=file(digit()), prompt="one", extra_body={"colour": "blue"})
    assert e.value.body["code"] == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=file(digit()), mask=file(Image.new("L", (8, 8)), "m.png"), prompt="one")
    assert e.value.body["param"] == "mask"
    with pytest.raises(openai.NotFoundError):
        client.images.create_variation(image=file(digit()), model="no-such-model")
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
    with pytest.raises(openai.APIStatusError) as e:
        client.images.edit(image=file(big), prompt="one")
    assert e.value.status_code == 413 and e.value.body["code"] == "payload_too_large"


def _post(server, path, **kw):
    return httpx.post(server + path, timeout=60, **kw)


@pytest.mark.parametrize("kwargs,param,words", [
    ({"files": [("prompt", (None, "one"))]}, "image", "Missing required parameter"),
    ({"files": [("image", file(digit())), ("image", file(digit()))], "data": {"prompt": "one"}}, "image",
     "one image per request"),
    ({"files": {"image": file(digit())}, "data": {"prompt": "one", "seed": ["1", "2"]}}, "seed", "more than once"),
    ({"files": {"image": file(digit()), "seed": ("s.txt", b"3", "text/plain")}, "data": {"prompt": "one"}}, "seed",
     "text field, not a file"),
    ({"files": [("image", (None, "not a file")), ("prompt", (None, "one"))]}, "image", "must be a file part"),
    ({"files": {"image": ("x.png", b"not an image", "image/png")}, "data": {"prompt": "one"}}, "image", "not a PNG"),
    ({"files": {"image": file(digit())}}, "prompt", "Missing required parameter"),
    ({"json": {"prompt": "one"}}, None, "multipart/form-data"),
    ({"data": {"prompt": "one"}}, None, "multipart/form-data"),  # url-encoded
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, "prompt",
     "Missing required parameter"),  # no part survives
])
def test_malformed_multipart_bodies_are_400_naming_the_part(server, kwargs, param, words):
    r = _post(server, "/v1/images/edits", **kwargs)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error", err


def test_variations_take_no_mask_and_no_stream(server):
    r = _post(server, "/v1/images/variations", files={"image": file(digit()), "mask": file(half_mask())})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
    r = _post(server, "/v1/images/variations", files={"image": file(digit())}, data={"stream": "true"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter"
