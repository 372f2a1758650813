"""Stable Diffusion–family pipeline folders (tiny random-weight SD 1.x (ε), SD 2.x (v) and SDXL, saved
with ``save_pretrained``: tests/sd_models.py) loaded by ``diffusion.load`` and sampled by this
project's samplers, against diffusers' own pipelines on the same folders and the same latents.

The tolerance is diffusers' own float32 error: both float32 runs are compared with diffusers'
pipeline in float64 (same weights, same starting latents), and ours may be off the float64 result by
at most 8× diffusers' own float32 error, or 2e-6 of the result's scale (16 float32 ulps), whichever
is larger. Measured: ours 0.9× to 5× diffusers' error (5× for SD 2's v-prediction DDIM, whose x̂0 and
ε are formed in another order), every one under 1.1e-6 of the scale."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import diffusion
from diffusion import CheckpointError, UnsupportedModel
from tests.sd_models import SD_SPECS, SDSpec, latents, load_reference, save

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

STEPS = 10
PROMPT = "a watercolour lighthouse"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {kind: save(spec, root / kind) for kind, spec in SD_SPECS.items()}


@pytest.fixture(scope="module")
def ours(folders):
    return {kind: diffusion.load(str(f), "cpu") for kind, f in folders.items()}


def reference(folder, dtype=torch.float32, cls=None):
    pipe = load_reference(folder) if cls is None else cls.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(dtype)
    return pipe


def scheduler_like(ref, name):
    """diffusers' scheduler equivalent to this project's sampler of that name (as for pixel models)."""
    config = ref.scheduler.config
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True,
                                                   clip_sample=False)
    return diffusers.DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing", final_sigmas_type="zero",
        lower_order_final=True)


def assert_within_float32_error(mine, theirs32, theirs64):
    scale = float(theirs64.abs().max())
    ours_err = float((mine.double() - theirs64).abs().max()) / scale
    their_err = float((theirs32.double() - theirs64).abs().max()) / scale
    assert ours_err <= max(8 * their_err, 2e-6), (ours_err, their_err)


@pytest.mark.parametrize("kind", list(SD_SPECS))
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("negative", [None, "blurry, low contrast"])
def test_generation_equals_diffusers_pipeline(folders, ours, kind, sampler, negative):
    """Guided (guidance_scale 7.5, that is w = 6.5), with and without a negative prompt: the final
    latents, and the decoded images."""
    pipe, z = ours[kind], latents(SD_SPECS[kind], 2, seed=3)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        ref = reference(folders[kind], dtype)
        ref.scheduler = scheduler_like(ref, sampler)
        kw = dict(prompt=[PROMPT] * 2, negative_prompt=None if negative is None else [negative] * 2,
                  num_inference_steps=STEPS, guidance_scale=7.5)
        runs[dtype] = (ref(latents=z.to(dtype), output_type="latent", **kw).images,
                       ref(latents=z.to(dtype), output_type="pt", **kw).images)
    mine = pipe.generate_tensor(prompt=PROMPT, scheduler=sampler, steps=STEPS, guidance=6.5, num_images=2, x_T=z,
                                negative_prompt=negative, decode=False)
    assert_within_float32_error(mine, runs[torch.float32][0], runs[torch.float64][0])
    images = (pipe.decode(mine) / 2 + 0.5).clamp(0, 1)  # diffusers' "pt" output: [0, 1]
    assert_within_float32_error(images, runs[torch.float32][1], runs[torch.float64][1])


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_image_to_image_equals_diffusers_img2img(folders, ours, kind, monkeypatch):
    """StableDiffusionImg2ImgPipeline given the same image latents (this project's VAE encoding, the
    posterior's mean) and the same noise: strength 0.6 of 10 trailing steps starts both at t = 599."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    pipe = ours[kind]
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    known = pipe.edit_inputs(image)[0]
    noise = latents(SD_SPECS[kind], 1, seed=9)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, generator=None, device=None, dtype=None, **_:
                        noise.to(dtype).expand(shape).clone())
    runs = {}
    for dtype in (torch.float32, torch.float64):
        ref = reference(folders[kind], dtype, diffusers.StableDiffusionImg2ImgPipeline)
        ref.scheduler = scheduler_like(ref, "ddim")
        runs[dtype] = ref(prompt=PROMPT, image=known.to(dtype), strength=0.6, num_inference_steps=STEPS,
                          guidance_scale=5.0, output_type="latent").images
    mine = pipe.generate_tensor(prompt=PROMPT, scheduler="ddim", steps=STEPS, guidance=4.0, image=image[0],
                                strength=0.6, x_T=noise, decode=False)
    assert pipe.evaluations("ddim", STEPS, strength=0.6) == 6
    assert_within_float32_error(mine, runs[torch.float32], runs[torch.float64])


