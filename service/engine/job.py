"""What the engine is asked to do (a :class:`GenerationSpec`), the handle of a submitted request
(a :class:`Job`), what it gives back (a :class:`GenerationResult`), and the ways it can refuse."""

from __future__ import annotations

import itertools
import math
import time
from concurrent.futures import Future, InvalidStateError
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffusion import Condition


class EngineError(RuntimeError):
    """Base class of the engine's refusals."""


class QueueFull(EngineError):
    def __init__(self, depth: int, retry_after_s: int):
        super().__init__(f"queue full ({depth} requests waiting); retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineClosed(EngineError):
    """The engine is shutting down (or stopped) and takes no more work."""


class DeadlineExceeded(EngineError):
    """The request's deadline passed before its images were done."""


class Refused(EngineError):
    """The request cannot finish by its deadline, even if it started now (the cost model's
    prediction): refused at once instead of accepted and timed out."""

    def __init__(self, predicted_s: float, deadline_s: float, retry_after_s: float, alone: bool = False):
        retry = max(1, math.ceil(retry_after_s))
        if alone:
            why = (f"cannot finish within its deadline even alone: predicted {predicted_s:.3g} s against "
                   f"{deadline_s:.3g} s; give a longer timeout_s (or fewer steps or images)")
        else:
            why = (f"cannot finish within its deadline: predicted {predicted_s:.1f} s against {deadline_s:.1f} s left "
                   f"behind the work in flight; retry in about {retry} s, or give a longer timeout_s")
        super().__init__(why)
        self.predicted_s, self.deadline_s, self.retry_after_s = predicted_s, deadline_s, retry
        self.alone = alone  # the request itself is infeasible (a 422 naming timeout_s), not the load (a 503)


class GenerationFailed(EngineError):
    """The model raised while working on this request (the engine itself goes on)."""


KINDS = ("generation", "edit", "variation")  # what a request does, for the metrics


@dataclass(frozen=True)
class GenerationSpec:
    """A fully validated request, in the engine's terms (no HTTP). An edit carries its decoded image
    (and mask) as CPU tensors in image space (see diffusion.edits; a latent model's engine batch
    encodes them into latents when the request is admitted)."""
    model: str
    condition: Condition
    scheduler: str
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    eta: float = 0.0
    clip: str = "none"
    percentile: float = 0.995
    spacing: str | None = None
    preview_every: int = 0  # >0: a preview of x̂0 every this many model evaluations (see Job.listener)
    image: torch.Tensor | None = field(default=None, repr=False)  # [C, H, W], image space ([-1, 1])
    mask: torch.Tensor | None = field(default=None, repr=False)  # [1, H, W], 1 where to repaint
    strength: float = 1.0
    jump_length: int = 0
    jump_n_sample: int = 1
    kind: str = "generation"  # one of KINDS
    negative: Condition | None = None  # a negative prompt in place of the null condition of guidance
    size: tuple[int, int] | None = None  # (height, width) of the images; None: the model's native size
    shape: tuple[int, int, int] | None = None  # the sample shape of that size; None: the model's native one
    preview_decode: bool = False  # previews decoded in full (a latent model's VAE) instead of the cheap map
    timeout_s: float | None = 120.0  # its deadline, from submission; None: no deadline (bulk work)

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    def conditions(self) -> list[Condition]:
        """Every condition the request's rows are encoded from (its own, and its negative prompt's)."""
        return [self.condition] + ([self.negative] if self.negative is not None else [])

    def edit(self) -> dict:
        """The edit's arguments, as :meth:`diffusion.Pipeline.row_request` takes them."""
        return {"image": self.image, "mask": self.mask, "strength": self.strength, "jump_length": self.jump_length,
                "jump_n_sample": self.jump_n_sample}


@dataclass(frozen=True)
class Progress:
    """A request's rows advanced: ``done`` of ``total`` model evaluations (its slowest image)."""
    done: int
    total: int
    elapsed_s: float  # since admission


@dataclass(frozen=True)
class Preview:
    """The current prediction x̂0 of every image of a request, [N, C, H, W] on the CPU (model space)."""
    done: int
    total: int
    images: torch.Tensor


@dataclass
class GenerationResult:
    images: torch.Tensor  # [N, C, H, W] on the CPU, model space (about [-1, 1]), in seed order
    queued_s: float  # submitted -> admitted into the running batch
    generating_s: float  # admitted -> last image done


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """A submitted request: its spec, timing, the rows done so far and the future its caller awaits."""
    spec: GenerationSpec
    deadline: float  # time.monotonic() after which the engine drops it (inf: no deadline)
    work: int = 0  # model evaluations per image (its plan's)
    network_rows: int = 0  # rows it adds to a forward pass (a guided image counts twice)
    predicted_s: float | None = None  # admitted: the cost model's predicted seconds to finish
    id: int = field(default_factory=lambda: next(_ids))
    future: Future = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    images: dict[int, torch.Tensor] = field(default_factory=dict)
    # Called on the engine's thread with a Progress after every iteration that advanced the request,
    # and a Preview when one is due (spec.preview_every): it must only hand the event on, never block.
    listener: Callable[[Progress | Preview], None] | None = None
    batch: str = ""  # the engine batch (model, and image size) it runs in

    @property
    def rows(self) -> int:
        return self.spec.num_images

    def cancel(self) -> None:
        """Give up on this request; the engine drops its rows at its next iteration."""
        self.future.cancel()

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def finish(self, result: GenerationResult | None = None, error: BaseException | None = None) -> bool:
        """Resolve the future once; False when the caller already gave up (cancelled)."""
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
            return True
        except InvalidStateError:
            return False
