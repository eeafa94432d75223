"""Wall-clock timing of jitted calls: warm-up excluded, every call blocked on, median and spread reported."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    samples_ms: tuple[float, ...]

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "Timing":
        if len(samples_ms) == 0:
            nan = float("nan")
            return cls(nan, nan, nan, ())
        arr = np.asarray(samples_ms, dtype=np.float64)
        return cls(float(np.median(arr)), float(np.percentile(arr, 10)), float(np.percentile(arr, 90)),
                   tuple(float(s) for s in arr))

    def to_dict(self, with_samples: bool = False) -> dict[str, Any]:
        out = {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms, "n": len(self.samples_ms)}
        if with_samples:
            out["samples_ms"] = list(self.samples_ms)
        return out


def measure(fn: Callable, *args, iters: int = 20, warmup: int = 3) -> Timing:
    """Time ``fn(*args)``; the first ``warmup`` calls (compilation, caches) are not part of the figures."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing.from_samples(samples)
