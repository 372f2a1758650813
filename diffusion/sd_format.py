"""Stable Diffusion–family pipeline folders (diffusers' ``save_pretrained`` layout) read into a
:class:`~diffusion.models.latent.LatentDiffusion` and its card.

A folder is served when its ``model_index.json`` names ``StableDiffusionPipeline`` (SD 1.x, SD 2.x,
sd-turbo) or ``StableDiffusionXLPipeline`` (SDXL, SDXL-turbo), or their image-to-image twins (the
same components), with:

- ``unet/``: a ``UNet2DConditionModel`` whose input is the VAE's latent (4 channels);
- ``vae/``: an ``AutoencoderKL`` (its ``scaling_factor``, and ``latents_mean``/``latents_std`` where
  given; the latent scale 2^(levels − 1), 8 for every published model);
- ``text_encoder/`` + ``tokenizer/``: transformers' ``CLIPTextModel`` and ``CLIPTokenizer``; SDXL also
  ``text_encoder_2/`` (``CLIPTextModelWithProjection``) + ``tokenizer_2/``;
- ``scheduler/scheduler_config.json``: the training schedule (as for pixel folders,
  :func:`diffusion.diffusers_format.schedule_from_config`) and ``prediction_type`` (ε or v). The
  scheduler class itself is not taken over: a request chooses its sampler, the folder's metadata or
  DPM-Solver++(2M) by default.

Weights are read from safetensors only, ``*.safetensors`` or, where those are the only weights, the
``*.fp16.safetensors`` variant (and sharded ones through their index); a folder with pickled
``*.bin`` weights alone is refused. On a GPU the weights are kept in bfloat16 (fp16 files are cast to
it: its range is float32's, so the SDXL VAE needs no float32 upcast), never float32; on the CPU in
float32. ``force_zeros_for_empty_prompt`` (SDXL) comes from ``model_index.json``. A ``safety_checker``
or ``feature_extractor`` component is not loaded and not run (the log says so).

Defaults (``diffusion_serve.json`` beside ``model_index.json`` may set each): DPM-Solver++(2M),
25 steps, guidance scale 7.5 (w = 6.5 in this project's convention: ``default_guidance_scale`` or
``default_guidance``), the native size from the UNet's ``sample_size``.

What is not served is an :class:`~diffusion.checkpoint.UnsupportedModel` naming the class: another
pipeline (ControlNet, Flux, SD3, Kandinsky, an SDXL refiner with aesthetic-score conditioning), a
UNet whose input is not the latent (a 9-channel inpainting UNet), other text encoders. A truncated
or mismatched file is a :class:`~diffusion.checkpoint.CheckpointError` naming it.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

import torch

from diffusion.checkpoint import CheckpointError, UnsupportedModel
from diffusion.diffusers_format import INSTALL, PREDICTIONS, load_module, read_json, read_safetensors, schedule_from_config
from diffusion.models.card import ModelCard

log = logging.getLogger("diffusion.sd_format")

PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd",
             "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl"}
COMPONENTS = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
              "text_encoder_2": ("CLIPTextModelWithProjection",), "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
              "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast")}
NOT_RUN = ("safety_checker", "feature_extractor", "image_encoder")  # loaded by nobody here
METADATA = "diffusion_serve.json"
METADATA_FIELDS = {"default_steps", "default_guidance", "default_guidance_scale", "default_scheduler"}
DEFAULTS = {"default_steps": 25, "default_guidance": 6.5, "default_scheduler": "dpmpp_2m"}


def is_latent_folder(path: Path) -> bool:
    """A diffusers pipeline folder of a latent model (its index names a VAE or a transformer)."""
    index = path / "model_index.json"
    if not index.is_file():
        return False
    try:
        data = read_json(index, "the pipeline index")
    except CheckpointError:
        return False
    return any(data.get(k) for k in ("vae", "vqvae", "transformer"))


def _index(folder: Path) -> tuple[dict, str]:
    index = read_json(folder / "model_index.json", "the pipeline index")
    cls = index.get("_class_name", "?")
    if cls not in PIPELINES:
        raise UnsupportedModel(f"{folder}: a {cls} is not served (served: {', '.join(PIPELINES)})")
    family = PIPELINES[cls]
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] + (["text_encoder_2", "tokenizer_2"]
                                                                           if family == "sdxl" else [])
    for name in needed:
        entry = index.get(name)
        if not entry or entry[0] is None:
            raise UnsupportedModel(f"{folder / 'model_index.json'}: {cls} without {name} is not served"
                                   + (" (an SDXL refiner)" if family == "sdxl" and name == "text_encoder" else ""))
        if name in COMPONENTS and entry[1] not in COMPONENTS[name]:
            raise UnsupportedModel(f"{folder / 'model_index.json'}: {name} is a {entry[1]}; served: "
                                   f"{', '.join(COMPONENTS[name])}")
    extra = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None
                   and k not in needed and k not in NOT_RUN)
    if extra:
        raise UnsupportedModel(f"{folder / 'model_index.json'}: {cls} with {', '.join(extra)} is not served")
    if index.get("requires_aesthetics_score"):
        raise UnsupportedModel(f"{folder / 'model_index.json'}: aesthetic-score conditioning (an SDXL refiner) is "
                               "not served")
    return index, family


def _dtype(device: torch.device, override: torch.dtype | None) -> torch.dtype:
    if override is not None:
        return override
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _text_encoder(folder: Path, cls, dtype: torch.dtype):
    """A transformers text tower from its folder: safetensors only, every tensor accounted for."""
    names = ("model.safetensors", "model.safetensors.index.json", "model.fp16.safetensors",
             "model.fp16.safetensors.index.json")
    present = [n for n in names if (folder / n).is_file()]
    if not present:
        raise CheckpointError(f"{folder}: no model.safetensors weights file (only safetensors weights are served)")
    variant = "fp16" if ".fp16." in present[0] else None
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a service's log is no terminal
    if present[0].endswith(".safetensors"):
        read_safetensors(folder / present[0])  # a truncated file is named here, before transformers reads it
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, variant=variant,
                                          output_loading_info=True)
    except Exception as e:
        raise CheckpointError(f"{folder / present[0]}: not a loadable {cls.__name__}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    bad = {k: sorted(v)[:5] for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise CheckpointError(f"{folder / present[0]}: weights do not match {folder / 'config.json'}: "
                              f"{bad or info.get('error_msgs')}")
    return model.to(dtype).eval().requires_grad_(False)


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{folder}: not a readable CLIPTokenizer: {type(e).__name__}: {e}") from e


def _metadata(folder: Path) -> dict:
    path = folder / METADATA
    meta = read_json(path, "this service's model metadata") if path.is_file() else {}
    unknown = set(meta) - METADATA_FIELDS
    if unknown:
        raise CheckpointError(f"{path}: unknown fields {sorted(unknown)}; known: {sorted(METADATA_FIELDS)}")
    if "default_guidance" in meta and "default_guidance_scale" in meta:
        raise CheckpointError(f"{path}: give default_guidance (w) or default_guidance_scale (s = w + 1), not both")
    out = {**DEFAULTS, **{k: v for k, v in meta.items() if k != "default_guidance_scale"}}
    if "default_guidance_scale" in meta:
        out["default_guidance"] = float(meta["default_guidance_scale"]) - 1
    if not out["default_guidance"] >= 0:
        raise CheckpointError(f"{path}: the default guidance scale must be at least 1 (w = s − 1 ≥ 0)")
    return out


def load_folder(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """(model, provenance) of a Stable Diffusion–family pipeline folder (module docstring)."""
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise CheckpointError(f"{folder}: a Stable Diffusion folder needs diffusers and transformers: {INSTALL}") from e
    from diffusion.models.latent import LatentDiffusion

    folder = Path(folder)
    index, family = _index(folder)
    for name in NOT_RUN:
        if index.get(name) and index[name][0] is not None:
            log.info("%s: its %s component is not loaded and not run", folder, name)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched_cfg = read_json(sched_path, "the scheduler config")
    unet_cfg = read_json(folder / "unet" / "config.json", "the UNet2DConditionModel config")
    vae_cfg = read_json(folder / "vae" / "config.json", "the AutoencoderKL config")
    _check_unet(folder, index, family, unet_cfg, vae_cfg)
    unet, vae, towers, unet_file = _components(folder, family, unet_cfg, vae_cfg, _dtype(torch.device(device), dtype))
    card = _card(folder, index, family, sched_path, sched_cfg, unet_cfg, vae_cfg, unet, vae, towers)
    model = LatentDiffusion(unet.eval().requires_grad_(False), vae.eval().requires_grad_(False), towers, card,
                            scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
                            latents_mean=vae_cfg.get("latents_mean"), latents_std=vae_cfg.get("latents_std"),
                            time_ids=family == "sdxl").to(device)
    rms = model.fit_preview()
    log.info("%s: preview map fitted to the VAE's decoder (RMS error %.3f in [-1, 1])", folder, rms)
    provenance = {"format": "diffusers pipeline folder", "pipeline": index.get("_class_name"), "path": str(folder),
                  "diffusers_version": index.get("_diffusers_version"), "weights": f"unet/{unet_file.name}",
                  "scheduler": sched_cfg.get("_class_name"), "dtype": str(model.dtype).replace("torch.", ""),
                  "date": _dt.datetime.fromtimestamp(unet_file.stat().st_mtime, _dt.timezone.utc)
                  .isoformat(timespec="seconds")}
    return model, provenance


def _check_unet(folder: Path, index: dict, family: str, unet_cfg: dict, vae_cfg: dict) -> None:
    """UnsupportedModel for a UNet this adapter does not drive."""
    latent = int(vae_cfg.get("latent_channels", 4))
    if unet_cfg.get("in_channels") != latent or unet_cfg.get("out_channels", latent) != latent:
        raise UnsupportedModel(f"{folder / 'unet' / 'config.json'}: a UNet of {unet_cfg.get('in_channels')} input "
                               f"channels for {latent} latent channels (an inpainting UNet?) is not served")
    for key in ("time_cond_proj_dim", "class_embed_type", "encoder_hid_dim_type"):
        if unet_cfg.get(key) is not None:
            raise UnsupportedModel(f"{folder / 'unet' / 'config.json'}: {key} {unet_cfg[key]!r} is not served")
    if (unet_cfg.get("addition_embed_type") == "text_time") != (family == "sdxl"):
        raise UnsupportedModel(f"{folder / 'unet' / 'config.json'}: addition_embed_type "
                               f"{unet_cfg.get('addition_embed_type')!r} in a {index['_class_name']}")


def _components(folder: Path, family: str, unet_cfg: dict, vae_cfg: dict, dt: torch.dtype):
    """(unet, vae, text towers, the UNet's weights file), every tensor checked against its config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffusion.models.latent import TextTower

    sdxl = family == "sdxl"
    unet, unet_file = load_module(folder / "unet", UNet2DConditionModel, unet_cfg, pickled_ok=False, dtype=dt)
    vae, _ = load_module(folder / "vae", AutoencoderKL, vae_cfg, pickled_ok=False, dtype=dt)
    towers = [TextTower(_tokenizer(folder / "tokenizer"), _text_encoder(folder / "text_encoder", CLIPTextModel, dt),
                        penultimate=sdxl, pooled=False)]
    if sdxl:
        towers.append(TextTower(_tokenizer(folder / "tokenizer_2"),
                                _text_encoder(folder / "text_encoder_2", CLIPTextModelWithProjection, dt),
                                penultimate=True, pooled=True))
    width = sum(int(t.encoder.config.hidden_size) for t in towers)
    if int(unet_cfg.get("cross_attention_dim") or 0) != width:
        raise CheckpointError(f"{folder / 'unet' / 'config.json'}: cross_attention_dim "
                              f"{unet_cfg.get('cross_attention_dim')} for text encoders of width {width}")
    if len({t.length for t in towers}) != 1:
        raise CheckpointError(f"{folder}: the tokenizers pad to different lengths {[t.length for t in towers]}")
    return unet, vae, towers, unet_file


def _card(folder: Path, index: dict, family: str, sched_path: Path, sched_cfg: dict, unet_cfg: dict, vae_cfg: dict,
          unet, vae, towers) -> ModelCard:
    schedule = schedule_from_config(sched_cfg, sched_path)
    prediction = PREDICTIONS.get(sched_cfg.get("prediction_type", "epsilon"))
    if prediction not in ("epsilon", "v"):
        raise UnsupportedModel(f"{sched_path}: prediction_type {sched_cfg.get('prediction_type')!r}; ε and v are served")
    scale = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    size = unet_cfg.get("sample_size") or 64
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    meta = _metadata(folder)
    width = sum(int(t.encoder.config.hidden_size) for t in towers)
    pooled = sum(int(t.encoder.config.projection_dim) for t in towers if t.pooled)
    zeros = family == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True))
    try:
        return ModelCard(
            image_shape=(3, h * scale, w * scale), sample_shape=(int(vae_cfg.get("latent_channels", 4)), h, w),
            scale=scale, resizable=True, schedule=schedule, prediction=prediction, text_conditional=True,
            cond_dim=towers[0].length * width + pooled, guidable=True, max_prompt_tokens=towers[0].length - 2,
            default_steps=int(meta["default_steps"]), default_guidance=float(meta["default_guidance"]),
            default_scheduler=str(meta["default_scheduler"]),
            parameters=sum(p.numel() for m in (unet, vae, *(t.encoder for t in towers)) for p in m.parameters()),
            architecture=("SDXL" if family == "sdxl" else "Stable Diffusion") + " (UNet2DConditionModel, AutoencoderKL)",
            source="diffusers pipeline folder", null_prompt="zeros" if zeros else "",
            text_encoders=tuple(f"{type(t.encoder).__name__} ({t.encoder.config.num_hidden_layers} layers, width "
                                f"{t.encoder.config.hidden_size})" for t in towers))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: {e}") from e
