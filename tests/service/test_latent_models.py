"""The service serving Stable Diffusion–family models (tiny random SD 1.x and SDXL folders,
tests/sd_models.py) beside its own pixel models and a pixel diffusers folder: GET /models, the native
API (sizes, negative prompts, guidance_scale), streaming with previews (cheap and decoded), the OpenAI
generations and edits endpoints through the official client, batch invariance, the decode chunks,
and every bad input as a 422 naming its field."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api import create_app
from service.settings import Settings
from tests.diffusers_models import SPECS, save as save_pixel
from tests.sd_models import SD_SPECS, save as save_sd
from tests.service.asgi import parse_sse, serve, until
from tests.service.conftest import live_server

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(checkpoint_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("latent")
    for p in checkpoint_dir.glob("*.safetensors"):
        shutil.copy(p, d / p.name)
    save_sd(SD_SPECS["sd1"], d / "sd-tiny")
    save_sd(SD_SPECS["sdxl"], d / "sdxl-tiny")
    save_pixel(SPECS["rgb32"], d / "ddpm-rgb32")
    flux = shutil.copytree(d / "sd-tiny", d / "flux-tiny")  # a pipeline this service does not serve: skipped
    index = json.loads((flux / "model_index.json").read_text())
    (flux / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    return d


def settings(model_dir, **kw) -> Settings:
    return Settings(**{"checkpoint_dir": model_dir, "device": "cpu", "default_model": "tiny-digits", "max_steps": 50,
                       "max_size": 128, **kw})


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(settings(model_dir))) as c:
        yield c


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def b64png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def photo(w=64, h=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_models_report_shapes_sizes_encoders_and_defaults(client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"tiny-digits", "tiny-text", "sd-tiny", "sdxl-tiny", "ddpm-rgb32"}  # flux-tiny skipped
    sd, xl, px = models["sd-tiny"], models["sdxl-tiny"], models["ddpm-rgb32"]
    assert sd["image_shape"] == [3, 64, 64] and sd["sample_shape"] == [4, 8, 8] and sd["size"] == "64x64"
    assert sd["sizes"] == "multiples of 8 up to 128" and px["sizes"] == "native only"
    assert (sd["size_multiple"], sd["max_size"], px["size_multiple"], px["max_size"]) == (8, 128, None, None)
    assert sd["default_scheduler"] == "dpmpp_2m" and sd["default_steps"] == 25 and sd["default_guidance_scale"] == 7.5
    assert sd["negative_prompt"] and sd["max_prompt_tokens"] == 75 and sd["text_encoders"][0].startswith("CLIPTextModel")
    assert len(xl["text_encoders"]) == 2 and xl["architecture"].startswith("SDXL")
    assert px["sample_shape"] == px["image_shape"] == [3, 32, 32] and not px["negative_prompt"]
    v1 = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert v1["sdxl-tiny"]["sample_shape"] == [4, 8, 8] and v1["sdxl-tiny"]["resizable"]
    assert v1["sd-tiny"]["default_guidance_scale"] == 7.5 and not v1["ddpm-rgb32"]["resizable"]


def test_generation_with_size_negative_prompt_and_guidance_scale(client):
    body = {"model": "sd-tiny", "prompt": "a red bicycle", "negative_prompt": "blurry", "guidance_scale": 5.0,
            "width": 96, "height": 48, "steps": 3, "seed": 11, "num_images": 2}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["scheduler"] == "dpmpp_2m" and out["guidance"] == 4.0 and out["guidance_scale"] == 5.0
    assert (out["width"], out["height"]) == (96, 48) and out["evaluations"] == 3
    assert [(png(i).size, png(i).mode) for i in out["images"]] == [((96, 48), "RGB")] * 2
    plain = client.post("/generate", json={**body, "negative_prompt": None}).json()
    assert plain["images"] != out["images"]  # the negative prompt replaced the null condition
    again = client.post("/generate", json=body).json()
    assert again["images"] == out["images"]
    r = client.post("/generate", json={"model": "sdxl-tiny", "prompt": "a cat", "steps": 2, "seed": 1},
                    headers={"accept": "image/png"})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 64)
    assert r.headers["x-size"] == "64x64"


def test_streaming_cheap_and_decoded_previews(client):
    base = {"model": "sdxl-tiny", "prompt": "a lighthouse", "steps": 4, "seed": 5, "stream": True, "preview_every": 2}
    for decode in (False, True):
        events = parse_sse(client.post("/generate", json={**base, "preview_decode": decode}).text)
        names = [e for e, _ in events]
        assert names[0] == "queued" and names[-1] == "done" and "preview" in names, names
        preview = next(d for e, d in events if e == "preview")
        assert png(preview["images"][0]).size == (64, 64) and png(preview["images"][0]).mode == "RGB"
        assert events[-1][1]["evaluations"] == 4


def test_image_to_image_and_inpainting_keep_the_kept_pixels(client):
    image = photo(64, 48, seed=1)
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 8, 40, 32))  # white: repaint
    r = client.post("/generate", json={"model": "sd-tiny", "prompt": "a bird", "image": b64png(image),
                                       "mask": b64png(mask), "steps": 4, "seed": 3})
    assert r.status_code == 200, r.text
    out = np.asarray(png(r.json()["images"][0]), int)
    src, keep = np.asarray(image, int), np.asarray(mask) < 128
    assert out.shape == (48, 64, 3) and (out[keep] == src[keep]).all()  # edited at the image's own size
    assert np.abs(out[~keep] - src[~keep]).mean() > 5
    r = client.post("/generate", json={"model": "sd-tiny", "prompt": "a bird", "image": b64png(image),
                                       "strength": 0.5, "steps": 4, "seed": 3})
    assert r.status_code == 200 and r.json()["evaluations"] == 2 and r.json()["strength"] == 0.5


def test_openai_generations_and_edits(model_dir):
    openai = pytest.importorskip("openai")
    with live_server(settings(model_dir)) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
            result = client.images.generate(model="sd-tiny", prompt="a fox", n=2, size="80x64",
                                            extra_body={"steps": 2, "seed": 0, "negative_prompt": "fog"})
            assert [png(d.b64_json).size for d in result.data] == [(80, 64)] * 2 and result.size == "80x64"
            with pytest.raises(openai.BadRequestError) as e:
                client.images.generate(model="sd-tiny", prompt="a fox", size="81x64", extra_body={"steps": 2})
            assert "multiple of 8" in str(e.value)
            image = photo(64, 64, seed=2).convert("RGBA")
            pixels = np.asarray(image).copy()
            pixels[:32, :, 3] = 0  # transparent: repaint
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            edited = client.images.edit(model="sdxl-tiny", image=("in.png", buf.getvalue(), "image/png"),
                                        prompt="a fox", extra_body={"steps": 3, "seed": 1})
            out = np.asarray(png(edited.data[0].b64_json).convert("RGB"), int)
            assert (out[32:] == pixels[32:, :, :3]).all()
            buf = io.BytesIO()
            photo(72, 56, seed=3).save(buf, format="PNG")
            varied = client.images.create_variation(model="sd-tiny", image=("in.png", buf.getvalue(), "image/png"),
                                                    n=2, extra_body={"steps": 4, "seed": 2})
            assert [png(d.b64_json).size for d in varied.data] == [(72, 56)] * 2 and varied.size == "72x56"
            events = list(client.images.generate(model="sd-tiny", prompt="a fox", stream=True, partial_images=1,
                                                 extra_body={"steps": 4}))
            assert [e.type for e in events][-1] == "image_generation.completed"


def test_same_seed_same_image_alone_or_co_batched(model_dir):
    target = {"model": "sd-tiny", "prompt": "a boat", "steps": 5, "seed": 42, "guidance_scale": 6.0}
    crowd = [{"model": "sd-tiny", "prompt": "a tree", "scheduler": "heun", "steps": 3, "seed": 1, "num_images": 2},
             {"model": "sd-tiny", "prompt": "a boat", "negative_prompt": "rain", "scheduler": "ddim", "steps": 6,
              "seed": 2},
             {"model": "sd-tiny", "prompt": "a boat", "image": b64png(photo()), "strength": 0.6, "steps": 5, "seed": 3},
             {"model": "sd-tiny", "prompt": "wide", "width": 96, "steps": 4, "seed": 4},
             {"model": "ddpm-rgb32", "steps": 4, "seed": 5}, {"prompt": "seven", "steps": 4, "seed": 6}]

    async def body(app, client):
        alone = (await client.post("/generate", json=target)).json()["images"][0]
        engine = app.state.engine
        seen = []
        step = engine.iterate

        def counting():
            seen.append({k: b.rows for k, b in engine.batches.items() if b.rows})
            return step()
        engine.iterate = counting
        answers = await asyncio.gather(*(client.post("/generate", json=b) for b in [*crowd, target]))
        engine.iterate = step
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return alone, answers[-1].json()["images"][0], seen, set(engine.batches)

    # (goodput off: this is about co-batching, which its knee may rightly refuse on a busy CPU)
    alone, crowded, seen, batches = serve(settings(model_dir, goodput=False), body)
    assert np.abs(np.asarray(png(alone), int) - np.asarray(png(crowded), int)).max() <= 1
    assert any(rows.get("sd-tiny", 0) >= 3 for rows in seen)  # the target shared forward passes
    assert any("sd-tiny@96x64" in rows and "sd-tiny" in rows for rows in seen)  # sizes side by side
    assert "sd-tiny@96x64" not in batches  # the other size's batch went once idle


def test_decoding_never_holds_back_more_than_one_chunk_per_iteration(model_dir):
    """One image per decode chunk (decode_chunk_pixels = 64·64): four images of one request finish
    together while another request's rows are in flight; each iteration decodes at most one."""
    async def body(app, client):
        engine = app.state.engine
        pipe = engine.models["sd-tiny"]
        calls, per_iteration = [], []
        decode, step = pipe.decode, engine.iterate

        def counting_decode(samples, *a, **kw):
            calls.append(len(samples))
            return decode(samples, *a, **kw)

        def counting_step():
            before = len(calls)
            rows = engine.batches["sd-tiny"].rows
            out = step()
            per_iteration.append((rows, len(calls) - before))
            return out
        pipe.decode, engine.iterate = counting_decode, counting_step
        long = asyncio.ensure_future(client.post("/generate", json={"model": "sd-tiny", "prompt": "b", "steps": 30,
                                                                    "seed": 2}))
        await until(lambda: engine.batches["sd-tiny"].rows > 0, "the long request runs")
        short = await client.post("/generate", json={"model": "sd-tiny", "prompt": "a", "steps": 2, "seed": 1,
                                                     "num_images": 4})
        answers = [short, await long]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return calls, per_iteration

    # (goodput off: its knee may keep the two requests apart on a busy CPU, and this is about decoding)
    calls, per_iteration = serve(settings(model_dir, decode_chunk_pixels=64 * 64, goodput=False), body)
    assert calls and max(calls) == 1 and sum(calls) == 5
    assert all(n <= 1 for rows, n in per_iteration if rows > 0), [p for p in per_iteration if p[1]]  # one chunk at most


