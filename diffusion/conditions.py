"""Conditioning vectors, encoded in batches and kept in a cache bounded in bytes.

A request's condition (its prompt or class, and a negative prompt) becomes the vector [D] its rows
carry (:mod:`diffusion.models.card`: the packed vector). Encoding runs the model's text encoder, so
a service encodes the new conditions of every request it admits in ONE call
(:meth:`ConditionCache.fill`), and keeps the vectors for the next request that asks for the same
condition. The bound is in bytes, not entries: a vector of this project's models is 256 floats, a
Stable Diffusion 1.5 one is a 77×768 token sequence (236 kB in float32; 4,096 of them ≈ 1 GB), an
SDXL one 77×2048 + 1280 (636 kB). The least recently used vectors go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch

Encoder = Callable[[list], "torch.Tensor | None"]  # conditions -> [N, D] (None: unconditional model)


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class ConditionCache:
    """key -> vector, least recently used first out, at most ``max_bytes`` of vectors held."""

    def __init__(self, encoder: Encoder, max_bytes: int = 256 * 2**20):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.encoder, self.max_bytes = encoder, int(max_bytes)
        self._items: OrderedDict[Hashable, torch.Tensor | None] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.encoded_batches = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The vector of one condition: from the cache, or encoded now (alone) and kept."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        return self.fill([key])[key]

    def fill(self, keys: Sequence[Hashable]) -> dict[Hashable, torch.Tensor | None]:
        """The vectors of ``keys``; those not cached are encoded together in one call of the encoder."""
        with self._lock:
            found = {}
            for k in keys:
                if k in self._items:
                    self._items.move_to_end(k)
                    found[k] = self._items[k]
            new = list(dict.fromkeys(k for k in keys if k not in found))
            self.hits += len(keys) - len(new)
        if not new:
            return found
        vectors = self.encoder(new)
        with self._lock:
            self.misses += len(new)
            self.encoded_batches += 1
            for j, k in enumerate(new):
                found[k] = None if vectors is None else vectors[j]
                self._put(k, found[k])
        return found

    def _put(self, key: Hashable, vec: torch.Tensor | None) -> None:
        size = nbytes(vec)
        if size > self.max_bytes:
            return  # larger than the whole cache: used once, not kept
        if key in self._items:
            self.bytes -= nbytes(self._items.pop(key))
        while self._items and self.bytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= nbytes(old)
        # a row of a batch keeps the batch's storage alive: keep a compact copy of its own
        self._items[key] = None if vec is None else vec.clone()
        self.bytes += size
