"""Decoding finished rows beside the forward passes, in bounded chunks.

A latent model's rows leave the denoising table as soon as they finish (their slots are free for
the next iteration's admissions), but their latents still need the VAE's decoder, which at 1024 px
costs about as much as several UNet steps and holds activations of gigabytes. So finished rows
wait here, and the engine decodes at most ONE chunk per model per iteration while other rows of
that model are in flight: an iteration's forward pass is never held back by more than one chunk's
decode, and the decoder's memory is bounded by the chunk, whatever the number of rows that finish
together. A chunk is at most ``chunk_rows`` rows (the engine sizes it from a pixel budget:
``decode_chunk_pixels`` / (H·W), at least one). With nothing else in flight, everything queued is
decoded at once, chunk after chunk.

Previews decoded in full (asked for per request) go through the same queue, after finished rows,
so they obey the same bound and never delay a result; at most one per request waits. The cheap
previews never come here. Rows of a request that has already ended (cancelled,
failed, past its deadline) are skipped, never decoded. For a pixel-space model the decode is the
identity and a chunk covers every row, so nothing waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffusion.models.card import to_device
from service.engine.job import Job


@dataclass
class DecodeWork:
    """Rows to decode: their owners (request, image index), samples on the device, and for a
    preview its (done, total)."""
    owners: list[tuple[Job, int]]
    samples: torch.Tensor
    preview: tuple[int, int] | None = None
    start: int = 0  # rows before this one are decoded
    images: list[torch.Tensor] = field(default_factory=list)  # a preview's decoded chunks so far

    @property
    def left(self) -> int:
        return len(self.owners) - self.start


# (owners, samples) -> images [k, C, H, W] in image space, on the device
Decoder = Callable[[list[tuple[Job, int]], torch.Tensor], torch.Tensor]


class DecodeQueue:
    """Finished rows first, then previews; at most one preview per request waits (a newer one
    replaces an older one not started yet: previews can be due faster than chunks are decoded)."""

    def __init__(self, decoder: Decoder, chunk_rows: int):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.decoder, self.chunk_rows = decoder, int(chunk_rows)
        self._finals: deque[DecodeWork] = deque()
        self._previews: deque[DecodeWork] = deque()
        self.chunks = 0  # decoder calls so far

    def put(self, work: DecodeWork) -> None:
        if work.preview is None:
            self._finals.append(work)
            return
        job = work.owners[0][0]
        self._previews = deque(w for w in self._previews if w.start or w.owners[0][0] is not job)
        self._previews.append(work)

    @property
    def _work(self) -> list[DecodeWork]:
        return [*self._finals, *self._previews]

    @property
    def rows(self) -> int:
        return sum(w.left for w in self._work)

    def __bool__(self) -> bool:
        return bool(self._finals or self._previews)

    def jobs(self) -> set[Job]:
        return {job for w in self._work for job, _ in w.owners[w.start:]}

    def clear(self) -> set[Job]:
        jobs = self.jobs()
        self._finals.clear()
        self._previews.clear()
        return jobs

    def step(self) -> list[tuple[list[tuple[Job, int]], torch.Tensor, tuple[int, int] | None]]:
        """Decode one chunk (at most ``chunk_rows`` rows, finished rows first); what it completes:
        finished rows as (owners, images, None), a preview once all its rows are decoded as (owners,
        images, (done, total))."""
        self._skip_ended()
        if not self:
            return []
        budget, taken = self.chunk_rows, []
        for w in self._work:
            if budget == 0:
                break
            k = min(budget, w.left)
            taken.append((w, w.start, w.start + k))
            budget -= k
        owners = [o for w, a, b in taken for o in w.owners[a:b]]
        samples = torch.cat([w.samples[a:b] for w, a, b in taken])
        images = self.decoder(owners, samples)
        self.chunks += 1
        out, at = [], 0
        for w, a, b in taken:
            part = images[at:at + b - a]
            at += b - a
            w.start = b
            if w.preview is None:
                out.append((w.owners[a:b], part, None))
            else:
                w.images.append(part)
                if not w.left:
                    out.append((w.owners, torch.cat(w.images), w.preview))
        for queue in (self._finals, self._previews):
            while queue and not queue[0].left:
                queue.popleft()
        return out

    def _skip_ended(self) -> None:
        """Drop the queued rows of requests that have ended (a preview: all of it)."""
        finals: deque[DecodeWork] = deque()
        for w in self._finals:
            alive = [j for j in range(w.start, len(w.owners)) if not w.owners[j][0].future.done()]
            if len(alive) == w.left:
                finals.append(w)
            elif alive:
                idx = to_device(torch.tensor(alive), w.samples.device)
                finals.append(DecodeWork([w.owners[j] for j in alive], w.samples.index_select(0, idx)))
        self._finals = finals
        self._previews = deque(w for w in self._previews if not w.owners[0][0].future.done())
