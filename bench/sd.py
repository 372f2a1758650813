"""The Stable Diffusion case: a latent text-to-image model, served by this service and by what a user would
write instead, side by side in one run (as :mod:`bench.cifar`, whose servers and measurements it reuses).
Not a test: it prints (and with --json writes) numbers.

    python -m bench.sd --device cpu --json bench/results/sd-cpu.json   # reduced SD, 256 px (about 20 minutes, idle)
    python -m bench.sd --device cuda --gpu-servers                     # SD 1.5's architecture at 512 px
    python -m bench.sd --device cpu --mini                             # the CI's smoke run (seconds)

Every request is one image, DPM-Solver++(2M) with 25 steps, guidance scale 7.5 (w = 6.5), its own seed and
one of four prompts, every third with a negative prompt; the same requests go to every server. Three
servers answer over HTTP: this service (``python -m service``, default settings, ``"scheduler":
"dpmpp_2m"``), and diffusers' ``StableDiffusionPipeline`` with ``DPMSolverMultistepScheduler`` behind a
hand-written FastAPI app (:mod:`bench.sd_app`), its requests concurrent in the thread pool or one at a
time behind a lock; on a GPU (``--gpu-servers``): the service compiled with CUDA graphs, the app eager and
with a compiled UNet, bf16 throughout. Measured in turn at each point, round-robin: one request at a
time (p50), waves of 8 and 32 concurrent requests (images/s, p50), each wave repeated ``--rounds``
times (the median round is reported); ratios are against the best diffusers variant at each point.
``--service-variant VAR=VALUE,...`` adds a service with other settings beside them (:mod:`bench.cifar`).
Each row records the 1-minute load average: on a shared 2-core machine another process's work shows there.

The model (``--model``; random weights: speed does not depend on them, the architecture is real):

- ``bench`` (the CPU's default): ``tests/sd_models.BENCH_SPEC``, a reduced SD 1.x at 256×256 px
  (32×32 latents): a 9.35M-parameter UNet, a CLIP text encoder of width 128, a small VAE, the real
  CLIP tokenizer.
- ``sd15`` (a GPU's default): SD 1.5's architecture, the configs of runwayml/stable-diffusion-v1-5
  written out below (UNet 859.5M, VAE 83.7M, CLIP ViT-L/14 text encoder 123.1M), 512×512 px.
- ``mini`` (``--mini``): the same builder at toy widths, 64×64 px, 3 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench import cifar

# runwayml/stable-diffusion-v1-5: unet/config.json, vae/config.json, text_encoder/config.json (the values
# that shape the networks), and scheduler/scheduler_config.json (PNDM, as published)
SD15 = {
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
                 center_input_sample=False, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
                 mid_block_scale_factor=1),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu", sample_size=512,
                scaling_factor=0.18215),
    "text": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1),
}
MINI = {
    "unet": dict(SD15["unet"], sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8),
    "vae": dict(SD15["vae"], block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                sample_size=64),
    "text": dict(SD15["text"], hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32),
}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
NAMES = {"bench": "sd-bench", "sd15": "sd15-random", "mini": "sd-mini"}
PROMPTS = ("a lighthouse on a cliff at dusk, oil painting", "a red fox in fresh snow, photograph",
           "an astronaut riding a horse on the moon", "a bowl of ramen on a wooden table, studio light")
NEGATIVE = "blurry, low quality, watermark"
GUIDANCE_SCALE = 7.5


def build(arch: dict, device: str):
    """A ``StableDiffusionPipeline`` of ``arch``'s networks with random weights, made on ``device`` (fast
    for SD 1.5's billion parameters on a GPU) in bf16 there, float32 on the CPU; the real CLIP tokenizer."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.sd_models import clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet, vae = UNet2DConditionModel(**arch["unet"]), AutoencoderKL(**arch["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch["text"]))
    with torch.no_grad():  # a tamer random network: its output layer scaled down (as tests/sd_models.py)
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    if device.startswith("cuda"):
        for module in (unet, vae, text_encoder):
            module.bfloat16()  # not .to(dtype): diffusers 0.42 warns on every ModelMixin.to(dtype)
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(),
                                   unet=unet.eval(), scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def make_folder(work: Path, model: str, device: str) -> Path:
    """The model as a diffusers pipeline folder in ``work/sd-models`` (the service's directory: nothing else
    is in it)."""
    folder = work / "sd-models" / NAMES[model]
    if not folder.exists():
        if model == "bench":
            from tests.sd_models import BENCH_SPEC, save
            save(BENCH_SPEC, folder)
        else:
            build(SD15 if model == "sd15" else MINI, device).save_pretrained(str(folder), safe_serialization=True)
    return folder


