"""Registry of demos: `mgr run <name>` imports the module lazily and uses its `DEMO`."""

from __future__ import annotations

import importlib

REGISTRY: dict[str, str] = {
    "matrix-gauge": "demos.matrix_gauge",
    "nanochat": "nanochat.train",
}


def load(name: str):
    return importlib.import_module(REGISTRY[name]).DEMO
