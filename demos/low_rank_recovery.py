"""Low-rank recovery: how much of a low-rank layer's lost output quality does a short distillation buy back?

A dmodel x dmodel projection (--benchmark linear) and/or both weights of a relu² MLP block
dmodel -> expansion·dmodel -> dmodel (--benchmark mlp) are replaced by rank-r factors, initialised by plain
truncated SVD or data-aware (whitened) SVD on calibration tokens. Each is then distilled towards the dense
layer's outputs (Adam on the relative squared error, calibration tokens only) for --steps steps, or under the
budget flags when given (the launcher gives every training run the same budget). The fine-tuned factors execute
exactly the FLOPs of their initialisation, so the bench compares output error on held-out tokens at equal
inference cost, with the training FLOPs spent beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mgr.methods import approx as A
from mgr import structured_inputs as S
from mgr import variant_bench as V
from mgr.demo import Demo
from mgr.errors import UserError
from mgr.results import Results, Table

INITS = ("svd", "data-aware")
BENCHMARKS = {"linear": ("linear",), "mlp": ("mlp",), "both": ("linear", "mlp")}


@dataclass
class Config(V.BenchSpec):
    benchmark: str = field(default="both", metadata={
        "help": "which layer: linear (dmodel x dmodel projection), mlp (relu² block, both matrices), both",
        "choices": tuple(BENCHMARKS)})
    dmodel: int = field(default=256, metadata={"help": "model width (ignored with --from-checkpoint)"})
    expansion: int = field(default=4, metadata={"help": "MLP hidden width / dmodel"})
    rank_fracs: tuple[float, ...] = field(default=(1 / 8, 1 / 4), metadata={
        "help": "ranks of every replaced weight as fractions of dmodel, comma-separated"})
    inits: tuple[str, ...] = field(default=INITS, metadata={
        "help": "initialisations, comma-separated: svd, data-aware"})
    steps: int = field(default=300, metadata={
        "help": "distillation steps per run when no budget flag is given; --max-iterations, --target-flops "
                "or --time-budget replace it"})
    batch_size: int = field(default=256, metadata={"help": "calibration tokens per distillation step"})
    lr: float | None = field(default=None, metadata={
        "help": "Adam learning rate; none = 1e-4·256/dmodel: Adam moves every entry by ~lr while the factor "
                "entries shrink with width, and a rate too high undoes a good init"})
    eval_every: int = field(default=50, metadata={"help": "held-out error every this many steps (0: end only)"})

    def __post_init__(self):
        # read by the launcher before `run` (it becomes the default budget), so it is checked here
        if self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class Layer:
    """One benchmark: the dense layer as a variant, its low-rank apply, its tokens, and the factor sweep."""

    name: str
    full_rank: int  # dmodel: the smaller side of every replaced weight
    dense: V.Variant
    low_rank_apply: Callable
    x: S.Splits
    factors: Callable[[str, list[int]], tuple[dict, str]]  # (init, ranks) -> ({rank: factors}, whitening path)


def make_layer(name: str, cfg: Config, seed: int) -> Layer:
    if name == "linear":
        prob = S.make_linear_problem(seed, cfg.dmodel, cfg.dmodel, cfg)
        w = jnp.asarray(prob.w_IO)

        def factors(init, ranks):
            if init == "svd":
                return A.svd_low_rank_sweep(w, ranks), "svd"
            return A.data_aware_low_rank_sweep(w, prob.x.train, ranks)
        return Layer(f"projection {w.shape[0]}x{w.shape[1]}", min(w.shape),
                     V.Variant("dense", A.dense_apply, A.Dense(w)), A.low_rank_apply, prob.x, factors)
    prob = S.make_mlp_problem(seed, cfg.dmodel, cfg.expansion * cfg.dmodel, cfg)
    p = A.MLP(jnp.asarray(prob.w1_DH), jnp.asarray(prob.w2_HD))

    def factors(init, ranks):
        return A.low_rank_mlp_sweep(p, ranks, x_ND=prob.x.train if init == "data-aware" else None)
    d, h = p.w1_DH.shape
    return Layer(f"relu² MLP {d}x{h}x{d}", min(d, h), V.Variant("dense", A.mlp_apply, p), A.low_rank_mlp_apply,
                 prob.x, factors)


def make_step(apply: Callable, opt: optax.GradientTransformation, y_scale: float):
    def step(state, batch):
        def loss_fn(q):
            return jnp.mean(jnp.square(apply(q, batch["x"]) - batch["y"])) / y_scale

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state}, {"loss": loss}
    return step


def learning_rate(cfg: Config, layer: Layer) -> float:
    return cfg.lr if cfg.lr is not None else 1e-4 * 256 / layer.full_rank


def distill(layer: Layer, cfg: Config, ctx, ranks: list[int]) -> tuple[list[V.Variant], list[list], dict, dict]:
    """Every (rank, init) of one layer distilled under the run's budget: (variants before/after, table rows,
    held-out error curves, whitening paths). Steps, step times and FLOPs/step are in the launcher's training
    table (results.train)."""
    dense_fn = jax.jit(layer.dense.fn)
    x_train, x_val = jnp.asarray(layer.x.train), jnp.asarray(layer.x.val)
    # the same float32 reference compare() scores against: TF32 targets (GPU default) would be fitted as signal
    with jax.default_matmul_precision("highest"):
        y_train, y_val = dense_fn(layer.dense.params, x_train), dense_fn(layer.dense.params, x_val)
    n_train = x_train.shape[0]

    def batch_fn(step: int) -> dict:
        idx = (step * cfg.batch_size + np.arange(cfg.batch_size)) % n_train
        return {"x": x_train[idx], "y": y_train[idx]}

    val_err = jax.jit(lambda q, x, y: A.relative_error_array(layer.low_rank_apply(q, x), y))
    opt = optax.adam(learning_rate(cfg, layer))
    step = make_step(layer.low_rank_apply, opt, float(jnp.mean(jnp.square(y_train))))
    variants, rows, curves, paths = [], [], {}, {}
    for init in cfg.inits:
        factors, paths[init] = layer.factors(init, ranks)
        for r in ranks:
            name = f"{layer.name} {init} r={r}"
            res = ctx.train(name, step, {"params": factors[r], "opt": opt.init(factors[r])}, batch_fn,
                            eval_fn=lambda state: {"val_rel_err": val_err(state["params"], x_val, y_val)},
                            eval_every=cfg.eval_every)
            curves[name] = res.evals
            rows.append([name, res.spent_flops, float(val_err(factors[r], x_val, y_val)),
                         res.evals[-1][1]["val_rel_err"]])
            info = {"rank": r, "init": init}
            variants += [V.Variant(f"{init} r={r}", layer.low_rank_apply, factors[r],
                                   info=info | {"fine-tuned": False}),
                         V.Variant(f"{init} r={r} +ft", layer.low_rank_apply, res.state["params"],
                                   info=info | {"fine-tuned": True})]
    return variants, rows, curves, paths


def check(cfg: Config, budget=None) -> None:
    V.BenchSpec.check(cfg, budget)
    A.ranks_for(cfg.rank_fracs, 1)  # fractions in (0, 1]; the ranks need the layer's size
    if not cfg.inits or set(cfg.inits) - set(INITS):
        raise UserError(f"inits must be a non-empty subset of {', '.join(INITS)}, got {cfg.inits}")
    if cfg.batch_size < 1 or (cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0)) \
            or cfg.eval_every < 0 or cfg.expansion < 1:
        raise UserError(f"batch_size and expansion must be >= 1, lr a finite number > 0 and eval_every >= 0, got "
                        f"{cfg.batch_size}, {cfg.expansion}, {cfg.lr} and {cfg.eval_every}")


def run(cfg: Config, ctx) -> Results:
    metrics, tables, panels, train_rows, paths = {}, [], {}, [], {}
    for which in BENCHMARKS[cfg.benchmark]:
        layer = make_layer(which, cfg, ctx.seed)
        ranks = A.ranks_for(cfg.rank_fracs, layer.full_rank)
        variants, rows, curves, paths[which] = distill(layer, cfg, ctx, ranks)
        cmp = V.compare(layer.dense, variants, layer.x.bench, layer.x.val, dtype=cfg.dtype, iters=cfg.iters,
                        warmup=cfg.warmup)
        metrics[which] = {"comparison": cmp.to_dict(), "val_rel_err_curves": curves, "whitening_paths": paths[which],
                          "layer": layer.name, "ranks": ranks, "lr": learning_rate(cfg, layer)}
        tables.append(cmp.table(f"{layer.name}: dense vs low rank, before/after distillation"))
        panels[f"{layer.name}, {cfg.dtype}"] = cmp.rows()
        train_rows += rows
    V.plot_pareto_panels(panels, ctx.plot_path("pareto.png"))
    tables.append(Table("distillation (same budget for every run)",
                        ["run", "train FLOPs", "val err before", "val err after"],
                        train_rows, "val err: relative output error on held-out tokens (float32); Adam lr "
                        + ", ".join(f"{m['layer']} {m['lr']:.3g}" for m in metrics.values())))
    return Results(
        metrics=metrics,
        tables=tables,
        notes=["Fine-tuning changes the factors' values, not their shapes: inference FLOPs equal the init's.",
               "Distillation sees only calibration tokens; errors are on held-out tokens.",
               f"data-aware whitening paths (up/down for the MLP): {paths}"])


DEMO = Demo(name="low-rank-recovery",
            description="low-rank projection / MLP (SVD or data-aware init) distilled back towards dense",
            config=Config, run=run, check=check, kind="benches", topic="low_rank_recovery",
            default_max_iterations=lambda cfg: cfg.steps, quality_metric="val_rel_err")