def parameters(folder: Path) -> dict[str, int]:
    """Parameters of each network of a pipeline folder, from its safetensors headers."""
    from safetensors import safe_open

    out = {}
    for part in ("unet", "vae", "text_encoder"):
        n = 0
        for f in sorted((folder / part).glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                n += sum(torch.Size(st.get_slice(k).get_shape()).numel() for k in st.keys())
        out[part] = n
    return out


def body(kind: str, seed: int, steps: int, size: int, name: str) -> dict:
    """The request of ``seed``, the same to every server (the service also names its model and sampler)."""
    b = {"prompt": PROMPTS[seed % len(PROMPTS)], "guidance_scale": GUIDANCE_SCALE, "steps": steps, "seed": seed,
         "width": size, "height": size, "num_images": 1}
    if seed % 3 == 0:
        b["negative_prompt"] = NEGATIVE
    return b | ({"model": name, "scheduler": "dpmpp_2m"} if kind == "service" else {})


def run(device: str, work: Path, mini: bool = False, steps: int | None = None, waves: list[int] | None = None,
        sequential: int = 3, servers=cifar.CPU_SERVERS, log_dir: Path | None = None, rounds: int = 1,
        model: str | None = None) -> dict:
    """Every server of ``servers`` ((label, kind, args) each) in turn, on the same model and requests. On a
    GPU the servers start all at once, so that their compilations overlap."""
    model = model or ("mini" if mini else "sd15" if device.startswith("cuda") else "bench")
    steps = steps or (3 if mini else 25)
    waves = waves or ([2] if mini else [8, 32])
    folder, source = make_folder(work, model, device), cifar.source_state()  # what the servers load now
    unet = json.loads((folder / "unet" / "config.json").read_text())
    size = unet["sample_size"] * 8
    with cifar.serving(servers, folder, device, max(waves), log_dir or work, "sd", app="bench.sd_app",
                       together=device.startswith("cuda")) as (urls, ready):
        rows = cifar.measure(urls, lambda kind, seed: body(kind, seed, steps, size, folder.name), sequential, waves,
                             rounds)
    return {"device": device, "model": model, "steps": steps, "guidance_scale": GUIDANCE_SCALE, "size": size,
            "parameters": parameters(folder), "ready_s": ready, "rows": rows, "ratios": cifar.ratios(rows),
            "torch": torch.__version__, "source": source}


def table(result: dict) -> str:
    p = result["parameters"]
    return "\n".join([f"DPM-Solver++(2M) {result['steps']} steps, guidance scale {result['guidance_scale']}, "
                      f"model {result['model']} ({result['size']}×{result['size']} px; UNet {p['unet'] / 1e6:.2f}M, "
                      f"VAE {p['vae'] / 1e6:.2f}M, text encoder {p['text_encoder'] / 1e6:.2f}M parameters), "
                      f"device {result['device']}, start-up to ready: "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in result["ready_s"].items()), "", *cifar.tables(result)])


def main(argv=None) -> None:
    cifar.command_line(argv, __doc__, run, table, "sd", rounds=3,
                       model=(None, "bench | sd15 | mini (default: mini with --mini, sd15 on a GPU, else bench)"))


if __name__ == "__main__":
    main()
