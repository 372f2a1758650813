"""A loaded model ready to generate: ``diffusion.load(path).generate(prompt="nine")``.

The pipeline owns what every caller needs around the samplers, for any model that implements the
model interface (:mod:`diffusion.models.card`: this project's checkpoints and diffusers folders
alike): the device and dtype (bf16 autocast on GPU, float32 on CPU), the schedule on that device,
turning a request's prompt or class label into the model's conditioning vector (cached per
condition), the null condition, the network call, the model's defaults, and the
:class:`diffusion.runner.Runner` that steps rows through it.

Prompts and class labels work on both kinds of conditional model: a class-conditional model accepts
a prompt that names one of its classes (case-insensitive, e.g. "nine", "sneaker"); a text model
accepts a class label (an index or a class name) and uses the class name as its prompt.

A text model also takes a negative prompt: its encoding replaces the null condition in the
unconditional half of its guided rows (:mod:`diffusion.guidance`).

Samples and images: a latent model (:mod:`diffusion.models.latent`) denoises latents of its card's
``sample_shape`` and decodes them at the end (:meth:`Pipeline.decode`); a pixel model's samples are
its images. Edits (:mod:`diffusion.edits`) take ``image`` (image space, [C, H, W] in [-1, 1], or one
per image), ``mask`` ([1, H, W], 1 where to repaint), ``strength`` and RePaint's ``jump_length`` /
``jump_n_sample``; the pipeline turns them into sample space (:meth:`Pipeline.edit_inputs`), and its
result keeps the given image's kept pixels exactly. :meth:`Pipeline.generate` takes PIL images for
them (:func:`diffusion.imaging.image_tensor`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from diffusion import edits
from diffusion.conditions import ConditionCache
from diffusion.imaging import image_tensor, mask_tensor, to_pil
from diffusion.models.card import Condition, ConditionError, Model, ModelCard, to_device
from diffusion.runner import Acceleration, Runner
from diffusion.samplers import get_sampler
from diffusion.table import RowRequest

__all__ = ["Condition", "ConditionError", "Pipeline", "default_device", "load"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pipeline:
    def __init__(self, model: Model, device: torch.device | str | None = None, name: str = "model",
                 provenance: dict | None = None, bf16: bool | None = None, condition_cache_bytes: int = 256 * 2**20):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.card: ModelCard = model.card
        self.name = name
        self.provenance = provenance or {}
        self.schedule = self.card.schedule.to(self.device)
        self.autocast = (bf16 if bf16 is not None else self.device.type == "cuda")
        self._runner: Runner | None = None  # set by accelerate(): generate_rows then goes through it
        self.conditions = ConditionCache(self._encode, condition_cache_bytes)
        with torch.no_grad():
            self.null_cond = model.null_condition()

    # --- conditioning -------------------------------------------------------------------------
    def class_index(self, label: int | str) -> int:
        names = self.card.class_names
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
            raise ConditionError(f"unknown class {label!r}; known: {', '.join(names)}" if names
                                 else "this model has no class names")
        return lookup[key]

    def resolve(self, prompt: str | None = None, class_label: int | str | None = None) -> Condition:
        """What a request asks for, in the terms this model understands."""
        if prompt is not None and class_label is not None:
            raise ConditionError("give either prompt or class_label, not both")
        card = self.card
        has_text, has_class = card.text_conditional, card.class_conditional
        if not (has_text or has_class):
            if prompt is not None or class_label is not None:
                raise ConditionError("this model is unconditional: leave prompt and class_label out")
            return Condition(None, None)
        if prompt is not None:
            if has_text:
                n = self.model.token_count(prompt)
                if n > card.max_prompt_tokens:
                    raise ConditionError(f"prompt is {n} tokens; this model reads at most {card.max_prompt_tokens}")
                return Condition(None, prompt)
            return Condition(self.class_index(prompt), None)
        if class_label is not None:
            idx = self.class_index(class_label)
            return Condition(idx if has_class else None, None if has_class else card.class_names[idx])
        if not has_text and not card.guidable:
            raise ConditionError("this class-conditional model has no null class: name a class "
                                 "(class_label, or a prompt that names one)")
        return Condition(None, "" if has_text else None)  # unconditional

    def negative(self, prompt: str | None) -> Condition | None:
        """The condition of a negative prompt (None for none); ConditionError when the model takes
        none or the prompt is too long."""
        if prompt is None:
            return None
        if not self.card.negative_prompts:
            raise ConditionError("a negative prompt needs a text model with a null condition; this model is "
                                 f"{self.card.conditioning}-conditional" if self.card.conditioning != "none"
                                 else "this model is unconditional: it takes no negative prompt")
        n = self.model.token_count(prompt)
        if n > self.card.max_prompt_tokens:
            raise ConditionError(f"negative_prompt is {n} tokens; this model reads at most {self.card.max_prompt_tokens}")
        return Condition(None, prompt)

    @torch.no_grad()
    def _encode(self, conditions: list[Condition]) -> torch.Tensor | None:
        return self.model.encode(list(conditions))

    @torch.no_grad()
    def cond_vector(self, c: Condition) -> torch.Tensor | None:
        """The conditioning vector [D] for one condition, encoded once and cached (so a request for a
        known condition costs neither an encoder pass nor a host-device round trip)."""
        return self.conditions.get(c)

    def encode_conditions(self, conditions: Sequence[Condition]) -> dict[Condition, torch.Tensor | None]:
        """The vectors of ``conditions``, those not cached yet encoded in one batch (before admitting
        requests: hand them to :meth:`row_request`, which then never encodes one alone)."""
        return self.conditions.fill(list(conditions))

    # --- the network --------------------------------------------------------------------------
    def net(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        # no autocast weight cache: its casts would not survive a CUDA graph capture
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False):
            return self.model(x, t, cond).float()

    def runner(self, capacity: int, max_steps: int | None = None, accel: Acceleration = Acceleration(),
               shape: Sequence[int] | None = None) -> Runner:
        """A new :class:`Runner` for this model: up to ``capacity`` rows in flight, plans of up to
        ``max_steps`` timesteps (default: the model's T), samples of ``shape`` (default: the card's
        sample shape; another size: :meth:`ModelCard.sample_shape_for`)."""
        card = self.card
        return Runner(self.net, self.schedule, card.prediction, self.null_cond, shape or card.sample_shape,
                      capacity=capacity, max_steps=max_steps or card.num_timesteps, device=self.device,
                      accel=accel, cond_dim=card.cond_dim, clip_range=card.clip_range)

    def accelerate(self, capacity: int, accel: Acceleration, max_steps: int | None = None) -> Runner:
        """Route :meth:`generate_rows` through one long-lived runner, compiled (and its CUDA graphs
        captured) here, before use. Not for a runner that another thread (the service) drives."""
        runner = self.runner(capacity, max_steps, accel)
        runner.warm_up()
        self._runner = runner
        return runner

    # --- requests -----------------------------------------------------------------------------
    def plan(self, scheduler: str = "ddim", steps: int | None = None, spacing: str | None = None,
             strength: float = 1.0, jump_length: int = 0, jump_n_sample: int = 1) -> list[int]:
        """The timesteps a row visits (ValueError names what is wrong); ``edits.evaluations`` of it
        is what the row costs."""
        return edits.row_plan(get_sampler(scheduler), self.card.schedule, steps or self.card.default_steps,
                              spacing, strength, jump_length, jump_n_sample)

    def evaluations(self, scheduler: str = "ddim", steps: int | None = None, spacing: str | None = None,
                    strength: float = 1.0, jump_length: int = 0, jump_n_sample: int = 1) -> int:
        """Model evaluations one image of such a request needs."""
        return edits.evaluations(get_sampler(scheduler),
                                 self.plan(scheduler, steps, spacing, strength, jump_length, jump_n_sample))

    def check_guidance(self, guidance: float | None) -> None:
        """ConditionError when a guided request reaches a model without a null condition."""
        if guidance and not self.card.guidable:
            raise ConditionError("this model has no null condition, so classifier-free guidance is not possible: "
                                 "leave guidance out or set it to 0" + (" (a class-conditional diffusers model "
                                 "names its null class as null_class in diffusion_serve.json)"
                                 if self.card.class_conditional else ""))

    def row_request(self, condition: Condition, seed: int, scheduler: str = "ddim", steps: int | None = None,
                    guidance: float | None = None, clip: str | None = None, percentile: float = 0.995,
                    spacing: str | None = None, *, x_T: torch.Tensor | None = None, image: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, strength: float = 1.0, jump_length: int = 0,
                    jump_n_sample: int = 1, negative: Condition | None = None,
                    vectors: Mapping[Condition, torch.Tensor | None] | None = None, **options) -> RowRequest:
        """One image in the runner's terms, with the model's defaults filled in (steps, guidance,
        clipping, and the sampler options the model's format implies). ``image`` and ``mask`` are in
        sample space (:meth:`edit_inputs`); ``negative``: a negative prompt's condition (:meth:`negative`);
        ``vectors``: conditions already encoded (:meth:`encode_conditions`)."""
        get_sampler(scheduler)
        card = self.card
        vectors = vectors or {}
        cond = vectors[condition] if condition in vectors else self.cond_vector(condition)
        uncond = None if negative is None else vectors[negative] if negative in vectors else self.cond_vector(negative)
        guidance = card.default_guidance if guidance is None else guidance
        self.check_guidance(guidance)
        options = {**card.sampler_defaults.get(scheduler, {}), **options}
        # ε̄ = ε_c + w·(ε_c − ε_u) is ε_c when c is the null condition: such a row is not guided (half the work)
        guided = cond is not None and (not condition.unconditional or uncond is not None or card.null_prompt != "")
        return RowRequest(scheduler, steps or card.default_steps, int(seed), cond, uncond=uncond,
                          guidance=float(guidance) if guided else 0.0, clip=clip or card.default_clip,
                          percentile=float(percentile), spacing=spacing, options=options, x_T=x_T, image=image,
                          mask=mask, strength=float(strength), jump_length=int(jump_length),
                          jump_n_sample=int(jump_n_sample))

    # --- sample space -------------------------------------------------------------------------
    @torch.no_grad()
    def edit_inputs(self, image: torch.Tensor, mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An edit's image [k, C, H, W] (image space, [-1, 1]) and repaint mask [k, 1, H, W] in sample
        space, on the device: a latent model's encoded latents and the mask at latent resolution (a
        latent cell is repainted when any of its pixels is), a pixel model's own tensors."""
        known = self.model.encode_image(to_device(image, self.device).float()).float()
        return known, None if mask is None else self.model.sample_mask(to_device(mask, self.device).float())

    @torch.no_grad()
    def decode(self, samples: torch.Tensor, image: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images [k, C, H, W] in [-1, 1] (unclipped) of final samples [k, *sample_shape]. With an
        inpainting edit's ``image`` and ``mask`` (image space, per row), its kept pixels (mask 0) are
        the given image's exactly: the decoded image is composited under the mask (a latent model's
        VAE does not give back its input bit for bit; a pixel model's kept pixels already are)."""
        out = self.model.decode(samples).float()
        if image is not None and mask is not None:
            out = torch.where(to_device(mask, out.device) < 0.5, to_device(image, out.device).to(out.dtype), out)
        return out

    @torch.no_grad()
    def preview(self, x0: torch.Tensor) -> torch.Tensor:
        """Approximate images of predictions x̂0 [k, *sample_shape] (cheap: a latent model's linear
        latent→RGB map at latent resolution, upsampled; a pixel model's x̂0 itself)."""
        return self.model.preview(x0).float()

    def shape_for(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """The sample shape of an image of this size (default: the native one); ValueError when the
        model cannot make it."""
        _, h, w = self.card.image_shape
        return self.card.sample_shape_for(height or h, width or w)

    # --- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tensor(self, prompt: str | None = None, class_label: int | str | None = None,
                        scheduler: str | None = None, steps: int | None = None, guidance: float | None = None,
                        seed: int | None = None, num_images: int = 1, clip: str | None = None,
                        percentile: float = 0.995, spacing: str | None = None, negative_prompt: str | None = None,
                        **kw) -> torch.Tensor:
        """Images [N, C, H, W] in model space (about [-1, 1]), unclipped. Left out, ``scheduler``,
        ``steps``, ``guidance`` and ``clip`` take the model's defaults. ``x_T`` [N, *sample_shape]
        starts from that noise instead of the seeds' (diffusers' ``latents``); ``negative_prompt``
        replaces the null condition of guidance; ``height`` and ``width`` choose another size (a
        resizable model's); the edit arguments and sampler options are those of :meth:`generate_rows`."""
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
        cond = self.resolve(prompt, class_label)
        return self.generate_rows([cond] * num_images, [seed + k for k in range(num_images)], scheduler, steps,
                                  guidance, clip, percentile, spacing, negative=self.negative(negative_prompt), **kw)

    @torch.no_grad()
    def generate_rows(self, conditions: Sequence[Condition], seeds: Sequence[int], scheduler: str | None = None,
                      steps: int | None = None, guidance: float | None = None, clip: str | None = None,
                      percentile: float = 0.995, spacing: str | None = None, *, x_T: torch.Tensor | None = None,
                      image: torch.Tensor | None = None, mask: torch.Tensor | None = None, strength: float = 1.0,
                      jump_length: int = 0, jump_n_sample: int = 1, negative: Condition | None = None,
                      height: int | None = None, width: int | None = None, decode: bool = True,
                      **options) -> torch.Tensor:
        """Images [N, C, H, W] for N rows (``decode=False``: the final samples), row i with its own
        resolved condition and seed, all rows in the same forward passes (as many at once as the
        runner holds; rows join as others finish). Row i is the image that ``generate_tensor`` gives
        for that condition and seed alone.

        ``x_T`` [N, *sample_shape]: starting noise per row. ``image`` (image space, [C, H, W] for every
        row, or [N, C, H, W]) with ``strength`` < 1: image-to-image; with ``mask`` ([1, H, W] or
        [N, 1, H, W], 1 where to repaint): inpainting, RePaint's resampling with ``jump_length`` and
        ``jump_n_sample``. An edit is made at its image's size unless ``height``/``width`` say otherwise."""
        n = len(conditions)
        if n != len(seeds) or not conditions:
            raise ValueError(f"need one seed per condition, got {n} conditions and {len(seeds)} seeds")
        scheduler = scheduler or self.card.default_scheduler
        if image is not None and height is None and width is None:
            height, width = int(image.shape[-2]), int(image.shape[-1])
        shape = self.shape_for(height, width)
        per_row = {"x_T": _per_row(x_T, n, 4, "x_T")}
        pixels = {"image": _per_row(image, n, 4, "image"), "mask": _per_row(mask, n, 4, "mask")}
        if image is not None:
            known, smask = self.edit_inputs(image if image.ndim == 4 else image[None],
                                            None if mask is None else mask if mask.ndim == 4 else mask[None])
            per_row.update(image=_per_row(known if image.ndim == 4 else known[0], n, 4, "image"),
                           mask=None if smask is None else _per_row(smask if mask.ndim == 4 else smask[0], n, 4, "mask"))
        rows = [self.row_request(c, s, scheduler, steps, guidance, clip, percentile, spacing, strength=strength,
                                 jump_length=jump_length, jump_n_sample=jump_n_sample, negative=negative,
                                 **{k: v[j] for k, v in per_row.items() if v is not None}, **options)
                for j, (c, s) in enumerate(zip(conditions, seeds))]
        runner = self._runner
        if runner is None or runner.table.image_shape != shape:  # every row has the same plan
            runner = self.runner(len(rows), len(self.plan(scheduler, rows[0].steps, spacing, strength, jump_length,
                                                          jump_n_sample)), shape=shape)
        pending, handles, got = list(range(len(rows))), {}, {}
        while pending or len(runner):
            if pending and runner.table.free:
                batch, pending = pending[:runner.table.free], pending[runner.table.free:]
                handles.update(zip(runner.add([rows[k] for k in batch]), batch))
            finished = runner.step()
            if finished:
                got.update(zip((handles[h] for h in finished), runner.take(finished)))
        samples = torch.stack([got[k] for k in range(len(rows))])
        if not decode:
            return samples
        return self.decode(samples, pixels["image"], pixels["mask"] if image is not None else None)

    def generate(self, prompt: str | None = None, class_label: int | str | None = None, scheduler: str | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                 num_images: int = 1, image=None, mask=None, **kw) -> list:
        """PIL images for a prompt or class label; ``seed`` (default random) seeds image k with seed + k.
        ``image`` and ``mask`` may be PIL images (converted by :func:`diffusion.imaging.image_tensor`
        and :func:`diffusion.imaging.mask_tensor` to the size asked, or the native one) or tensors as
        :meth:`generate_rows` takes them."""
        c, h, w = self.card.image_shape
        size = (kw.get("height") or h, kw.get("width") or w)
        if image is not None and not isinstance(image, torch.Tensor):
            if mask is not None and not isinstance(mask, torch.Tensor) and mask.size != image.size:
                raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x{image.size[1]}")
            image = image_tensor(image, (c, *size))
        if mask is not None and not isinstance(mask, torch.Tensor):
            mask = mask_tensor(mask, size)
        x = self.generate_tensor(prompt, class_label, scheduler, steps, guidance, seed, num_images, image=image,
                                 mask=mask, **kw)
        return [to_pil(img) for img in x]


def _per_row(t: torch.Tensor | None, n: int, ndim: int, name: str) -> torch.Tensor | None:
    """A tensor given for every row ([N, ...]) or once ([...]), as [N, ...]."""
    if t is None:
        return None
    if t.ndim == ndim - 1:
        return t.unsqueeze(0).expand(n, *t.shape)
    if t.ndim != ndim or t.shape[0] != n:
        raise ValueError(f"{name} must be [{n}, ...] (one per image) or one for all, got shape {list(t.shape)}")
    return t


def load(path: str, device: torch.device | str | None = None, bf16: bool | None = None,
         condition_cache_bytes: int = 256 * 2**20) -> Pipeline:
    """Load a model into a ready pipeline, on the GPU when there is one: a ``.safetensors`` checkpoint
    of this project, or a diffusers pipeline or model folder, pixel or latent
    (:func:`diffusion.loading.load_model`)."""
    from diffusion.loading import load_model

    dev = torch.device(device) if device is not None else default_device()
    model, prov = load_model(path, dev)
    p = Path(path)
    return Pipeline(model, dev, name=p.stem if p.is_file() else p.name, provenance=prov, bf16=bf16,
                    condition_cache_bytes=condition_cache_bytes)
