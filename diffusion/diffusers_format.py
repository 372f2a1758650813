"""Pixel-space DDPMs in diffusers' format: a folder read into a :class:`DiffusersUNet` and its card.

Two layouts are recognised:

- a **pipeline folder** (``DDPMPipeline.save_pretrained``, google/ddpm-celebahq-256 and the like):
  ``model_index.json``, ``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors``,
  ``scheduler/scheduler_config.json``;
- a **model folder** (the older google/ddpm-* layout): ``config.json`` of a ``UNet2DModel``,
  ``diffusion_pytorch_model.safetensors`` and ``scheduler_config.json`` beside it.

From the scheduler config: the β-schedule (``num_train_timesteps``; ``beta_schedule`` ``linear``,
``scaled_linear``, ``squaredcos_cap_v2`` or ``sigmoid`` with ``beta_start``/``beta_end``, or
``trained_betas``), computed in float32 as diffusers computes it (the schedule the network was
trained with); ``prediction_type`` (``epsilon``, ``v_prediction``, ``sample``); ``clip_sample``
(+ ``clip_sample_range``) as the model's default clipping, and ``thresholding`` as dynamic
thresholding; ``variance_type`` ``fixed_small`` / ``fixed_large`` (and their ``_log`` forms) as the
DDPM sampler's default variance (σ² = β̃ / β). As diffusers' ``DDIMScheduler`` does, DDIM steps with
the clipped x̂0 and the network's ε (``use_clipped_model_output=False``): the ``ddim`` sampler's
``model_eps`` option defaults to on for these models. Timestep spacing and ``steps_offset`` are
not taken over: a request chooses its spacing (trailing by default).

An optional ``diffusion_serve.json`` beside the model (in the pipeline folder's root, or in the
model folder) adds what diffusers' configs do not say; every field is optional::

    {"class_names": ["airplane", "automobile", ...],   # class-conditional models: one per class index
     "null_class": 10,                                 # the class index trained as "no class" (guidance)
     "default_steps": 50, "default_guidance": 0.0,     # a request's defaults
     "default_clip": "static"}                         # overrides clip_sample / thresholding

Without ``null_class`` a class-conditional model cannot be guided: a request with guidance > 0 is
refused (:meth:`diffusion.Pipeline.check_guidance`), and a request must name a class. Class names
default to "0", "1", … (the null class excluded when it is the last index).

Weights are read from safetensors (sharded ones through their ``.index.json`` too); a folder with only
the pickled ``diffusion_pytorch_model.bin`` is read with PyTorch's weights-only loader, which
refuses anything but tensors (never plain unpickling). A truncated file, a missing or unexpected
tensor, a wrong shape, an unknown schedule or a config that is not a ``UNet2DModel`` is a
:class:`CheckpointError` naming the folder and file.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

import torch

from diffusion.checkpoint import CheckpointError, UnsupportedModel
from diffusion.guidance import CLIP_MODES
from diffusion.models.card import ModelCard
from diffusion.schedules import Schedule

METADATA = "diffusion_serve.json"
WEIGHTS = "diffusion_pytorch_model"
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}
VARIANCES = {"fixed_small": "beta_tilde", "fixed_small_log": "beta_tilde", "fixed_large": "beta",
             "fixed_large_log": "beta", "learned": "beta_tilde", "learned_range": "beta_tilde"}
CLIPPING_DEFAULT = {"DDPMScheduler": True, "DDIMScheduler": True}  # diffusers' clip_sample default, by class
METADATA_FIELDS = {"class_names", "null_class", "default_steps", "default_guidance", "default_clip"}
INSTALL = "pip install 'diffusion-serve[diffusers]'"


def is_model_folder(path: Path) -> bool:
    """A folder laid out as a diffusers pipeline or model (the files it must be read by)."""
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "config.json").is_file())


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({what}): {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({what})")
    return data


# --- schedules ----------------------------------------------------------------------------------
def _cosine_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' ``squaredcos_cap_v2`` (GLIDE / improved DDPM): 1 − f((i+1)/T)/f(i/T), capped."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float32)


def schedule_from_config(cfg: dict, where: Path) -> Schedule:
    """The β-schedule a diffusers scheduler config describes, as diffusers builds it (float32)."""
    T = cfg.get("num_train_timesteps", 1000)
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    if not isinstance(T, int) or T < 2:
        raise CheckpointError(f"{where}: num_train_timesteps must be an integer >= 2, got {T!r}")
    if cfg.get("rescale_betas_zero_snr"):
        raise CheckpointError(f"{where}: rescale_betas_zero_snr is not supported (a zero terminal SNR leaves "
                              "x̂0 undefined at the first step of this project's samplers)")
    if cfg.get("trained_betas") is not None:
        betas, kind = torch.tensor(cfg["trained_betas"], dtype=torch.float32), "trained_betas"
        if betas.ndim != 1 or len(betas) != T:
            raise CheckpointError(f"{where}: trained_betas must list num_train_timesteps = {T} values")
    elif kind == "linear":
        betas = torch.linspace(start, end, T, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = _cosine_betas(T)
    elif kind == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (end - start) + start
    else:
        raise CheckpointError(f"{where}: unknown beta_schedule {kind!r}; this service reads linear, scaled_linear, "
                              "squaredcos_cap_v2, sigmoid or trained_betas")
    try:
        return Schedule.from_betas(kind, betas, dtype=torch.float32)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


# --- weights ------------------------------------------------------------------------------------
def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def read_weights(folder: Path, stem: str = WEIGHTS, pickled_ok: bool = True) -> tuple[dict[str, torch.Tensor], Path]:
    """The network's tensors and the file they came from (safetensors first, its fp16 variant when it is
    the only one; module docstring). ``pickled_ok=False``: safetensors only."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return read_safetensors(folder / name), folder / name
    for name in (f"{stem}.safetensors.index.json", f"{stem}.fp16.safetensors.index.json"):
        index = folder / name
        if index.is_file():
            shards = sorted(set(read_json(index, "sharded weights").get("weight_map", {}).values()))
            if not shards:
                raise CheckpointError(f"{index}: no weight_map")
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(read_safetensors(folder / shard))
            return tensors, index
    pickled = folder / f"{stem}.bin"
    if pickled.is_file() and not pickled_ok:
        raise CheckpointError(f"{pickled}: only safetensors weights are served for this model (never unpickled); "
                              "convert it, e.g. with diffusers' save_pretrained(folder, safe_serialization=True) "
                              "in a trusted environment")
    if pickled.is_file():
        try:
            sd = torch.load(str(pickled), map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise CheckpointError(f"{pickled}: not loadable with PyTorch's weights-only loader ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); convert it to safetensors, e.g. "
                                  "UNet2DModel.from_pretrained(folder).save_pretrained(folder, "
                                  "safe_serialization=True) in a trusted environment") from e
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{pickled}: expected a state dict of tensors")
        return sd, pickled
    raise CheckpointError(f"{folder}: no {stem}.safetensors{'' if not pickled_ok else ' (nor .bin)'} weights file")


_DEPRECATED_ATTENTION = ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                         (".proj_attn.", ".to_out.0."))


