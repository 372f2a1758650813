"""Small random-weight Stable Diffusion-family pipeline folders (SD 1.x, SD 2.x, SDXL) built offline, saved as
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.save_pretrained`` lays them out (nothing from the hub).

What is real: the tokenizer (CLIP's 49408-token BPE vocabulary, rebuilt from the merges file open_clip ships, so prompts
tokenize to the ids the real checkpoints see), the scheduler configs (the values the published checkpoints carry), the
VAE's 8x downsampling and scaling factors, the UNet's conditioning interface (cross-attention width, SD2's linear
projections and per-block heads, SDXL's ``text_time`` added embeddings) and the folder layout. What is not: every width,
depth and weight, so a 2-step generation takes ~0.05 s on a CPU and a folder is written in 0.1-0.2 s (plus ~1.5 s of
first imports). A folder is 12 MB (SD 1/2) or 21 MB (SDXL) in float32, 6.6 / 12 MB with ``fp16_variant``: mostly the
text encoders' 49408-token embeddings (6.3 MB each at width 32) and the tokenizers' vocab.json + merges.txt (1.5 MB)."""

from __future__ import annotations

import functools
import gzip
import inspect
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = ("sd1", "sd2", "sdxl")
DEFAULT_SCHEDULERS = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler", "sdxl": "EulerDiscreteScheduler"}
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}

# Every published SD 1.x / 2.x / XL scheduler_config.json carries these (SD 1.5: PNDM, SD 2.1: DDIM, SDXL base: Euler);
# ``_scheduler`` keeps the ones the chosen class takes.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "steps_offset": 1, "skip_prk_steps": True, "set_alpha_to_one": False, "clip_sample": False,
}
EULER_XL_CONFIG = {"timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
                   "sample_max_value": 1.0}


@dataclass(frozen=True)
class Arch:
    """Widths and depths of one model family member: ``TINY`` for tests, ``BENCH`` for the CPU benchmark."""
    unet_channels: tuple = (32, 64)
    unet_down: tuple = ("DownBlock2D", "CrossAttnDownBlock2D")
    unet_up: tuple = ("CrossAttnUpBlock2D", "UpBlock2D")
    unet_layers: int = 1
    unet_groups: int = 8
    sd1_heads: int = 8  # SD 1.x: one head count for every block (its config's attention_head_dim: 8)
    sd2_heads: tuple = (2, 4)  # SD 2.x / XL: per block (SD 2's attention_head_dim is (5, 10, 20, 20): head counts)
    xl_transformer_layers: tuple = (1, 2)  # SDXL base: (1, 2, 10)
    text_hidden: int = 32  # SDXL: each of its two encoders; the UNet attends to both, concatenated
    text_intermediate: int = 37
    text_layers: int = 2  # SDXL reads the penultimate layer's hidden states: at least 2
    text_heads: int = 4
    vae_channels: tuple = (8, 8, 16, 16)  # four blocks: 8x downsampling, as every SD VAE
    vae_layers: int = 1
    vae_groups: int = 4


TINY = Arch()
BENCH = Arch(unet_channels=(48, 96, 192), unet_down=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             unet_up=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), unet_layers=1, unet_groups=16,
             sd2_heads=(2, 4, 8), xl_transformer_layers=(1, 1, 2), text_hidden=128, text_intermediate=512,
             text_heads=4, vae_channels=(32, 64, 64, 64), vae_layers=1, vae_groups=32)
ARCHS = {"tiny": TINY, "bench": BENCH}


@dataclass(frozen=True)
class SDSpec:
    kind: str = "sd1"  # "sd1" | "sd2" | "sdxl"
    sample_size: int = 8  # latent side (pixels: 8x); the UNet's sample_size, so the pipeline's default height/width
    prediction: str = "epsilon"  # the scheduler's prediction_type: "epsilon" | "v_prediction"
    scheduler: str = ""  # a diffusers scheduler class name; "" -> the kind's published one (DEFAULT_SCHEDULERS)
    force_zeros_for_empty_prompt: bool = True  # SDXL only: a zero (not an encoded "") unconditional embedding
    damp: float = 0.1  # scales the UNet's output layer: a tamer random network (as tests/diffusers_models.py)
    seed: int = 0
    fp16_variant: bool = False  # save float16 weights as *.fp16.safetensors only (variant="fp16")
    arch: str = "tiny"  # a key of ARCHS
    tokenizer_layout: str = "bpe"  # "bpe": vocab.json + merges.txt, as the published SD folders (what transformers 4's
    # CLIPTokenizer reads); "json": what transformers 5's save_pretrained writes (tokenizer.json only, 3.6 MB)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {KINDS}")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction {self.prediction!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r} is not one of {tuple(ARCHS)}")
        if self.tokenizer_layout not in ("bpe", "json"):
            raise ValueError(f"tokenizer_layout {self.tokenizer_layout!r}")
        if not self.scheduler:
            object.__setattr__(self, "scheduler", DEFAULT_SCHEDULERS[self.kind])