@pytest.mark.parametrize("body,field,words", [
    ({"model": "sd-tiny", "prompt": "a " * 80}, "prompt", "at most 75"),
    ({"model": "sd-tiny", "prompt": "a", "negative_prompt": "a " * 80}, "negative_prompt", "at most 75"),
    ({"model": "sd-tiny", "prompt": "a", "width": 60}, "width", "multiple of 8"),
    ({"model": "sd-tiny", "prompt": "a", "height": 256}, "height", "at most 128"),
    ({"model": "ddpm-rgb32", "negative_prompt": "x"}, "negative_prompt", "unconditional"),
    ({"model": "tiny-digits", "prompt": "nine", "negative_prompt": "x"}, "negative_prompt", "class-conditional"),
    ({"model": "sd-tiny", "class_label": 3}, "class_label", "no classes"),
    ({"model": "sd-tiny", "prompt": "a", "guidance": 2.0, "guidance_scale": 3.0}, "guidance_scale", "not both"),
    ({"model": "sd-tiny", "prompt": "a", "guidance_scale": 50.0}, "guidance_scale", "at most 31"),
    ({"model": "ddpm-rgb32", "width": 64}, "width", "32x32 images only"),
])
def test_bad_input_is_a_422_naming_the_field(client, body, field, words):
    r = client.post("/generate", json={**body, "steps": 2})
    assert r.status_code == 422, r.text
    item = r.json()["detail"][0]
    assert item["field"] == field and words in item["msg"], item


