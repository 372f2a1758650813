"""The typed training config, its presets and its validation.

Presets name the study's experiments (dataset × model size × β-schedule × conditioning); every
field can then be overridden on the command line. The resolved config goes into the checkpoint's
provenance and the training-state file, and a resume with an incompatible config is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from diffusion.models.unet import MODEL_SIZES
from training.data import DATASETS

CONDITIONINGS = ("class", "text", "class+text", "none")


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "mnist"
    data_dir: str | None = None
    image_size: int | None = None  # Flowers102 / imagefolder: 64 or 128
    channels: int = 3  # imagefolder only
    model: str = "small"  # tiny | small | large
    schedule: str = "linear"
    num_timesteps: int = 1000
    prediction: str = "epsilon"
    conditioning: str = "class"
    text_encoder: str = "tower"  # tower | open_clip
    text_arch: str | None = None  # open_clip architecture for text_encoder=open_clip
    text_pretrained: str | None = None
    text_width: int = 64
    text_layers: int = 2
    context_length: int = 16
    p_uncond: float = 0.1
    max_steps: int = 10000
    time_limit: float | None = None  # seconds of training after which the run stops and saves (None: no limit)
    batch_size: int = 128
    lr: float = 2e-4
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    text_lr_scale: float = 1.0  # the text path (tower + projection) learns at lr × this
    warmup_steps: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1+n)/(10+n)) so early EMA follows the model
    dropout: float | None = None  # None: the size preset's
    bf16: bool | None = None  # None: on when on a GPU
    compile: bool = False  # torch.compile the network's training step (fused kernels; minutes to compile)
    device: str | None = None  # None: cuda when available
    seed: int = 0
    num_workers: int = 0
    subset: int | None = None  # train on the first N images only
    out: str = "runs/mnist"
    name: str | None = None  # checkpoint file stem; default derived from the config
    log_every: int = 50
    sample_every: int = 1000  # 0 disables sample grids
    save_every: int = 1000
    default_guidance: float = 2.0
    default_clip: str = "static"  # DDPM's own sampler clips x̂0 to [-1, 1]; requests may override
    default_steps: int = 50

    def checkpoint_name(self) -> str:
        return self.name or f"{self.dataset}-{self.conditioning.replace('+', '-')}-{self.model}-{self.schedule}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        checks = [
            (self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; expected one of {', '.join(DATASETS)}"),
            (self.model in MODEL_SIZES, f"unknown model size {self.model!r}; expected one of {', '.join(MODEL_SIZES)}"),
            (self.schedule in ("linear", "cosine"), f"unknown schedule {self.schedule!r}"),
            (self.conditioning in CONDITIONINGS, f"unknown conditioning {self.conditioning!r}"),
            (self.text_encoder in ("tower", "open_clip"), f"unknown text encoder {self.text_encoder!r}"),
            (self.text_encoder != "open_clip" or bool(self.text_arch), "--text-encoder open_clip needs --text-arch"),
            (self.lr_schedule in ("constant", "cosine"), f"unknown lr schedule {self.lr_schedule!r}"),
            (0.0 <= self.p_uncond < 1.0, "p_uncond must be in [0, 1)"),
            (self.text_lr_scale > 0, "text_lr_scale must be > 0"),
            (self.max_steps >= 1 and self.batch_size >= 1, "max_steps and batch_size must be >= 1"),
            (0.0 < self.ema_decay < 1.0, "ema_decay must be in (0, 1)"),
            (self.lr > 0, "lr must be > 0"),
            (self.num_timesteps >= 2, "num_timesteps must be >= 2"),
            (self.subset is None or self.subset >= 1, "subset must be >= 1"),
            (self.time_limit is None or self.time_limit > 0, "time_limit must be > 0 seconds"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


# Fields that change the model or its maths: a resume must agree on all of them.
ARCHITECTURE_FIELDS = ("dataset", "image_size", "channels", "model", "schedule", "num_timesteps", "prediction",
                       "conditioning", "text_encoder", "text_arch", "text_pretrained", "text_width",
                       "text_layers", "context_length")


def _preset(dataset: str, model: str, schedule: str, conditioning: str, **kw) -> dict:
    return dict(dataset=dataset, model=model, schedule=schedule, conditioning=conditioning,
                out=f"runs/{dataset}-{conditioning.replace('+', '-')}-{model}-{schedule}", **kw)


PRESETS: dict[str, dict] = {
    f"{d}-{m}-{s}-{c.replace('+', '-')}": _preset(d, m, s, c)
    for d in ("mnist", "fashion_mnist") for m in ("small", "large")
    for s in ("linear", "cosine") for c in ("class", "text")
}
PRESETS.update({
    f"flowers102-{m}-{s}-{r}": _preset("flowers102", m, s, "class", image_size=r, batch_size=32)
    for m in ("small", "large") for s in ("linear", "cosine") for r in (64, 128)
})
PRESETS["default-model"] = _preset("mnist", "compact", "linear", "text", name="mnist-text-compact",
                                   batch_size=64, max_steps=3000, warmup_steps=200, lr=1e-3, ema_decay=0.999,
                                   sample_every=500, save_every=250)
PRESETS["smoke"] = _preset("mnist", "tiny", "linear", "class", max_steps=50, batch_size=16, warmup_steps=5,
                           sample_every=0, save_every=0, log_every=10)
