"""``python -m training [--preset NAME] [--FIELD VALUE ...] [--resume]``

Every field of :class:`training.config.TrainConfig` is a flag (``--max-steps 2000``); a preset sets a
group of them first. Bad input is refused before any work is done, with a message and exit code 2.
Multi-GPU / multi-node: ``torchrun --nproc_per_node N [--nnodes M ...] -m training ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

from training.config import PRESETS, TrainConfig


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description="Train a DDPM image generator.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named experiment's settings")
    p.add_argument("--resume", action="store_true", help="continue from the training state in --out")
    p.add_argument("--list-presets", action="store_true")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        conv = _parse_bool if base is bool else base
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=conv, default=None,
                       help=f"(default: {f.default})")
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    values = dict(PRESETS[args.preset]) if args.preset else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def preflight(cfg: TrainConfig) -> None:
    """Refuse bad input before any work: data, output folder, devices, optional dependencies."""
    import torch

    from training.data import DataError, dataset_spec, load_dataset

    if cfg.device and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device} asked for, but this machine has no CUDA GPU")
    if cfg.bf16 and not (torch.cuda.is_available() and (cfg.device or "cuda").startswith("cuda")):
        raise ValueError("--bf16 true needs a CUDA GPU (autocast to bf16 is a GPU option here)")
    if "text" in cfg.conditioning:
        try:
            import open_clip  # noqa: F401
        except ImportError as e:
            raise ValueError("a text-conditioned model needs open_clip: pip install open_clip_torch") from e
    out = Path(cfg.out)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if (out.exists() and not out.is_dir()) or not os.access(probe, os.W_OK):
        raise ValueError(f"output directory {out} is not writable")
    try:
        dataset_spec(cfg.dataset, cfg.image_size, cfg.data_dir, cfg.channels)
        if cfg.data_dir is not None:
            load_dataset(cfg.dataset, cfg.data_dir, "train", cfg.image_size, cfg.channels)
    except DataError as e:
        raise ValueError(str(e)) from e


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        for name, values in sorted(PRESETS.items()):
            print(f"{name}: {values}")
        return 0
    try:
        cfg = resolve_config(args)
        preflight(cfg)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from training.loop import train

    try:
        path = train(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
