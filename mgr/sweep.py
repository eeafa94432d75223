"""Summaries of seed sweeps (a demo trains its seeds as one vmapped, jitted step with a leading seed axis)."""

from __future__ import annotations

import numpy as np


def mean_and_spread(values) -> dict[str, float]:
    """Mean, standard deviation, min and max over seeds (or any 1-D sample)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max()),
            "n": int(arr.size)}
