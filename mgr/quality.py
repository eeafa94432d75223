"""Time to quality and the decomposition of a training run's wall time.

``time_to_quality ≈ required_flops / effective_flops_per_second + pipeline_overhead``: ``ctx.train`` records, at
every eval, the step, the FLOPs spent, the training seconds and the wall seconds reached (``EvalPoint``), and times
every part of the loop that is not a step (``LoopClock``). From those this module answers when a variant reached a
target (``time_to_quality``) and how its wall time splits into steps and overheads (``decomposition``).

Evals set the resolution of a crossing: the first eval at or below the target is recorded as it is, and the
crossing is also interpolated between that eval and the one before it, linearly in log-loss (losses fall roughly
exponentially between nearby evals); FLOPs and seconds are interpolated at the same fraction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Iterator

import numpy as np

# Parts of a variant's wall time that are not training steps; see decomposition().
OVERHEADS = ("compile_s", "flops_pricing_s", "eval_s", "data_s", "hooks_s", "host_sync_s")


@dataclasses.dataclass(frozen=True)
class EvalPoint:
    step: int
    flops: float  # estimator FLOPs spent when the eval ran
    train_s: float  # training seconds (evals, hooks and compilation excluded), the time budget's clock
    wall_s: float  # seconds since the variant started, compilation, data, earlier evals and hooks included
    value: float | None  # the quality metric (mean over a vmapped seed axis)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fraction(before: float, after: float, target: float) -> float:
    if before > 0 and after > 0 and before != after:
        return (math.log(before) - math.log(target)) / (math.log(before) - math.log(after))
    return (before - target) / (before - after) if before != after else 1.0


def time_to_quality(points: list[EvalPoint], target: float | None, metric: str,
                    eval_every: int | None = None) -> dict[str, Any] | None:
    """The time_to_quality block of a variant: where its evals first reached ``target`` (None: no target)."""
    if target is None:
        return None
    block: dict[str, Any] = {"metric": metric, "target": target, "reached": False, "evals": len(points),
                             "eval_every": eval_every, "first_eval": None, "interpolated": None,
                             "steps": None, "flops": None, "train_s": None, "wall_s": None}
    for i, p in enumerate(points):
        if p.value is None or not p.value <= target:
            continue
        block.update(reached=True, first_eval=p.to_dict())
        prev = next((q for q in reversed(points[:i]) if q.value is not None), None)
        if prev is None:  # reached at the first eval: nothing to interpolate from
            at = p
        else:
            f = min(max(_fraction(prev.value, p.value, target), 0.0), 1.0)
            at = EvalPoint(*(a + f * (b - a) for a, b in zip(
                (prev.step, prev.flops, prev.train_s, prev.wall_s), (p.step, p.flops, p.train_s, p.wall_s))),
                value=target)
        block["interpolated"] = at.to_dict()
        block.update(steps=at.step, flops=at.flops, train_s=at.train_s, wall_s=at.wall_s)
        break
    return block


def value_at(points: list[EvalPoint], clock: str, at: float) -> float | None:
    """The quality metric at ``at`` seconds (``clock`` "train_s" or "wall_s") of a variant's evals, interpolated
    linearly between the evals around it: the comparison at equal time. None outside the evals' span."""
    known = [(getattr(p, clock), p.value) for p in points if p.value is not None]
    if not known or not known[0][0] <= at <= known[-1][0]:
        return None
    return float(np.interp(at, [t for t, _ in known], [v for _, v in known]))


class LoopClock:
    """Seconds spent in each named part of a loop; ``window_host_s`` is the host time since the last read
    window, taken out of that window's step time."""

    def __init__(self):
        self.buckets: dict[str, float] = dict.fromkeys(OVERHEADS, 0.0)
        self.window_host_s = 0.0

    @contextlib.contextmanager
    def timed(self, bucket: str, in_window: bool = True) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.add(bucket, dt, in_window)

    def add(self, bucket: str, seconds: float, in_window: bool = True) -> None:
        self.buckets[bucket] += seconds
        if in_window:
            self.window_host_s += seconds

    def take_window(self) -> float:
        host, self.window_host_s = self.window_host_s, 0.0
        return host


def decomposition(*, steps: int, spent_flops: float, step_samples_ms: tuple[float, ...], wall_s: float,
                  overheads: dict[str, float], required_flops: float | None = None) -> dict[str, Any]:
    """Split ``wall_s`` into step time and itemised overheads, and check the identity.

    Step time is measured apart from the wall clock: the timed steps' own times (synced windows with the host's
    time inside them removed) plus the median for the steps no window timed (warm-up, steps read with an eval),
    so the residual ``wall - (step time + overheads)`` is a real check: it holds whatever the loop did that no
    bucket timed, and shows when steps outside the timed windows ran slower than the median."""
    step_s = None
    if steps and step_samples_ms:
        timed = min(len(step_samples_ms), steps)
        step_s = 1e-3 * (sum(step_samples_ms[:timed]) + (steps - timed) * float(np.median(step_samples_ms)))
    effective = spent_flops / step_s if step_s else None
    overhead = sum(overheads.values())
    modelled = step_s + overhead if step_s is not None else None
    residual = wall_s - modelled if modelled is not None else None
    return {
        "required_flops": spent_flops if required_flops is None else required_flops,
        "spent_flops": spent_flops,
        "effective_flops_per_second": effective,
        "step_s": step_s,
        "pipeline_overhead_s": overhead,
        "overhead": dict(overheads),
        "wall_s": wall_s,
        "modelled_s": modelled,
        "residual_s": residual,
        "residual_pct": 100 * residual / wall_s if residual is not None and wall_s > 0 else None,
    }