SD_SPECS = {
    "sd1": SDSpec(kind="sd1"),
    "sd2": SDSpec(kind="sd2", prediction="v_prediction"),
    "sdxl": SDSpec(kind="sdxl"),
}


def bench_spec(**changes) -> SDSpec:
    """A reduced SD 1.x for the CPU benchmark: 256x256 pixels (32x32 latents), the ``BENCH`` widths; ``changes``
    override SDSpec fields (e.g. ``kind="sd2"``, ``fp16_variant=True``).

    Parameters: UNet 9.35M (the test UNet: 0.99M; channels (48, 96, 192), cross-attention at the 16x16 and 8x8
    levels, 8 heads), VAE 1.25M (decoder 0.77M), text encoder 6.73M (hidden 128, so cross_attention_dim 128: 6.3M of
    it is the 49408-token embedding, which is why it is not 256). Folder: 68 MB in float32, written in ~0.4 s (plus
    ~3 s of first imports); 35 MB with ``fp16_variant``.

    Measured (torch 2.14.1 CPU, diffusers 0.42.1, 2-core machine; ``pipe(prompt, num_inference_steps=25,
    guidance_scale=7.5, output_type="pt")`` after one warm-up call):

                                   OMP_NUM_THREADS=2   OMP_NUM_THREADS=1
    25-step guided generation          1.7-2.0 s           2.8-3.0 s
    one UNet call (batch 2, 32x32)     61-66 ms            102 ms
    VAE decode 32x32 -> 256x256        155-170 ms          300-336 ms
    encode_prompt (with CFG)           ~5 ms               ~6 ms

    (64, 128, 256) channels (16.5M) took 2.5 s / 4.0 s, (32, 64, 128) (4.2M) 1.35 s / 1.9 s."""
    return SDSpec(**{"kind": "sd1", "sample_size": 32, "arch": "bench", **changes})


BENCH_SPEC = bench_spec()


@functools.lru_cache(maxsize=None)
def _clip_vocab() -> tuple[dict, list]:
    """CLIP's vocabulary and merges as open_clip's SimpleTokenizer derives them from bpe_simple_vocab_16e6.txt.gz: the
    256 byte-unicode characters, the same with '</w>', one token per merge, then the two special tokens (49408)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    words = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    return {w: i for i, w in enumerate(words)}, merges


@functools.lru_cache(maxsize=None)
def _bpe_files() -> tuple[bytes, bytes]:
    vocab, merges = _clip_vocab()
    return (json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
            ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))


def _write_bpe(folder: Path) -> tuple[str, str]:
    """vocab.json and merges.txt (with its '#version: 0.2' header line) of CLIP's BPE, as openai/clip-* publish them."""
    vocab, merges = _bpe_files()
    (folder / "vocab.json").write_bytes(vocab)
    (folder / "merges.txt").write_bytes(merges)
    return str(folder / "vocab.json"), str(folder / "merges.txt")


@functools.lru_cache(maxsize=None)
def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer (``transformers.CLIPTokenizer``, model_max_length 77), built offline from open_clip's
    merges file. ``pad_token``: SD 1.x/2.x and SDXL's first tokenizer pad with '<|endoftext|>' (49407), SDXL's second
    (OpenCLIP bigG) with '!' (0). Ids match open_clip's SimpleTokenizer up to the padding, except that with '!' as the
    pad token every '!' in a prompt is split off as that special token (id 0, not '!</w>' 256; "!!" is not merged):
    transformers' handling of special tokens (the published SDXL tokenizer_2, pad_token '!', should do the same).
    Cached per pad token: the instance is shared, don't mutate it."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        vocab_file, merges_file = _write_bpe(Path(d))
        # Positional on purpose: transformers 5 reads them as (vocab, merges), 4 as (vocab_file, merges_file); the
        # keyword vocab_file=/merges_file= is silently ignored by transformers 5 (a 3-token tokenizer).
        return CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=77)


def _scheduler(spec: SDSpec):
    import diffusers

    cls = getattr(diffusers, spec.scheduler)
    config = dict(SCHEDULER_CONFIG, prediction_type=spec.prediction)
    if spec.kind == "sdxl":
        config.update(EULER_XL_CONFIG)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in config.items() if k in accepted})


