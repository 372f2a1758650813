"""A loaded model ready to generate: ``diffusion.load(path).generate(prompt="nine")``.

The pipeline owns what every caller needs around the samplers: the device and dtype (bf16 autocast
on GPU, float32 on CPU), the schedule on that device, turning a request's prompt or class label into
the model's conditioning vector (cached per condition), the null condition, the network call, and
the :class:`diffusion.runner.Runner` that steps rows through it.

Prompts and class labels work on both kinds of model: a class-conditional model accepts a prompt
that names one of its classes (case-insensitive, e.g. "nine", "sneaker"); a text model accepts a
class label (an index or a class name) and uses the class name as its prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffusion.checkpoint import load_model
from diffusion.imaging import to_pil
from diffusion.models.model import DiffusionModel
from diffusion.runner import Acceleration, Runner
from diffusion.samplers import get_sampler
from diffusion.schedules import make_schedule
from diffusion.table import RowRequest


class ConditionError(ValueError):
    """A prompt or class label the model cannot use (unknown class, wrong kind, too long)."""


@dataclass(frozen=True)
class Condition:
    """A resolved request condition: what the model will actually be given."""
    label: int | None  # class index (class-conditional models)
    prompt: str | None  # text (text models)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pipeline:
    def __init__(self, model: DiffusionModel, device: torch.device | str | None = None, name: str = "model",
                 provenance: dict | None = None, bf16: bool | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.cfg = model.cfg
        self.name = name
        self.provenance = provenance or {}
        self.schedule = make_schedule(self.cfg.schedule, self.cfg.num_timesteps).to(self.device)
        self.autocast = (bf16 if bf16 is not None else self.device.type == "cuda")
        self._runner: Runner | None = None  # set by accelerate(): generate_rows then goes through it
        self._cond_cache: dict[Condition, torch.Tensor | None] = {}
        with torch.no_grad():
            self.null_cond = model.null_condition()

    # --- conditioning -------------------------------------------------------------------------
    def class_index(self, label: int | str) -> int:
        names = self.cfg.class_names
        if isinstance(label, bool):
            raise ConditionError("class_label must be an integer or a class name")
        if isinstance(label, int):
            if not names or not 0 <= label < len(names):
                raise ConditionError(f"class_label {label} out of range [0, {len(names) - 1}]" if names
                                     else "this model has no classes")
            return label
        lookup = {n.lower(): i for i, n in enumerate(names)}
        key = str(label).strip().lower()
        if key not in lookup:
            raise ConditionError(f"unknown class {label!r}; known: {', '.join(names)}")
        return lookup[key]

    def resolve(self, prompt: str | None = None, class_label: int | str | None = None) -> Condition:
        """What a request asks for, in the terms this model understands."""
        if prompt is not None and class_label is not None:
            raise ConditionError("give either prompt or class_label, not both")
        has_text, has_class = self.cfg.text is not None, self.cfg.num_classes > 0
        if prompt is not None:
            if has_text:
                enc = self.model.text_encoder
                n = enc.token_count(prompt)
                if n > enc.context_length - 2:
                    raise ConditionError(f"prompt is {n} tokens; this model reads at most {enc.context_length - 2}")
                return Condition(None, prompt)
            if has_class:
                return Condition(self.class_index(prompt), None)
            raise ConditionError("this model is unconditional: leave prompt and class_label out")
        if class_label is not None:
            idx = self.class_index(class_label)
            return Condition(idx if has_class else None, None if has_class else self.cfg.class_names[idx])
        return Condition(None, "" if has_text else None)  # unconditional

    @functools.lru_cache(maxsize=4096)
    def _text_embedding(self, prompt: str) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_prompts([prompt])[0]

    @torch.no_grad()
    def cond_vector(self, c: Condition) -> torch.Tensor | None:
        """The conditioning vector [emb_dim] for one condition, computed once per condition (so a
        request for a known condition costs no host-device round trip)."""
        if c in self._cond_cache:
            return self._cond_cache[c]
        if self.null_cond is None:
            return None
        labels = torch.tensor([c.label], device=self.device) if c.label is not None else None
        text = self._text_embedding(c.prompt).unsqueeze(0) if (c.prompt is not None and self.cfg.text) else None
        vec = self.model.condition(labels=labels, text_emb=text, batch=1)[0]
        if len(self._cond_cache) < 4096:
            self._cond_cache[c] = vec
        return vec

    # --- the network --------------------------------------------------------------------------
    def net(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        # no autocast weight cache: its casts would not survive a CUDA graph capture
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False):
            return self.model(x, t, cond).float()

    def runner(self, capacity: int, max_steps: int | None = None, accel: Acceleration = Acceleration()) -> Runner:
        """A new :class:`Runner` for this model: up to ``capacity`` rows in flight, plans of up to
        ``max_steps`` steps (default: the model's T)."""
        return Runner(self.net, self.schedule, self.cfg.prediction, self.null_cond, self.cfg.image_shape,
                      capacity=capacity, max_steps=max_steps or self.cfg.num_timesteps, device=self.device,
                      accel=accel)

    def accelerate(self, capacity: int, accel: Acceleration, max_steps: int | None = None) -> Runner:
        """Route :meth:`generate_rows` through one long-lived runner, compiled (and its CUDA graphs
        captured) here, before use. Not for a runner that another thread (the service) drives."""
        runner = self.runner(capacity, max_steps, accel)
        runner.warm_up()
        self._runner = runner
        return runner

    # --- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tensor(self, prompt: str | None = None, class_label: int | str | None = None,
                        scheduler: str = "ddim", steps: int | None = None, guidance: float | None = None,
                        seed: int | None = None, num_images: int = 1, clip: str | None = None,
                        percentile: float = 0.995, spacing: str | None = None, **options) -> torch.Tensor:
        """Images [N, C, H, W] in model space (about [-1, 1]), unclipped. Left out, ``steps``,
        ``guidance`` and ``clip`` take the model's defaults."""
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
        cond = self.resolve(prompt, class_label)
        return self.generate_rows([cond] * num_images, [seed + k for k in range(num_images)], scheduler, steps,
                                  guidance, clip, percentile, spacing, **options)

    def row_request(self, condition: Condition, seed: int, scheduler: str = "ddim", steps: int | None = None,
                    guidance: float | None = None, clip: str | None = None, percentile: float = 0.995,
                    spacing: str | None = None, **options) -> RowRequest:
        """One image in the runner's terms, with the model's defaults filled in."""
        get_sampler(scheduler)
        cond = self.cond_vector(condition)
        guidance = self.cfg.default_guidance if guidance is None else guidance
        return RowRequest(scheduler, steps or self.cfg.default_steps, int(seed), cond,
                          guidance=float(guidance) if cond is not None else 0.0, clip=clip or self.cfg.default_clip,
                          percentile=float(percentile), spacing=spacing, options=options)

    @torch.no_grad()
    def generate_rows(self, conditions: Sequence[Condition], seeds: Sequence[int], scheduler: str = "ddim",
                      steps: int | None = None, guidance: float | None = None, clip: str | None = None,
                      percentile: float = 0.995, spacing: str | None = None, **options) -> torch.Tensor:
        """Images [N, C, H, W] for N rows, row i with its own resolved condition and seed, all rows in
        the same forward passes (as many at once as the runner holds; rows join as others finish).
        Row i is the image that ``generate_tensor`` gives for that condition and seed alone."""
        if len(conditions) != len(seeds) or not conditions:
            raise ValueError(f"need one seed per condition, got {len(conditions)} conditions and {len(seeds)} seeds")
        rows = [self.row_request(c, s, scheduler, steps, guidance, clip, percentile, spacing, **options)
                for c, s in zip(conditions, seeds)]
        runner = self._runner if self._runner is not None else self.runner(len(rows), max(r.steps for r in rows))
        pending, handles, got = list(range(len(rows))), {}, {}
        while pending or len(runner):
            if pending and runner.table.free:
                batch, pending = pending[:runner.table.free], pending[runner.table.free:]
                handles.update(zip(runner.add([rows[k] for k in batch]), batch))
            finished = runner.step()
            if finished:
                got.update(zip((handles[h] for h in finished), runner.take(finished)))
        return torch.stack([got[k] for k in range(len(rows))])

    def generate(self, prompt: str | None = None, class_label: int | str | None = None, scheduler: str = "ddim",
                 steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                 num_images: int = 1, **options) -> list:
        """PIL images for a prompt or class label; ``seed`` (default random) seeds image k with seed + k."""
        x = self.generate_tensor(prompt, class_label, scheduler, steps, guidance, seed, num_images, **options)
        return [to_pil(img) for img in x]


def load(path: str, device: torch.device | str | None = None, bf16: bool | None = None) -> Pipeline:
    """Load a checkpoint (safetensors, validated) into a ready pipeline, on the GPU when there is one."""
    from pathlib import Path

    dev = torch.device(device) if device is not None else default_device()
    model, prov = load_model(path, dev)
    return Pipeline(model, dev, name=Path(path).stem, provenance=prov, bf16=bf16)