def _renamed(key: str, expected: dict) -> str:
    """Attention weights saved under diffusers' old names (query, key, value, proj_attn: the older
    google/ddpm-* files) under their current ones."""
    if key in expected:
        return key
    for old, new in _DEPRECATED_ATTENTION:
        if old in key and key.replace(old, new) in expected:
            return key.replace(old, new)
    return key


def load_module(folder: Path, cls, cfg: dict, pickled_ok: bool = True, dtype: torch.dtype = torch.float32):
    """A diffusers network of class ``cls`` with config ``cfg`` and the weights in ``folder``, built
    on the meta device and given the file's tensors (no random initialisation), every tensor checked
    against the config; (module, the weights file)."""
    try:
        with torch.device("meta"):
            module = cls.from_config(cfg)
    except Exception as e:
        raise CheckpointError(f"{folder / 'config.json'}: not a valid {cls.__name__} config: {e}") from e
    expected = module.state_dict()
    tensors, source = read_weights(folder, pickled_ok=pickled_ok)
    tensors = {_renamed(k, expected): v for k, v in tensors.items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{source}: weights do not match {folder / 'config.json'}: missing {missing[:5]}"
                              f"{'…' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'…' if len(extra) > 5 else ''}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(v.shape)}, the config needs "
                                  f"{tuple(expected[k].shape)}")
    module.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True, assign=True)
    return module, source


def _load_unet(unet_dir: Path, where: Path):
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise CheckpointError(f"{where}: a diffusers folder needs the diffusers package: {INSTALL}") from e
    cfg = read_json(unet_dir / "config.json", "the UNet2DModel config")
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"{unet_dir / 'config.json'}: the network is a {cfg.get('_class_name')}, not a "
                              "UNet2DModel (only pixel-space UNet2DModel networks are served)")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise CheckpointError(f"{unet_dir / 'config.json'}: time_embedding_type "
                              f"{cfg.get('time_embedding_type')!r} (a score-SDE model); only DDPMs are served")
    if cfg.get("class_embed_type") is not None:
        raise CheckpointError(f"{unet_dir / 'config.json'}: class_embed_type {cfg.get('class_embed_type')!r} is not "
                              "served (class-conditional models with num_class_embeds are)")
    unet, source = load_module(unet_dir, UNet2DModel, cfg)
    return unet, cfg, source


