"""Seed sweeps as one vmapped, jitted program: stack per-seed state on a leading axis and vmap the step."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np


def seed_keys(seeds: Sequence[int]) -> jax.Array:
    """One PRNG key per seed, stacked, so ``jax.vmap(init)(seed_keys(seeds))`` builds every seed's state at once."""
    return jax.vmap(jax.random.key)(np.asarray(seeds, dtype=np.uint32))


def vmap_step(step_fn: Callable[[Any, Any], tuple[Any, dict]], *, shared_batch: bool = False):
    """A step over stacked per-seed states. With ``shared_batch`` every seed sees the same batch."""
    return jax.vmap(step_fn, in_axes=(0, None if shared_batch else 0))


def mean_and_spread(values) -> dict[str, float]:
    """Mean, standard deviation, min and max over seeds (or any 1-D sample)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max()),
            "n": int(arr.size)}
