"""diffusers-format pixel DDPMs (random-weight ``UNet2DModel``s saved with ``save_pretrained``, both
folder layouts) loaded by ``diffusion.load`` and sampled by this project's samplers, against
diffusers' own schedulers on the same network.

Two comparisons per sampler. *Step by step*: every step of the plan taken from the same state by
both (diffusers fed our x at each step), which isolates the sampler and the adapter: equal to float32
rounding (1e-5 of the images' scale). *Free running*: both loops from the same x_T. A random network
can be chaotic: with ε-prediction x̂0 = (x − σε)/sqrt(ᾱ) multiplies a change of ε by up to
1/sqrt(ᾱ) ≈ 156 at t = 999, and clipping keeps the images bounded while the differences grow. So the
bound is diffusers' own sensitivity: its loop from x_T and from x_T moved by one float32 ulp (measured:
4e-7 to 3e-2 of the scale, the latter for 50 clipped steps of the 32×32 model), and ours may differ
from its loop by at most 4× that, or 1e-5 (measured: 0.5× to 1.5×)."""

from __future__ import annotations

import json

import pytest
import torch

import diffusion
from diffusion import CheckpointError
from diffusion.guidance import combine
from diffusion.samplers import get_sampler
from tests.diffusers_models import SPECS, Spec, save, unet_dir

diffusers = pytest.importorskip("diffusers")

N = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    return {name: save(spec, root / name) for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def loaded(folders):
    out = {}
    for name, folder in folders.items():
        unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir(folder))).eval()
        sched_dir = folder / "scheduler" if SPECS[name].layout == "pipeline" else folder
        config = diffusers.DDPMScheduler.from_pretrained(str(sched_dir)).config
        out[name] = (diffusion.load(str(folder), "cpu"), unet, config)
    return out


def labels_for(name):
    return torch.tensor([0, 2, 1][:N]) if SPECS[name].classes else None


def x_T(pipe, seed=1):
    return torch.randn(N, *pipe.card.image_shape, generator=torch.Generator().manual_seed(seed))


def conditions(pipe, labels):
    return [pipe.resolve(class_label=int(k)) for k in labels] if labels is not None else [pipe.resolve()] * N


def step_by_step(pipe, unet, ref, labels, scheduler, steps, clip):
    """Max |ours − diffusers'| over the plan, each step taken by both from our current state."""
    runner = pipe.runner(N, steps)
    noise = x_T(pipe)
    handles = runner.add([pipe.row_request(c, k, scheduler, steps, clip=clip, x_T=noise[k])
                          for k, c in enumerate(conditions(pipe, labels))])
    ref.set_timesteps(steps)
    worst = 0.0
    with torch.no_grad():
        for t in ref.timesteps:
            x = runner.table.state.x[:N].clone()
            theirs = ref.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
            runner.step()
            worst = max(worst, float((runner.table.state.x[:N] - theirs).abs().max() / theirs.abs().max()))
    return worst, handles


def free_running(pipe, unet, ref, labels, scheduler, steps, clip):
    """(ours vs diffusers', diffusers' vs itself from x_T one ulp away), relative to the images' scale."""
    def theirs(x):
        ref.set_timesteps(steps)
        with torch.no_grad():
            for t in ref.timesteps:
                x = ref.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
        return x
    x = theirs(x_T(pipe))
    nudged = theirs(torch.nextafter(x_T(pipe), torch.tensor(float("inf"))))
    ours = pipe.generate_rows(conditions(pipe, labels), list(range(N)), scheduler, steps, clip=clip, x_T=x_T(pipe))
    scale = float(x.abs().max())
    return float((ours - x).abs().max()) / scale, float((nudged - x).abs().max()) / scale


def assert_free_running_close(*args):
    diff, sensitivity = free_running(*args)
    assert diff <= max(1e-5, 4 * sensitivity), (diff, sensitivity)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("clip", ["none", "static"])
def test_ddim_equals_diffusers_ddim_scheduler(loaded, name, steps, clip):
    pipe, unet, config = loaded[name]
    ref = diffusers.DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=clip == "static",
                                              set_alpha_to_one=True)
    worst, _ = step_by_step(pipe, unet, ref, labels_for(name), "ddim", steps, clip)
    assert worst < 1e-5, worst
    assert_free_running_close(pipe, unet, ref, labels_for(name), "ddim", steps, clip)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("steps", [10, 50])
