"""The checkpoint format: one self-describing safetensors file per model.

- tensors: the inference (EMA) weights of :class:`DiffusionModel` (a frozen pretrained open_clip
  text encoder is not stored; open_clip supplies it).
- metadata (all strings, as safetensors requires):
    ``format``      "diffusion-serve/checkpoint"
    ``version``     "1"
    ``config``      JSON of :class:`ModelConfig` (architecture, image shape, conditioning, class
                    names, text encoder spec, β-schedule and T, prediction type, defaults)
    ``provenance``  JSON: dataset, training steps, date, code version, anything the trainer adds
    ``weights_sha256``  digest over every tensor's name, dtype, shape and bytes, in name order

Loading checks all of it and refuses a truncated, corrupt or mismatched file with
:class:`CheckpointError`. Nothing is ever unpickled.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from diffusion.models.model import DiffusionModel, ModelConfig

FORMAT = "diffusion-serve/checkpoint"
VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason."""


class UnsupportedModel(CheckpointError):
    """A well-formed model of a kind this project does not serve (a ControlNet pipeline, a 9-channel
    inpainting UNet, a Flux transformer, …): a service skips it with the reason logged."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def code_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusion-serve")
    except Exception:  # not installed as a distribution
        return "unknown"


def save(model: DiffusionModel, path: str | os.PathLike, provenance: dict | None = None,
         dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (its current weights: pass the EMA model) and its config to ``path``.
    ``dtype`` (e.g. torch.float16) stores floating-point weights smaller; loading casts back."""
    tensors = {}
    for k, v in model.inference_state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    prov = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": code_version(), **(provenance or {})}
    meta = {"format": FORMAT, "version": VERSION, "config": json.dumps(model.cfg.to_dict()),
            "provenance": json.dumps(prov, default=str), "weights_sha256": _digest(tensors)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # never leave a half-written checkpoint under the real name
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict, dict[str, torch.Tensor]]:
    """(config, provenance, tensors) of a checkpoint, all validated."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a diffusion-serve checkpoint (format={meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, this code reads {VERSION!r}")
    try:
        cfg = ModelConfig.from_dict(json.loads(meta["config"]))
        provenance = json.loads(meta.get("provenance", "{}"))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: invalid model config in metadata: {e}") from e
    if _digest(tensors) != meta.get("weights_sha256"):
        raise CheckpointError(f"{path}: weights do not match their recorded sha256 digest (corrupt file)")
    return cfg, provenance, tensors


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[DiffusionModel, dict]:
    """Build the model its config describes and load its weights strictly; returns (model, provenance)."""
    cfg, provenance, tensors = read_checkpoint(path)
    model = DiffusionModel(cfg)
    expected = model.inference_state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: weights do not match the config: missing {missing[:5]}"
                              f"{'…' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'…' if len(extra) > 5 else ''}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(v.shape)}, config needs {tuple(expected[k].shape)}")
        tensors[k] = v.to(expected[k].dtype)
    model.load_state_dict(tensors, strict=False)
    return model.to(device).eval().requires_grad_(False), provenance