def test_the_card_says_what_the_folders_say(ours, folders):
    sd1, sd2, xl = ours["sd1"].card, ours["sd2"].card, ours["sdxl"].card
    for card in (sd1, sd2, xl):
        assert card.image_shape == (3, 64, 64) and card.sample_shape == (4, 8, 8) and card.scale == 8
        assert card.resizable and card.text_conditional and card.guidable and card.negative_prompts
        assert card.default_scheduler == "dpmpp_2m" and card.default_steps == 25 and card.default_guidance == 6.5
        assert card.max_prompt_tokens == 75 and card.schedule.kind == "scaled_linear"
    assert sd1.prediction == "epsilon" and sd2.prediction == "v" and xl.prediction == "epsilon"
    assert sd1.cond_dim == 77 * 32 and xl.cond_dim == 77 * 64 + 32  # tokens [77, D] (+ SDXL's pooled vector)
    assert sd1.null_prompt == "" and xl.null_prompt == "zeros"
    assert xl.text_encoders[1].startswith("CLIPTextModelWithProjection") and len(sd1.text_encoders) == 1
    ref = reference(folders["sd1"])
    assert sd1.parameters == sum(p.numel() for m in (ref.unet, ref.vae, ref.text_encoder) for p in m.parameters())
    torch.testing.assert_close(sd1.schedule.alphas_cumprod, ref.scheduler.alphas_cumprod.double(), rtol=0, atol=0)
    assert torch.count_nonzero(ours["sdxl"].null_cond) == 0


def test_sizes_other_than_native(ours):
    pipe = ours["sd1"]
    img = pipe.generate_tensor(prompt=PROMPT, steps=2, seed=0, height=48, width=80)
    assert img.shape == (1, 3, 48, 80)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe.shape_for(50, 64)


class LinearVAE(torch.nn.Module):
    """A VAE whose decoder is exactly linear per latent cell, RGB = B·z + c (nearest-upsampled), and
    whose encoder is its least-squares inverse: the map a preview fit must recover."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.B, self.c = torch.nn.Parameter(torch.randn(3, 4, generator=g)), torch.nn.Parameter(torch.randn(3) * 0.1)

    def encode(self, x):
        """B⁺·(RGB − c), plus along B's null space (which the decoder ignores) the cell's pixel spread,
        so that the latents span all four dimensions."""
        rgb = torch.nn.functional.avg_pool2d(x, 8) - self.c.view(1, 3, 1, 1)
        null = torch.linalg.svd(self.B.detach()).Vh[-1]
        spread = torch.nn.functional.avg_pool2d(x.pow(2), 8).mean(1, keepdim=True)
        mean = torch.einsum("zr,krhw->kzhw", torch.linalg.pinv(self.B), rgb) + null.view(1, 4, 1, 1) * spread
        return type("Out", (), {"latent_dist": type("Dist", (), {"mean": mean})()})()

    def decode(self, z, return_dict=False):
        rgb = torch.einsum("rz,kzhw->krhw", self.B, z) + self.c.view(1, 3, 1, 1)
        return (torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest"),)


def test_preview_map_is_fitted_to_the_decoder(ours):
    """fit_preview recovers a decoder that is linear per latent cell (scaling factor included); on
    the real (random) models the preview has the decoded images' shape and is finite."""
    pipe = ours["sd1"]
    model, vae = pipe.model, pipe.model.vae
    try:
        model.vae = LinearVAE()
        rms = model.fit_preview()
        expected = torch.cat([model.vae.B / model.scaling_factor, model.vae.c[:, None]], dim=1)
        torch.testing.assert_close(model.rgb_map, expected.detach(), rtol=1e-4, atol=1e-4)
        assert rms < 1e-4
    finally:
        model.vae = vae
        model.fit_preview()
    for kind, p in ours.items():
        z = torch.randn(2, *p.card.sample_shape, generator=torch.Generator().manual_seed(0))
        preview = p.preview(z)
        assert preview.shape == p.decode(z).shape == (2, 3, 64, 64) and torch.isfinite(preview).all()


