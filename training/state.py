"""The training-state file beside the inference checkpoint: model, EMA, optimizer, step and RNG, in
safetensors (tensors) with the non-tensor parts as JSON metadata. Never pickled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

STATE_FORMAT = "diffusion-serve/training-state"


def save_state(path: Path, *, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
               step: int, config: dict, extra_rng: dict[str, torch.Tensor] | None = None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    for k, v in ema.state_dict().items():
        tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for key, val in st.items():
            val = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for k, v in (extra_rng or {}).items():
        tensors[f"rng.{k}"] = v
    meta = {"format": STATE_FORMAT, "step": str(step), "config": json.dumps(config),
            "param_groups": json.dumps(opt["param_groups"])}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata with parsed 'config' and 'step', tensors)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: unreadable training state: {e}") from e
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a training-state file")
    meta["config"] = json.loads(meta["config"])
    meta["step"] = int(meta["step"])
    return meta, tensors


def load_state(meta: dict, tensors: dict[str, torch.Tensor], *, model: torch.nn.Module, ema: torch.nn.Module,
               optimizer: torch.optim.Optimizer) -> int:
    """Restore everything into the given objects; returns the step to continue from."""
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(part("model."))
    ema.load_state_dict(part("ema."))
    state: dict[int, dict] = {}
    for k, v in part("optim.").items():
        idx, key = k.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    saved = json.loads(meta["param_groups"])
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in optimizer.param_groups]:
        # saved with other lr groups (other lr scales, or from before the groups existed): the groups are
        # contiguous runs of the same parameter order, so regroup the saved ids like the current ones
        ids = [i for g in saved for i in g["params"]]
        regrouped = []
        for group in optimizer.param_groups:
            regrouped.append(dict(saved[0], params=ids[:len(group["params"])]))
            ids = ids[len(group["params"]):]
        saved = regrouped
    optimizer.load_state_dict({"state": state, "param_groups": saved})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta["step"]