def _text_encoder(a: Arch, act: str, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=a.text_hidden, intermediate_size=a.text_intermediate,
                            num_hidden_layers=a.text_layers, num_attention_heads=a.text_heads,
                            max_position_embeddings=77, hidden_act=act, projection_dim=a.text_hidden,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1, layer_norm_eps=1e-5)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _unet(spec: SDSpec, a: Arch):
    from diffusers import UNet2DConditionModel

    kw = dict(sample_size=spec.sample_size, in_channels=4, out_channels=4, block_out_channels=a.unet_channels,
              layers_per_block=a.unet_layers, down_block_types=a.unet_down, up_block_types=a.unet_up,
              norm_num_groups=a.unet_groups, cross_attention_dim=a.text_hidden)
    if spec.kind == "sd1":
        kw.update(attention_head_dim=a.sd1_heads)
    else:
        kw.update(attention_head_dim=a.sd2_heads, use_linear_projection=True)
    if spec.kind == "sdxl":
        time_dim = 8
        kw.update(cross_attention_dim=2 * a.text_hidden, transformer_layers_per_block=a.xl_transformer_layers,
                  addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                  projection_class_embeddings_input_dim=6 * time_dim + a.text_hidden)
    unet = UNet2DConditionModel(**kw)
    with torch.no_grad():
        unet.conv_out.weight.mul_(spec.damp)
        unet.conv_out.bias.mul_(spec.damp)
    return unet.eval()


def _vae(spec: SDSpec, a: Arch):
    from diffusers import AutoencoderKL

    n = len(a.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=a.vae_channels,
                         layers_per_block=a.vae_layers, norm_num_groups=a.vae_groups, latent_channels=4,
                         sample_size=spec.sample_size * 2 ** (n - 1), scaling_factor=VAE_SCALING[spec.kind],
                         force_upcast=True).eval()


def build(spec: SDSpec):
    """The spec's pipeline in memory (float32, CPU), random weights fixed by its seed: a ``StableDiffusionPipeline``
    (no safety checker) or a ``StableDiffusionXLPipeline`` (no watermarker)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    a = ARCHS[spec.arch]
    torch.manual_seed(spec.seed)
    unet = _unet(spec, a)
    torch.manual_seed(spec.seed + 1)
    vae = _vae(spec, a)
    torch.manual_seed(spec.seed + 2)
    text_encoder = _text_encoder(a, "gelu" if spec.kind == "sd2" else "quick_gelu", projection=False)
    if spec.kind != "sdxl":
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                       scheduler=_scheduler(spec), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    torch.manual_seed(spec.seed + 3)
    text_encoder_2 = _text_encoder(a, "gelu", projection=True)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer("!"), unet=unet,
                                     scheduler=_scheduler(spec),
                                     force_zeros_for_empty_prompt=spec.force_zeros_for_empty_prompt,
                                     add_watermarker=False)


def save(spec: SDSpec, folder: Path) -> Path:
    """Write the spec's pipeline folder (safetensors; float16 ``*.fp16.safetensors`` only when ``fp16_variant``)."""
    pipe = build(spec)
    folder = Path(folder)
    if spec.fp16_variant:
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.half()  # not pipe.to(torch.float16): diffusers 0.42 warns on every ModelMixin.to(dtype)
        pipe.save_pretrained(str(folder), safe_serialization=True, variant="fp16")
    else:
        pipe.save_pretrained(str(folder), safe_serialization=True)
    if spec.tokenizer_layout == "bpe":
        for name in ("tokenizer", "tokenizer_2"):
            if (folder / name).is_dir():
                (folder / name / "tokenizer.json").unlink(missing_ok=True)
                _write_bpe(folder / name)
                config = folder / name / "tokenizer_config.json"
                config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                              if k != "backend"}, indent=2))
    return folder


def load_reference(folder: Path, kind: str | None = None, **kwargs):
    """Load a saved folder back with diffusers itself, offline (kind: from model_index.json when not given); kwargs
    go to ``from_pretrained`` (e.g. ``variant="fp16", dtype=torch.float16``: diffusers 0.42 deprecates torch_dtype;
    an fp16-only folder does not load without ``variant="fp16"``)."""
    import diffusers

    folder = Path(folder)
    if kind is None:
        name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    else:
        name = PIPELINES[kind]
    if name == "StableDiffusionXLPipeline":
        kwargs.setdefault("add_watermarker", False)
    return getattr(diffusers, name).from_pretrained(str(folder), local_files_only=True, **kwargs)


def latents(spec: SDSpec, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Initial noise for ``pipe(..., latents=...)``: (batch, 4, sample_size, sample_size), float32, CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 4, spec.sample_size, spec.sample_size), generator=g)
