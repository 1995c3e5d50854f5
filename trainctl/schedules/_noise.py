"""Torch-free re-implementation of the noise draws timm's schedulers make.

timm seeds a fresh ``torch.Generator`` with ``noise_seed + t`` and draws
``torch.randn(1)`` (or ``torch.rand(1)``) until the value is within ``noise_pct``.
The server validates and previews schedules without torch, so the exact same numbers
are produced here: torch's CPU generator is a plain MT19937 seeded with
``init_genrand``; ``randn`` on a one-element float tensor is a double Box-Muller whose
second value (``r*sin``) is cached for the next draw, rounded to float32; ``rand`` takes
the low 24 bits of one 32-bit draw.
"""
from __future__ import annotations

import math
import struct
from functools import lru_cache

_N, _M = 624, 397


class _MT19937:
    __slots__ = ("_mt", "_i")

    def __init__(self, seed: int) -> None:
        mt = [0] * _N
        mt[0] = seed & 0xFFFFFFFF
        for i in range(1, _N):
            mt[i] = (1812433253 * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i) & 0xFFFFFFFF
        self._mt = mt
        self._i = _N

    def u32(self) -> int:
        if self._i >= _N:
            mt = self._mt
            for k in range(_N):
                y = (mt[k] & 0x80000000) | (mt[(k + 1) % _N] & 0x7FFFFFFF)
                mt[k] = mt[(k + _M) % _N] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self._i = 0
        y = self._mt[self._i]
        self._i += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)

    def u53(self) -> float:
        hi, lo = self.u32(), self.u32()
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@lru_cache(maxsize=4096)
def timm_noise(seed: int, noise_type: str, pct: float, std: float) -> float:
    """The relative noise timm adds at ``t`` when seeded with ``seed = noise_seed + t``."""
    g = _MT19937(seed)
    if noise_type == "uniform":
        return 2 * (_f32((g.u32() & 0xFFFFFF) * 2.0**-24) - 0.5) * pct
    cached = None
    while True:
        if cached is not None:
            z, cached = cached, None
        else:
            u1, u2 = g.u53(), g.u53()
            r = math.sqrt(-2.0 * math.log1p(-u2))
            theta = 2.0 * math.pi * u1
            z, cached = r * math.cos(theta), r * math.sin(theta)
        noise = _f32(z) * std
        if abs(noise) < pct:
            return noise
