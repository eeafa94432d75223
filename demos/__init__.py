"""Registry of demos: `mgr run <name>` imports the module lazily and uses its `DEMO`."""

from __future__ import annotations

import importlib

REGISTRY: dict[str, str] = {
    "matrix-gauge": "demos.matrix_gauge",
    "block-update-schedule": "demos.block_update_schedule",
    "nanochat": "nanochat.train",
    "matrix-approx": "demos.matrix_approx",
    "data-aware-low-rank": "demos.data_aware_low_rank",
    "low-rank-recovery": "demos.low_rank_recovery",
    "structured-sparsity-mlp": "demos.structured_sparsity_mlp",
    "attention-backends": "demos.attention_backends",
    "sparse-lora": "demos.sparse_lora",
}


def load(name: str):
    return importlib.import_module(REGISTRY[name]).DEMO
