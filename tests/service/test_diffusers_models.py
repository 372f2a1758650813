"""The service serving diffusers-format models beside its own: one checkpoint directory with the tiny
class and text checkpoints and two diffusers folders (a 3×32×32 unconditional pipeline folder and
a 3×64×64 class-conditional model folder), answered in one run over the native API, streaming and
the OpenAI endpoint (the official client against a live server), batch-invariant, with clear
errors for what a model cannot do and for folders that cannot be served."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil

import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient
from PIL import Image

from diffusion import CheckpointError
from service.api import create_app
from service.settings import Settings
from tests.diffusers_models import SPECS, Spec, save
from tests.service.asgi import parse_sse, serve
from tests.service.conftest import live_server

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def model_dir(checkpoint_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    for p in checkpoint_dir.glob("*.safetensors"):
        shutil.copy(p, d / p.name)
    save(SPECS["rgb32"], d / "ddpm-rgb32")
    save(SPECS["rgb64-class-v"], d / "ddpm-rgb64-class")
    (d / "notes").mkdir()  # a folder that is no model is left alone
    (d / "notes" / "readme.txt").write_text("not a model")
    return d


def settings(model_dir, **kw) -> Settings:
    return Settings(checkpoint_dir=model_dir, device="cpu", default_model="tiny-digits", max_steps=50, **kw)


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(settings(model_dir))) as c:
        yield c


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_models_lists_every_model_with_shape_conditioning_size_and_source(client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"tiny-digits", "tiny-text", "ddpm-rgb32", "ddpm-rgb64-class"}
    rgb, cls, own = models["ddpm-rgb32"], models["ddpm-rgb64-class"], models["tiny-digits"]
    assert rgb["image_shape"] == [3, 32, 32] and rgb["size"] == "32x32" and rgb["conditioning"] == "none"
    assert rgb["source"] == "diffusers pipeline folder" and rgb["parameters"] > 0 and not rgb["guidance"]
    assert rgb["default_clip"] == "static" and rgb["prediction"] == "epsilon"
    assert cls["image_shape"] == [3, 64, 64] and cls["conditioning"] == "class" and cls["guidance"]
    assert cls["class_names"] == ["cat", "dog", "owl"] and cls["source"] == "diffusers model folder"
    assert cls["prediction"] == "v" and cls["schedule"] == "squaredcos_cap_v2"
    assert own["image_shape"] == [1, 16, 16] and own["source"] == "diffusion-serve checkpoint"
    v1 = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert v1["ddpm-rgb32"]["size"] == "32x32" and v1["ddpm-rgb64-class"]["image_shape"] == [3, 64, 64]
    assert v1["ddpm-rgb64-class"]["source"] == "diffusers model folder" and v1["tiny-text"]["size"] == "16x16"


def test_all_three_kinds_answer_with_their_own_shapes_and_modes(client):
    for body, size, mode in [({"model": "ddpm-rgb32"}, (32, 32), "RGB"),
                             ({"model": "ddpm-rgb64-class", "prompt": "owl", "guidance": 1.5}, (64, 64), "RGB"),
                             ({"prompt": "nine"}, (16, 16), "L")]:
        r = client.post("/generate", json={**body, "steps": 3, "seed": 1, "num_images": 2})
        assert r.status_code == 200, r.text
        assert [(png(i).size, png(i).mode) for i in r.json()["images"]] == [(size, mode)] * 2
    r = client.post("/generate", json={"model": "ddpm-rgb32", "steps": 2, "num_images": 4},
                    headers={"accept": "image/png"})
    grid = Image.open(io.BytesIO(r.content))
    assert grid.mode == "RGB" and grid.size == (2 + 2 * 34, 2 + 2 * 34)


def test_what_a_model_cannot_do_is_a_422_that_says_so(client):
    cases = [({"model": "ddpm-rgb32", "class_label": 1}, "class_label", "unconditional"),
             ({"model": "ddpm-rgb32", "prompt": "a cat"}, "prompt", "unconditional"),
             ({"model": "ddpm-rgb32", "guidance": 2.0}, "guidance", "null condition"),
             ({"model": "ddpm-rgb64-class", "prompt": "zebra"}, "prompt", "unknown class"),
             ({"model": "ddpm-rgb64-class", "class_label": 7}, "class_label", "out of range")]
    for body, field, words in cases:
        r = client.post("/generate", json={**body, "steps": 2})
        assert r.status_code == 422, (body, r.text)
        item = r.json()["detail"][0]
        assert item["field"] == field and words in item["msg"], (body, item)


def test_streaming_a_diffusers_model(client):
    r = client.post("/generate", json={"model": "ddpm-rgb64-class", "class_label": "dog", "scheduler": "dpmpp_2m",
                                       "steps": 4, "stream": True, "preview_every": 2, "seed": 3})
    events = parse_sse(r.text)
    names = [e for e, _ in events]
    assert names[0] == "queued" and names[-1] == "done" and "preview" in names
    preview = next(d for e, d in events if e == "preview")
    assert png(preview["images"][0]).size == (64, 64) and png(preview["images"][0]).mode == "RGB"
    done = events[-1][1]
    assert done["model"] == "ddpm-rgb64-class" and done["evaluations"] == 4
    again = client.post("/generate", json={"model": "ddpm-rgb64-class", "class_label": "dog", "scheduler": "dpmpp_2m",
                                           "steps": 4, "seed": 3}).json()
    assert again["images"] == done["images"]


def test_same_seed_same_image_alone_or_co_batched_across_models(model_dir):
    target = {"model": "ddpm-rgb32", "scheduler": "ddim", "steps": 6, "seed": 42}
    crowd = [{"model": "ddpm-rgb32", "scheduler": "heun", "steps": 4, "seed": 1, "num_images": 3},
             {"model": "ddpm-rgb32", "scheduler": "ddpm", "steps": 8, "seed": 2},
             {"model": "ddpm-rgb64-class", "class_label": 0, "guidance": 2.0, "steps": 5, "seed": 3},
             {"prompt": "seven", "steps": 6, "seed": 4, "num_images": 2}]

    async def body(app, client):
        alone = (await client.post("/generate", json=target)).json()["images"][0]
        engine = app.state.engine
        seen = []
        step = engine.iterate

        def counting():  # which models share an iteration
            seen.append({name: b.rows for name, b in engine.batches.items() if b.rows})
            return step()
        engine.iterate = counting
        answers = await asyncio.gather(*(client.post("/generate", json=b) for b in [*crowd, target]))
        engine.iterate = step
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return alone, answers[-1].json()["images"][0], seen

    alone, crowded, seen = serve(settings(model_dir), body)
    # batches of other sizes may round a convolution differently (as tests/service/test_engine.py allows):
    # at most one pixel level apart
    assert np.abs(np.asarray(png(alone), int) - np.asarray(png(crowded), int)).max() <= 1
    assert any(len(models) >= 2 for models in seen)  # the RGB models and the default one ran side by side


def test_the_openai_client_gets_each_models_size(model_dir):
    openai = pytest.importorskip("openai")
    with live_server(settings(model_dir)) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            result = client.images.generate(model="ddpm-rgb64-class", prompt="cat", n=2, size="64x64",
                                            extra_body={"steps": 3, "seed": 0})
            assert [png(d.b64_json).size for d in result.data] == [(64, 64)] * 2 and result.size == "64x64"
            assert png(client.images.generate(model="ddpm-rgb32", prompt="", size="auto",
                                              extra_body={"steps": 2}).data[0].b64_json).mode == "RGB"
            with pytest.raises(openai.BadRequestError) as e:
                client.images.generate(model="ddpm-rgb32", prompt="", size="64x64", extra_body={"steps": 2})
            assert "32x32" in str(e.value)
            models = {m.id: m for m in client.models.list().data}
            assert models["ddpm-rgb32"].size == "32x32"
            events = list(client.images.generate(model="ddpm-rgb32", prompt="", stream=True, partial_images=1,
                                                 extra_body={"steps": 4}))
            assert [e.type for e in events][-1] == "image_generation.completed"


@pytest.mark.parametrize("breakage,message", [
    ("truncated", "not a readable safetensors file"),
    ("schedule", "unknown beta_schedule"),
    ("notunet", "not a UNet2DModel"),
])
def test_a_bad_folder_is_an_error_naming_it(tmp_path, checkpoint_dir, breakage, message):
    """Scanned once (model_control=none), it stops the start-up; polled (the default), it fails alone:
    listed with its error, the others serve."""
    import json

    for p in checkpoint_dir.glob("*.safetensors"):
        shutil.copy(p, tmp_path / p.name)
    folder = save(Spec(attention=False, layout="flat"), tmp_path / f"broken-{breakage}")
    if breakage == "truncated":
        w = folder / "diffusion_pytorch_model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    else:
        name, change = {"schedule": ("scheduler_config.json", {"beta_schedule": "quadratic"}),
                        "notunet": ("config.json", {"_class_name": "VQModel"})}[breakage]
        cfg = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**cfg, **change}))

    async def start():
        async with LifespanManager(create_app(settings(tmp_path, model_control="none"))):
            pass
    with pytest.raises(CheckpointError, match=message) as e:
        asyncio.run(start())
    assert str(folder) in str(e.value)
    with TestClient(create_app(settings(tmp_path))) as c:
        listed = c.get("/models").json()
        failed = c.post("/generate", json={"model": folder.name, "steps": 2})
        served = c.post("/generate", json={"class_label": 1, "steps": 2})
    assert folder.name in listed["not_loaded_yet"]
    assert failed.status_code == 503 and message in failed.json()["detail"] and str(folder) in failed.json()["detail"]
    assert served.status_code == 200
