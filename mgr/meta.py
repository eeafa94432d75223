"""Where a run came from: command, code version, software versions and device."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict[str, Any]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": None if status is None else bool(status)}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_info() -> dict[str, Any]:
    import jax
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind, "count": jax.device_count(),
            "backend": jax.default_backend()}


# Dense bf16 peak FLOP/s by device kind, for MFU. H200/H100 SXM: 989 TFLOP/s dense bf16 (NVIDIA datasheets).
PEAK_BF16_FLOPS = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12,
                   "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12}


def peak_flops_per_s(dtype: str) -> float | None:
    """The device's datasheet dense peak for ``dtype``, where known (bf16 on the GPUs above), for MFU."""
    import jax
    return PEAK_BF16_FLOPS.get(jax.devices()[0].device_kind) if dtype == "bfloat16" else None


def peak_memory_gb() -> float | None:
    """Peak device memory allocated so far, where the backend reports it (GPU does; CPU does not)."""
    import jax
    stats = jax.local_devices()[0].memory_stats() or {}  # another process's devices report nothing here
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def run_meta(*, run_id: str, kind: str, topic: str, argv: list[str], seed: int) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kind": kind,
        "topic": topic,
        "command": shlex.join(argv),
        "argv": list(argv),
        "seed": seed,
        "git": git_info(),
        "python": sys.version.split()[0],
        "versions": {name: _version(name) for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")},
        "host": {"hostname": socket.gethostname(), "platform": platform.platform()},
        "device": device_info(),
    }