# --- the folder -----------------------------------------------------------------------------------
def _layout(folder: Path) -> tuple[Path, Path, str, dict]:
    """(unet folder, scheduler config, layout, provenance) of a diffusers folder."""
    if (folder / "model_index.json").is_file():
        index = read_json(folder / "model_index.json", "the pipeline index")
        latent = sorted(k for k in ("vae", "vqvae", "text_encoder", "transformer") if index.get(k))
        if latent:  # Stable Diffusion-family folders are read by diffusion.sd_format
            raise UnsupportedModel(f"{folder}: a {index.get('_class_name', 'pipeline')} with {', '.join(latent)}: "
                                   "not a pixel-space pipeline of a UNet2DModel and a scheduler")
        if "unet" not in index:
            raise CheckpointError(f"{folder / 'model_index.json'}: the pipeline has no unet")
        return (folder / "unet", folder / "scheduler" / "scheduler_config.json", "diffusers pipeline folder",
                {"pipeline": index.get("_class_name"), "diffusers_version": index.get("_diffusers_version")})
    return folder, folder / "scheduler_config.json", "diffusers model folder", {}


def _metadata(folder: Path) -> dict:
    path = folder / METADATA
    if not path.is_file():
        return {}
    meta = read_json(path, "this service's model metadata")
    unknown = set(meta) - METADATA_FIELDS
    if unknown:
        raise CheckpointError(f"{path}: unknown fields {sorted(unknown)}; known: {sorted(METADATA_FIELDS)}")
    return meta


def _classes(meta: dict, num_classes: int, where: Path) -> tuple[tuple[str, ...], int | None]:
    null = meta.get("null_class")
    if num_classes == 0:
        if "class_names" in meta or null is not None:
            raise CheckpointError(f"{where}: class_names / null_class given for an unconditional model")
        return (), None
    if null is not None and (not isinstance(null, int) or not 0 <= null < num_classes):
        raise CheckpointError(f"{where}: null_class must be a class index in [0, {num_classes - 1}], got {null!r}")
    names = meta.get("class_names")
    if names is None:
        return tuple(str(i) for i in range(num_classes - (null == num_classes - 1))), null
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or len(names) > num_classes:
        raise CheckpointError(f"{where}: class_names must be at most {num_classes} non-empty strings")
    return tuple(names), null


def load_folder(folder: str | Path, device: torch.device | str = "cpu"):
    """(model, provenance) of a diffusers pipeline or model folder (module docstring)."""
    from diffusion.models.diffusers_unet import DiffusersUNet

    folder = Path(folder)
    unet_dir, sched_path, layout, provenance = _layout(folder)
    sched_cfg = read_json(sched_path, "the scheduler config")
    schedule = schedule_from_config(sched_cfg, sched_path)
    prediction = PREDICTIONS.get(sched_cfg.get("prediction_type", "epsilon"))
    if prediction is None:
        raise CheckpointError(f"{sched_path}: unknown prediction_type {sched_cfg.get('prediction_type')!r}; "
                              f"known: {', '.join(PREDICTIONS)}")
    variance = VARIANCES.get(sched_cfg.get("variance_type", "fixed_small"))
    if variance is None:
        raise CheckpointError(f"{sched_path}: unknown variance_type {sched_cfg.get('variance_type')!r}")
    unet, cfg, weights = _load_unet(unet_dir, folder)
    meta = _metadata(folder)
    where = folder / METADATA
    channels = int(cfg.get("in_channels", 3))
    size = cfg.get("sample_size") or 32
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    out = int(cfg.get("out_channels", channels))
    if out not in (channels, 2 * channels):
        raise CheckpointError(f"{unet_dir / 'config.json'}: out_channels {out} for {channels} image channels")
    num_classes = int(cfg.get("num_class_embeds") or 0)
    names, null = _classes(meta, num_classes, where)
    clip = "dynamic" if sched_cfg.get("thresholding") else \
        "static" if sched_cfg.get("clip_sample", CLIPPING_DEFAULT.get(sched_cfg.get("_class_name"), False)) else "none"
    try:
        card = ModelCard(
            image_shape=(channels, h, w), schedule=schedule, prediction=prediction, class_names=names,
            class_conditional=num_classes > 0, cond_dim=1 if num_classes else None, guidable=null is not None,
            default_steps=int(meta.get("default_steps", min(50, schedule.num_timesteps))),
            default_guidance=float(meta.get("default_guidance", 0.0)), default_clip=meta.get("default_clip", clip),
            clip_range=float(sched_cfg.get("clip_sample_range", 1.0)),
            sampler_defaults={"ddpm": {"variance": variance}, "ddim": {"model_eps": True}},
            parameters=sum(p.numel() for p in unet.parameters()), architecture="diffusers UNet2DModel", source=layout)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: {e}") from e
    if card.default_clip not in CLIP_MODES:
        raise CheckpointError(f"{where}: default_clip must be one of {CLIP_MODES}")
    if card.default_guidance and not card.guidable:
        raise CheckpointError(f"{where}: default_guidance > 0 needs a null_class")
    provenance = {**provenance, "format": layout, "path": str(folder), "weights": weights.name,
                  "scheduler": sched_cfg.get("_class_name"),
                  "date": _dt.datetime.fromtimestamp(weights.stat().st_mtime, _dt.timezone.utc).isoformat(timespec="seconds")}
    return DiffusersUNet(unet, card, null).to(device).eval().requires_grad_(False), provenance
