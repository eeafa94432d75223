"""A tiny demo for the harness tests: linear regression x_BD @ w_DH -> y_BH, trained as two variants.

``baseline`` fits all H outputs; ``cheap`` fits only the first H/2 (a sliced dense matmul, so its measured FLOPs per
step are half), which is how the tests see equal-FLOPs budgets hand the cheaper variant more steps. A huge ``--lr``
makes the loss overflow to inf/NaN on purpose, and ``--sleep-ms`` slows each step on the host so a run lasts long
enough to be interrupted or to hit a time budget.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from mgr.demo import Demo
from mgr.errors import UserError
from mgr.results import Results, Table

VARIANTS = ("baseline", "cheap")


@dataclass
class Config:
    width: int = field(default=16, metadata={"help": "input features D"})
    hidden: int = field(default=32, metadata={"help": "outputs H of the baseline (cheap fits H/2)"})
    batch: int = field(default=8, metadata={"help": "rows per batch B"})
    lr: float = field(default=0.05, metadata={"help": "SGD learning rate (1e4 diverges)"})
    sleep_ms: float = field(default=0.0, metadata={"help": "host sleep per batch, to make runs interruptible"})
    eval_every: int = field(default=5, metadata={"help": "steps between evaluations (0: only at the end)"})
    init: str = field(default="zeros", metadata={"help": "weight init", "choices": ("zeros", "normal")})
    variants: tuple[str, ...] = field(default=VARIANTS, metadata={"help": "comma-separated subset of baseline,cheap"})
    init_only: bool = field(default=False, metadata={"help": "train nothing (a sweep's shared_init run)"})
    init_from: str = field(default="", metadata={"help": "a completed run directory, recorded in the metrics"})


def matmul_flops_per_step(config: Config, variant: str) -> int:
    """Analytic dot FLOPs of one SGD step: forward x@w plus the weight gradient x.T@dy (x needs no gradient)."""
    outputs = config.hidden if variant == "baseline" else config.hidden // 2
    return 2 * 2 * config.batch * config.width * outputs


def run(config: Config, ctx) -> Results:
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown or not config.variants:
        raise UserError(f"--variants must be a non-empty subset of {','.join(VARIANTS)}, got {config.variants}")
    if config.init_only:
        return Results(metrics={"init_only": True})
    if config.init_from and '"completed"' not in (Path(config.init_from) / "summary.json").read_text():
        raise UserError(f"--init-from {config.init_from}: not a completed run")
    w_true_DH = np.random.default_rng(ctx.seed).normal(size=(config.width, config.hidden)).astype(np.float32)

    def data(index: int, outputs: int):
        x_BD = np.random.default_rng([ctx.seed, index]).normal(size=(config.batch, config.width)).astype(np.float32)
        return x_BD, x_BD @ w_true_DH[:, :outputs]

    def batch_fn(step: int, outputs: int):
        if config.sleep_ms:
            time.sleep(config.sleep_ms / 1e3)
        return data(step + 1, outputs)  # index 0 is the held-out eval batch

    def step(w_DK, batch):
        x_BD, y_BK = batch
        loss, g_DK = jax.value_and_grad(lambda w: jnp.mean((x_BD @ w - y_BK) ** 2))(w_DK)
        return w_DK - config.lr * g_DK, {"loss": loss}

    rows, final = [], {}
    for variant in config.variants:
        outputs = config.hidden if variant == "baseline" else config.hidden // 2
        w0_DK = (jnp.zeros((config.width, outputs)) if config.init == "zeros"
                 else 0.1 * jax.random.normal(ctx.rng, (config.width, outputs)))
        x_eval_BD, y_eval_BK = data(0, outputs)
        r = ctx.train(variant, step, w0_DK, lambda s, k=outputs: batch_fn(s, k),
                      eval_fn=lambda w, x=x_eval_BD, y=y_eval_BK: {"mse": jnp.mean((x @ w - y) ** 2)},
                      eval_every=config.eval_every)
        final[variant] = r.final_loss
        rows.append([variant, r.steps, r.spent_flops, r.final_loss])
    return Results(metrics={"final_loss": final, "init_from": config.init_from},
                   tables=[Table("Toy regression", ["variant", "steps", "FLOPs", "final loss"], rows)],
                   notes=["toy demo for the harness tests"])


DEMO = Demo(name="toy", description="toy regression for harness tests", config=Config, run=run,
            kind="tests", topic="toy", default_max_iterations=4, quality_metric="mse")
