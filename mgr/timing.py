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


def interleaved(calls: dict[Any, tuple[Callable, Any, Any]], rounds: int) -> dict[Any, Timing]:
    """ms per call of every ``(executable, state, batch)``, called in turn ``rounds`` times after one untimed call
    each: variants trained one after another saw different machine load; calls in turn share it. Each executable
    may donate its state (the step programs ctx.train ran do): a copy of it is threaded from call to call, so the
    caller's state survives."""
    states = {k: jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, st)
              for k, (_, st, _) in calls.items()}
    samples: dict[Any, list[float]] = {k: [] for k in calls}
    for r in range(rounds + 1):
        for k, (exe, _, batch) in calls.items():
            t0 = time.perf_counter()
            states[k], _ = jax.block_until_ready(exe(states[k], batch))
            if r:
                samples[k].append(1e3 * (time.perf_counter() - t0))
    return {k: Timing.from_samples(v) for k, v in samples.items()}
