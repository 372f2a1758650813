"""Small random-weight diffusers ``UNet2DModel``s saved as the field publishes them (nothing from the
hub): a pipeline folder (``DDPMPipeline.save_pretrained``) or a flat model folder (the older
google/ddpm-* layout: the UNet's files and ``scheduler_config.json`` side by side)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Spec:
    size: int = 32
    attention: bool = True
    classes: int = 0  # num_class_embeds (0: unconditional)
    prediction: str = "epsilon"  # diffusers' prediction_type
    beta_schedule: str = "linear"
    clip_sample: bool = True
    variance_type: str = "fixed_small"
    layout: str = "pipeline"  # or "flat"
    metadata: dict = field(default_factory=dict)  # diffusion_serve.json (not written when empty)
    damp: float = 0.1  # scales the output layer: a tamer random network (see tests/diffusion/test_diffusers_format.py)
    seed: int = 0


SPECS = {
    "rgb32": Spec(),
    "rgb64-class-v": Spec(size=64, attention=False, classes=4, prediction="v_prediction",
                          beta_schedule="squaredcos_cap_v2", clip_sample=False, variance_type="fixed_large",
                          layout="flat", metadata={"class_names": ["cat", "dog", "owl"], "null_class": 3}),
}


def build(spec: Spec):
    """(unet, scheduler) of a spec, random weights fixed by its seed."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(spec.seed)
    down = ("DownBlock2D", "AttnDownBlock2D" if spec.attention else "DownBlock2D")
    up = ("AttnUpBlock2D" if spec.attention else "UpBlock2D", "UpBlock2D")
    unet = UNet2DModel(sample_size=spec.size, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=down, up_block_types=up, norm_num_groups=8,
                       attention_head_dim=8, num_class_embeds=spec.classes or None)
    with torch.no_grad():
        unet.conv_out.weight.mul_(spec.damp)
        unet.conv_out.bias.mul_(spec.damp)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=spec.beta_schedule, clip_sample=spec.clip_sample,
                              prediction_type=spec.prediction, variance_type=spec.variance_type)
    return unet.eval(), scheduler


def save(spec: Spec, folder: Path) -> Path:
    """Write the spec's model to ``folder`` in its layout; returns the folder."""
    from diffusers import DDPMPipeline

    unet, scheduler = build(spec)
    folder = Path(folder)
    if spec.layout == "pipeline":
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
    else:
        unet.save_pretrained(str(folder))
        scheduler.save_config(str(folder))
    if spec.metadata:
        (folder / "diffusion_serve.json").write_text(json.dumps(spec.metadata))
    return folder


def unet_dir(folder: Path) -> Path:
    folder = Path(folder)
    return folder / "unet" if (folder / "model_index.json").is_file() else folder


def copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to