def test_dpmpp_2m_equals_diffusers_multistep_solver(loaded, name, steps):
    pipe, unet, config = loaded[name]
    ref = diffusers.DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing", final_sigmas_type="zero",
        lower_order_final=True)
    worst, _ = step_by_step(pipe, unet, ref, labels_for(name), "dpmpp_2m", steps, "none")
    assert worst < 1e-5, worst
    assert_free_running_close(pipe, unet, ref, labels_for(name), "dpmpp_2m", steps, "none")


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("name", list(SPECS))
def test_ddpm_step_has_diffusers_mean_and_variance(tmp_path, loaded, name, variance_type):
    """One ancestral step of a 10-step trailing plan, at every step: the posterior mean and the noise's
    standard deviation equal DDPMScheduler's (its noise recovered from its seeded generator). One
    known difference: diffusers adds noise whenever t > 0, so with fixed_large its last step of a
    trailing plan (t = 99 → the clean end) adds σ² = 1 − ᾱ_99 to the clean sample; ours, like its
    fixed_small and like a full 1000-step plan, ends on the clean sample without noise."""
    spec = SPECS[name]
    folder = save(Spec(**{**spec.__dict__, "variance_type": variance_type}), tmp_path / "m")
    pipe = diffusion.load(str(folder), "cpu")
    unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir(folder))).eval()
    ref = diffusers.DDPMScheduler.from_config(loaded[name][2], variance_type=variance_type,
                                              timestep_spacing="trailing")
    ref.set_timesteps(10)
    labels = labels_for(name)
    table = pipe.runner(N, 10).table
    table.add([pipe.row_request(c, k, "ddpm", 10, x_T=x_T(pipe)[k]) for k, c in enumerate(conditions(pipe, labels))])
    state = table.view(N)
    x = x_T(pipe)
    for k, t in enumerate(ref.timesteps):
        state.i[:] = k
        state.x.copy_(x)
        with torch.no_grad():
            out = unet(x, t, class_labels=labels).sample
        d = combine(out, out, x, torch.full((N,), int(t)), pipe.schedule, pipe.card.prediction, state.w, state.clip,
                    state.pct, dynamic=False)
        ddpm = get_sampler("ddpm")
        mean = ddpm.update(pipe.schedule, state, d, torch.zeros_like(x))["x"]
        std = ddpm.update(pipe.schedule, state, d, torch.ones_like(x))["x"] - mean
        theirs = ref.step(out, t, x, generator=torch.Generator().manual_seed(k)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k))
        their_std = float(ref._get_variance(int(t))) ** 0.5 if int(t) > 0 else 0.0
        if k == len(ref.timesteps) - 1 and variance_type == "fixed_large":
            assert their_std > 0.05 and float(std.abs().max()) == 0.0  # the one difference (docstring)
        else:
            torch.testing.assert_close(std, torch.full_like(std, their_std), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(mean, theirs - their_std * noise, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))
        x = theirs


def test_the_card_says_what_the_configs_say(loaded, folders):
    rgb, cls = loaded["rgb32"][0].card, loaded["rgb64-class-v"][0].card
    assert rgb.image_shape == (3, 32, 32) and rgb.conditioning == "none" and not rgb.guidable
    assert rgb.prediction == "epsilon" and rgb.default_clip == "static" and rgb.source == "diffusers pipeline folder"
    assert rgb.sampler_defaults["ddpm"]["variance"] == "beta_tilde" and rgb.schedule.kind == "linear"
    assert cls.image_shape == (3, 64, 64) and cls.conditioning == "class" and cls.guidable
    assert cls.class_names == ("cat", "dog", "owl") and cls.prediction == "v" and cls.default_clip == "none"
    assert cls.sampler_defaults["ddpm"]["variance"] == "beta" and cls.schedule.kind == "squaredcos_cap_v2"
    assert cls.source == "diffusers model folder"
    n = sum(p.numel() for p in diffusers.UNet2DModel.from_pretrained(str(unet_dir(folders["rgb32"]))).parameters())
    assert rgb.parameters == n
    ref = diffusers.DDPMScheduler.from_config(loaded["rgb64-class-v"][2])
    torch.testing.assert_close(cls.schedule.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=0)