def test_inpainting_keeps_every_kept_pixel_exactly(ours):
    pipe = ours["sd1"]
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask = torch.zeros(1, 64, 64)
    mask[:, 20:44, 12:40] = 1  # repaint this box (not aligned to the 8-pixel latent cells)
    out = pipe.generate_tensor(prompt=PROMPT, steps=4, seed=1, image=image, mask=mask, num_images=2)
    keep = (mask < 0.5).expand(3, -1, -1)
    for img in out:
        assert torch.equal(img[keep], image[keep])
        assert (img[~keep] - image[~keep]).abs().mean() > 0.05  # the box was repainted


def test_fp16_variant_folder_loads_in_float32_on_the_cpu(tmp_path):
    folder = save(SDSpec(kind="sd1", fp16_variant=True), tmp_path / "fp16")
    assert not list(folder.glob("*/diffusion_pytorch_model.safetensors"))
    pipe = diffusion.load(str(folder), "cpu")
    assert pipe.provenance["weights"] == "unet/diffusion_pytorch_model.fp16.safetensors"
    assert next(pipe.model.unet.parameters()).dtype == torch.float32
    assert torch.isfinite(pipe.generate_tensor(prompt=PROMPT, steps=2, seed=0)).all()


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_bad_and_unsupported_folders(folders, tmp_path):
    """A broken file stops the load naming it (CheckpointError); a well-formed folder of a kind that
    is not served is an UnsupportedModel naming the class."""
    def copy(name):
        return shutil.copytree(folders["sd1"], tmp_path / name)

    def truncate(f):
        path = f / "unet" / "diffusion_pytorch_model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
        return "unet/diffusion_pytorch_model.safetensors"

    def mismatch(f):
        _edit_json(f / "unet" / "config.json", block_out_channels=[32, 96])
        return "unet/diffusion_pytorch_model.safetensors"

    def pickled(f):
        src = f / "text_encoder" / "model.safetensors"
        torch.save({"x": torch.zeros(1)}, f / "text_encoder" / "pytorch_model.bin")
        src.unlink()
        return "text_encoder"

    def text_truncated(f):
        path = f / "text_encoder" / "model.safetensors"
        path.write_bytes(path.read_bytes()[:5000])
        return "text_encoder/model.safetensors"

    for name, change, error in [("truncated", truncate, "not a readable safetensors"),
                                ("mismatch", mismatch, "do not match|has shape"),
                                ("pickled", pickled, "safetensors"),
                                ("text", text_truncated, "not a readable safetensors")]:
        folder = copy(name)
        where = change(folder)
        with pytest.raises(CheckpointError, match=error) as e:
            diffusion.load(str(folder), "cpu")
        assert not isinstance(e.value, UnsupportedModel) and str(folder / where) in str(e.value), name

    def controlnet(f):
        _edit_json(f / "model_index.json", _class_name="StableDiffusionControlNetPipeline",
                   controlnet=["diffusers", "ControlNetModel"])

    def inpainting(f):
        _edit_json(f / "unet" / "config.json", in_channels=9)

    def flux(f):
        _edit_json(f / "model_index.json", _class_name="FluxPipeline", transformer=["diffusers", "FluxTransformer2DModel"])

    for name, change, error in [("controlnet", controlnet, "StableDiffusionControlNetPipeline"),
                                ("inpaint", inpainting, "9 input channels"), ("flux", flux, "FluxPipeline")]:
        folder = copy(name)
        change(folder)
        with pytest.raises(UnsupportedModel, match=error):
            diffusion.load(str(folder), "cpu")


