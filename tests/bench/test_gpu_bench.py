"""bench/gpu.sh in miniature on the CPU (tiny model, a few steps): every phase runs and reports, so
the prepared GPU benchmark does not rot between the sessions that are lent a GPU. Speed is not
checked (benchmarks are not tests); that the comparison is like for like is."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import reference as ref

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_script_in_miniature(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), DEVICE="cpu", MINI="1", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               BENCH_TIMEOUT="600")
    proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert not report["notes"], report["notes"]
    phases = {r["phase"] for r in report["results"]}
    assert phases == {"engine", "reference", "service", "cifar", "sd", "goodput", "train"}
    bursts = [r for r in report["results"] if r["phase"] == "goodput"]
    assert {r["policy"] for r in bursts} == {"rows", "fifo", "goodput"}
    assert all(r["answered"] + r["refused"] + r["timed_out"] + r["other"] == r["n"] for r in bursts)
    for case in ("cifar", "sd"):
        rows = [r for r in report["results"] if r["phase"] == case]
        assert {r["server"] for r in rows if "server" in r} == {"service", "diffusers-threads"}
        assert all(r["throughput_ratio"] > 0 for r in rows if "throughput_ratio" in r)
        assert {r["concurrent"] for r in rows if "images_per_s" in r} == {1, 2}
    service = {r["what"].split(" (")[0]: r for r in report["results"] if r["phase"] == "service"}
    assert service["one request, idle"]["p50_s"] > 0 and "ratio_p99_to_idle" in next(
        r for r in report["results"] if r.get("what", "").startswith("mixed"))
    md = (out / "results.md").read_text()
    assert "## engine" in md and "## reference" in md and "## cifar" in md and "## sd" in md and "## goodput" in md and "## train" in md


def test_the_graphed_diffusers_loop_is_the_same_ddim_as_the_scheduler():
    """The 'best a diffusers user can do' loop must compute what DDIMScheduler computes."""
    from diffusion import make_schedule
    from tests.diffusion.gaussian import gaussian_eps_model

    torch.manual_seed(0)
    sched = make_schedule("linear")
    oracle = gaussian_eps_model(sched, 0.3, 0.5)

    def eps2(x, t, cond):  # the exact ε of Gaussian data; cond nudges the unconditional half
        return oracle(x, t) + cond.view(-1, 1, 1, 1).to(x.dtype)

    x_T = torch.randn(3, 1, 4, 4)
    cond = torch.tensor([0.0, 0.0, 0.0, 0.01, 0.01, 0.01])
    eager = ref.ddim_eager(eps2, sched.betas, x_T, cond, 2.0, 20)
    graphed = ref.GraphedDDIM(eps2, sched.alphas_cumprod, x_T, cond, 2.0, 20)
    graphed.capture()  # a no-op on the CPU
    torch.testing.assert_close(graphed(x_T), eager, rtol=1e-4, atol=1e-4)


def test_the_diffusers_unet_is_the_same_size_as_ours():
    import diffusion
    for size, tol in (("small", 0.1), ("large", 0.1)):
        ours = diffusion.count_parameters(diffusion.DiffusionModel(diffusion.model_config(
            size, (1, 28, 28), num_classes=10, class_names=tuple("abcdefghij"))))
        theirs = sum(p.numel() for p in ref.unet2d(size).parameters())
        assert abs(theirs / ours - 1) < tol, (size, ours, theirs)


def test_the_cifar_case_has_the_published_models_architecture():
    """google/ddpm-cifar10-32: 35.7M parameters (its UNet2DModel, built here on the meta device)."""
    from diffusers import UNet2DModel

    from bench import cifar
    with torch.device("meta"):
        unet = UNet2DModel(**cifar.ARCH)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 35.7


def test_the_sd_case_has_sd15s_architecture():
    """runwayml/stable-diffusion-v1-5: UNet 859.52M, VAE 83.65M, CLIP ViT-L/14 text encoder 123.06M parameters
    (built here on the meta device), and its published scheduler config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench import sd
    with torch.device("meta"):
        nets = {"unet": UNet2DConditionModel(**sd.SD15["unet"]), "vae": AutoencoderKL(**sd.SD15["vae"]),
                "text": CLIPTextModel(CLIPTextConfig(**sd.SD15["text"]))}
    millions = {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for k, m in nets.items()}
    assert millions == {"unet": 859.52, "vae": 83.65, "text": 123.06}
    assert sd.SCHEDULER["beta_schedule"] == "scaled_linear" and sd.SCHEDULER["steps_offset"] == 1


def test_the_sd_servers_get_the_same_request():
    """The service and the diffusers app are asked for the same image: only the model and sampler names differ."""
    from bench import sd

    for seed in range(6):
        ours, theirs = sd.body("service", seed, 25, 256, "m"), sd.body("diffusers", seed, 25, 256, "m")
        assert {k: v for k, v in ours.items() if k not in ("model", "scheduler")} == theirs
        assert ours["scheduler"] == "dpmpp_2m" and theirs["guidance_scale"] == 7.5
    assert sum("negative_prompt" in sd.body("diffusers", seed, 25, 256, "m") for seed in range(6)) == 2