def test_x_T_reproduces_an_image_from_another_tool(loaded):
    pipe = loaded["rgb32"][0]
    noise = x_T(pipe, seed=7)
    a = pipe.generate_tensor(scheduler="dpmpp_2m", steps=5, num_images=N, x_T=noise, seed=1)
    b = pipe.generate_tensor(scheduler="dpmpp_2m", steps=5, num_images=N, x_T=noise, seed=999)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the seed no longer matters for a deterministic sampler
    c = pipe.generate_tensor(scheduler="dpmpp_2m", steps=5, num_images=N, seed=1)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="x_T"):
        pipe.generate_tensor(num_images=2, x_T=noise)


def test_guidance_and_conditions_follow_the_metadata(loaded, tmp_path):
    cls = loaded["rgb64-class-v"][0]
    assert cls.resolve(prompt="Owl").label == 2 and cls.resolve(class_label="dog").label == 1
    guided = cls.generate_tensor(class_label="cat", steps=3, guidance=2.0, seed=0)
    plain = cls.generate_tensor(class_label="cat", steps=3, guidance=0.0, seed=0)
    assert not torch.allclose(guided, plain)
    with pytest.raises(diffusion.ConditionError, match="unconditional"):
        loaded["rgb32"][0].resolve(class_label=1)
    # without a null class: no guidance, and a request must name a class
    spec = SPECS["rgb64-class-v"]
    folder = save(Spec(**{**spec.__dict__, "metadata": {}, "size": 32}), tmp_path / "nonull")
    pipe = diffusion.load(str(folder), "cpu")
    assert pipe.card.class_names == ("0", "1", "2", "3") and not pipe.card.guidable
    with pytest.raises(diffusion.ConditionError, match="null condition"):
        pipe.generate_tensor(class_label=1, steps=2, guidance=1.0)
    with pytest.raises(diffusion.ConditionError, match="name a class"):
        pipe.resolve()
    assert pipe.generate_tensor(class_label=1, steps=2).shape == (1, 3, 32, 32)


def test_sample_prediction_matches_diffusers(tmp_path):
    folder = save(Spec(prediction="sample", layout="flat", attention=False), tmp_path / "x0")
    pipe = diffusion.load(str(folder), "cpu")
    unet = diffusers.UNet2DModel.from_pretrained(str(folder)).eval()
    ref = diffusers.DDIMScheduler.from_config(diffusers.DDPMScheduler.from_pretrained(str(folder)).config,
                                              timestep_spacing="trailing")
    worst, _ = step_by_step(pipe, unet, ref, None, "ddim", 10, "static")
    assert worst < 1e-5


def _broken(tmp_path, name, change):
    folder = save(Spec(attention=False, layout="flat"), tmp_path / name)
    change(folder)
    return folder


def test_bad_folders_are_clear_errors_naming_the_folder_and_file(tmp_path):
    weights = "diffusion_pytorch_model.safetensors"

    def truncate(f):
        data = (f / weights).read_bytes()
        (f / weights).write_bytes(data[: len(data) // 2])

    def edit(name, **changes):
        def change(f):
            cfg = json.loads((f / name).read_text())
            cfg.update(changes)
            (f / name).write_text(json.dumps(cfg))
        return change

    def pickled_only(f):
        sd = diffusers.UNet2DModel.from_pretrained(str(f)).state_dict()
        (f / weights).unlink()
        torch.save(sd, f / "diffusion_pytorch_model.bin")

    cases = {
        "truncated": (truncate, "not a readable safetensors file"),
        "schedule": (edit("scheduler_config.json", beta_schedule="exotic"), "unknown beta_schedule 'exotic'"),
        "notunet": (edit("config.json", _class_name="UNet2DConditionModel"), "not a UNet2DModel"),
        "shape": (edit("config.json", block_out_channels=[16, 48]), "do not match|has shape"),
        "prediction": (edit("scheduler_config.json", prediction_type="flow"), "unknown prediction_type"),
        "meta": (lambda f: (f / "diffusion_serve.json").write_text('{"nul_class": 1}'), "unknown fields"),
    }
    for name, (change, message) in cases.items():
        folder = _broken(tmp_path, name, change)
        with pytest.raises(CheckpointError, match=message) as e:
            diffusion.load(str(folder), "cpu")
        assert str(folder) in str(e.value), name
    # pickled weights load with the weights-only loader, and give the same network
    folder = _broken(tmp_path, "pickled", pickled_only)
    pipe = diffusion.load(str(folder), "cpu")
    assert pipe.provenance["weights"] == "diffusion_pytorch_model.bin"
    # a pickle that is not plain tensors is refused, never unpickled
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo owned'\ntR.")
    with pytest.raises(CheckpointError, match="weights-only loader"):
        diffusion.load(str(folder), "cpu")