def test_without_transformers_a_clear_error(folders, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(CheckpointError, match=r"pip install 'diffusion-serve\[diffusers\]'"):
        diffusion.load(str(folders["sd1"]), "cpu")


def test_metadata_sets_the_defaults(folders, tmp_path):
    folder = shutil.copytree(folders["sd1"], tmp_path / "turbo")
    (folder / "diffusion_serve.json").write_text(json.dumps({"default_steps": 1, "default_guidance_scale": 1.0,
                                                             "default_scheduler": "ddim"}))
    card = diffusion.load(str(folder), "cpu").card
    assert (card.default_steps, card.default_guidance, card.default_scheduler) == (1, 0.0, "ddim")
    (folder / "diffusion_serve.json").write_text(json.dumps({"default_guidance_scale": 0.5}))
    with pytest.raises(CheckpointError, match="at least 1"):
        diffusion.load(str(folder), "cpu")


def test_a_row_is_the_same_alone_and_co_batched(ours):
    """A guided SDXL row (seed 7) alone, and in one table with rows of other samplers, step counts,
    guidance, negative prompts and edits that join and leave around it. Co-batched rows run through
    other matrix shapes, so they may differ in float32 rounding, never more (measured: ≤ 3e-7 of the
    latents' scale)."""
    pipe = ours["sdxl"]
    c = pipe.resolve(PROMPT)
    neg = pipe.negative("fog")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32] = 1
    known, smask = pipe.edit_inputs(image, mask)
    target = pipe.row_request(c, 7, "dpmpp_2m", 6, 6.5, negative=neg)
    others = [pipe.row_request(c, 1, "ddim", 4, 0.0), pipe.row_request(pipe.resolve("a red barn"), 2, "heun", 3, 3.0),
              pipe.row_request(c, 3, "pndm", 2, 6.5, negative=pipe.negative("snow")),
              pipe.row_request(c, 4, "ddim", 8, 2.0, image=known[0], strength=0.5),
              pipe.row_request(c, 5, "ddpm", 5, 6.5, image=known[0], mask=smask[0], negative=neg)]

    alone = pipe.runner(1, 20)
    expected = alone.run_to_end(alone.add([target]))[0]

    runner = pipe.runner(6, 20)
    runner.add(others[:3])
    runner.step()
    mine = runner.add([target])[0]
    runner.add(others[3:])
    got = None
    while len(runner):
        finished = runner.step()
        if mine in finished:
            got = runner.take([mine])[0]
            finished.remove(mine)
        runner.take(finished)
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-5 * scale


def test_prompts_are_counted_right_while_another_thread_encodes(ours):
    """A request's thread counts its prompt while the engine's thread tokenizes a padded batch: the
    count is never the padded length (transformers' fast tokenizers keep padding state on themselves)."""
    import threading

    pipe = ours["sdxl"]
    stop, counts = threading.Event(), []

    def encode():  # the tokenizers alone, in a loop: the window a race needs (measured: without the lock, 77s)
        while not stop.is_set():
            for tower in pipe.model.towers:
                tower.tokens(["a kite over the sea", "fog"])

    worker = threading.Thread(target=encode)
    worker.start()
    try:
        for _ in range(300):
            counts.append(pipe.model.token_count("a kite"))
    finally:
        stop.set()
        worker.join()
    assert set(counts) == {2}
