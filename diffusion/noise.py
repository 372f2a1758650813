"""Counter-based Gaussian noise: N(0, 1) numbers that are a pure function of (seed, counter, element).

Every random number a sampler needs is drawn here, on the device, inside the step, with no
``torch.Generator``: the number for element ``e`` of a row with seed ``s`` at counter ``c`` is

    bits_k = H(H(2p + k ⊕ K1(s, c)) ⊕ K2(s, c)),  k = 0, 1,  p = e // 2   (two 32-bit words)
    u_k    = (bits_k >> 8 + 1/2) / 2²⁴                                       (uniform in (0, 1))
    z      = sqrt(−2 ln u_0) · (cos 2πu_1 if e is even else sin 2πu_1)       (Box–Muller)

where H is Chris Wellons' ``lowbias32`` integer hash (a bijection of 32-bit words with near-ideal
avalanche) and the row keys K1, K2 chain H over the seed's two 32-bit halves and the counter. So:

- a row's noise depends only on its own seed and counter, never on its batch-mates or on the
  batch size (batch-invariant by construction);
- it needs no host synchronisation and no per-row objects, so it runs inside a compiled or
  CUDA-graph-captured step;
- the integer part is exact 64-bit arithmetic kept below 2⁶³ (32×16-bit partial products), so the
  bits are identical on every device; the floating-point tail runs in float64 and is rounded to
  float32, so CPU and GPU agree to the last bit in practice (to a float32 ulp at worst).

Counters: 0 is a row's starting noise x_T; :func:`step_counter` numbers the noise of later steps.
Seeds are taken modulo 2⁶⁴. This replaced per-row ``torch.Generator`` streams: the same seed now
gives a different (equally random) image than it did before.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_K1, _K2 = 0x9E3779B9, 0x85EBCA6B  # stream constants separating the two row keys


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a · c) mod 2³² for 32-bit words held in int64, without ever overflowing int64."""
    lo, hi = a & 0xFFFF, a >> 16
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on 32-bit words held in int64 (values in [0, 2³²))."""
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def step_counter(i: torch.Tensor, stage: torch.Tensor | int = 0) -> torch.Tensor:
    """The counter of the noise drawn at step index ``i`` (and sub-stage), never 0 (x_T's)."""
    return 1 + 8 * i + stage


def row_keys(seed: torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row from its int64 seed and counter ([B] each)."""
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32
    k = hash32(hash32(hash32((counter & _MASK32) ^ _K1) ^ hi) ^ lo)
    return k, hash32(k ^ _K2)


def gaussian(seed: torch.Tensor, counter: torch.Tensor, shape: tuple[int, ...],
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, *shape] standard normal numbers; row b is a function of (seed[b], counter[b]) alone."""
    seed = torch.as_tensor(seed, dtype=torch.long)
    counter = torch.as_tensor(counter, dtype=torch.long, device=seed.device).expand(seed.shape[0])
    k1, k2 = (k.unsqueeze(1) for k in row_keys(seed, counter))
    n = math.prod(shape)
    e = torch.arange(n, device=seed.device, dtype=torch.long).unsqueeze(0)
    p2 = (e >> 1) << 1  # 2p: both elements of a Box–Muller pair share their two words
    u0 = hash32(hash32(p2 ^ k1) ^ k2)
    u1 = hash32(hash32((p2 + 1) ^ k1) ^ k2)
    to_unit = lambda b: ((b >> 8).double() + 0.5) * (1.0 / (1 << 24))  # noqa: E731
    r = (-2.0 * to_unit(u0).log()).sqrt()
    theta = (2 * math.pi) * to_unit(u1)
    z = torch.where((e & 1) == 0, r * theta.cos(), r * theta.sin())
    return z.to(dtype).reshape(seed.shape[0], *shape)