def test_an_edit_image_of_another_size_than_asked_is_a_422(client):
    r = client.post("/generate", json={"model": "sd-tiny", "prompt": "a", "image": b64png(photo(64, 48)),
                                       "width": 64, "height": 64, "steps": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "image"
    assert "64x48" in r.json()["detail"][0]["msg"]
    assert client.get("/healthz").status_code == 200


@pytest.mark.slow
def test_a_compiled_latent_engine_matches_the_eager_one(model_dir):
    """The latent step (the UNet and the sampler math) under torch.compile (the aot_eager backend: the
    same graphs the GPU's inductor compiles, without generating kernels), padded to a bucket."""
    import torch

    import diffusion
    from diffusion import Acceleration
    from service.engine import Engine, GenerationSpec

    pipe = diffusion.load(str(model_dir / "sdxl-tiny"), "cpu")
    c, neg = pipe.resolve("a kite"), pipe.negative("rain")
    specs = [GenerationSpec("sdxl-tiny", c, "dpmpp_2m", 3, 6.5, (5, 6), negative=neg),
             GenerationSpec("sdxl-tiny", c, "ddim", 2, 0.0, (8,))]
    images = []
    for accel in (Acceleration(), Acceleration(compile="default", backend="aot_eager", buckets=(4,))):
        eng = Engine({"sdxl-tiny": pipe}, max_rows=4, accel=accel)
        eng.warm_up()
        jobs = [eng.submit(s, 120) for s in specs]
        while not all(j.future.done() for j in jobs):
            eng.iterate()
        images.append(torch.cat([j.future.result().images for j in jobs]))
    torch.testing.assert_close(images[1], images[0], rtol=1e-4, atol=1e-4)
