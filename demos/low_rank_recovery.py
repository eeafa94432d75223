"""Low-rank recovery: how much of a low-rank MLP's lost output quality does a short distillation buy back?

Both weights of a relu² MLP are replaced by rank-r factors, initialised by plain truncated SVD or data-aware
(whitened) SVD on calibration tokens. Each is then distilled towards the dense MLP's outputs (Adam on the
relative squared error, calibration tokens only) under the run's budget, which the launcher gives every
training run alike. The fine-tuned factors execute exactly the FLOPs of their initialisation, so the bench
compares output error on held-out tokens at equal inference cost, with the training FLOPs spent beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mgr import approx as A
from mgr import structured_inputs as S
from mgr import variant_bench as V
from mgr.demo import Demo
from mgr.errors import UserError
from mgr.results import Results, Table

INITS = ("svd", "data-aware")


@dataclass
class Config(V.BenchSpec):
    d_model: int = field(default=256, metadata={"help": "MLP input/output width (ignored with --from-checkpoint)"})
    d_hidden: int = field(default=1024, metadata={"help": "MLP hidden width (ignored with --from-checkpoint)"})
    rank_fracs: tuple[float, ...] = field(default=(1 / 8, 1 / 4), metadata={
        "help": "ranks of both weights as fractions of d_model, comma-separated"})
    inits: tuple[str, ...] = field(default=INITS, metadata={"help": "initialisations: svd, data-aware"})
    batch_size: int = field(default=256, metadata={"help": "calibration tokens per distillation step"})
    lr: float = field(default=1e-4, metadata={
        "help": "Adam learning rate (higher rates undo a good init: the factor entries are small)"})
    eval_every: int = field(default=50, metadata={"help": "held-out error every this many steps (0: end only)"})


def make_step(opt: optax.GradientTransformation, y_scale: float):
    def step(state, batch):
        def loss_fn(q):
            return jnp.mean(jnp.square(A.low_rank_mlp_apply(q, batch["x"]) - batch["y"])) / y_scale

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state}, {"loss": loss}
    return step


def run(cfg: Config, ctx) -> Results:
    if not cfg.inits or set(cfg.inits) - set(INITS):
        raise UserError(f"inits must be a non-empty subset of {', '.join(INITS)}, got {cfg.inits}")
    if cfg.batch_size < 1 or cfg.lr <= 0 or cfg.eval_every < 0:
        raise UserError("batch_size must be >= 1, lr > 0 and eval_every >= 0")
    prob = S.make_mlp_problem(ctx.seed, cfg.d_model, cfg.d_hidden, cfg)
    p = A.MLP(jnp.asarray(prob.w1_DH), jnp.asarray(prob.w2_HD))
    x_train, x_val = jnp.asarray(prob.x.train), jnp.asarray(prob.x.val)
    y_train, y_val = jax.jit(A.mlp_apply)(p, x_train), jax.jit(A.mlp_apply)(p, x_val)
    n_train = x_train.shape[0]

    def batch_fn(step: int) -> dict:
        idx = (step * cfg.batch_size + np.arange(cfg.batch_size)) % n_train
        return {"x": x_train[idx], "y": y_train[idx]}

    def eval_fn(state) -> dict:
        return {"val_rel_err": A.relative_error_array(A.low_rank_mlp_apply(state["params"], x_val), y_val)}

    opt = optax.adam(cfg.lr)
    step = make_step(opt, float(jnp.mean(jnp.square(y_train))))
    variants, train_rows, training, paths = [], [], {}, {}
    for r in A.ranks_for(cfg.rank_fracs, min(p.w1_DH.shape)):
        for init in cfg.inits:
            factors, paths[f"{init} r={r}"] = A.low_rank_mlp(p, r, x_ND=x_train if init == "data-aware" else None)
            name = f"{init} r={r}"
            res = ctx.train(name, step, {"params": factors, "opt": opt.init(factors)}, batch_fn,
                            eval_fn=eval_fn, eval_every=cfg.eval_every)
            training[name] = {**res.summary(), "evals": res.evals}
            before = A.relative_error(A.low_rank_mlp_apply(factors, x_val), y_val)
            train_rows.append([name, res.steps, res.spent_flops, res.step_ms.median_ms, before,
                               res.evals[-1][1]["val_rel_err"]])
            info = {"rank": r, "init": init}
            variants += [V.Variant(name, A.low_rank_mlp_apply, factors, info=info | {"fine-tuned": False}),
                         V.Variant(f"{name} +ft", A.low_rank_mlp_apply, res.state["params"],
                                   info=info | {"fine-tuned": True})]

    cmp = V.compare(V.Variant("dense", A.mlp_apply, p), variants, prob.x.bench, prob.x.val,
                    dtype=cfg.dtype, iters=cfg.iters, warmup=cfg.warmup)
    d, h = p.w1_DH.shape
    V.plot_pareto(cmp.rows(), ctx.plot_path("pareto.png"), title=f"low-rank MLP {d}x{h} + distillation")
    return Results(
        metrics={"comparison": cmp.to_dict(), "training": training, "whitening_paths": paths,
                 "d_model": d, "d_hidden": h},
        tables=[cmp.table(f"dense relu² MLP {d}x{h} vs low rank, before/after distillation"),
                Table("distillation (same budget for every run)",
                      ["run", "steps", "train FLOPs", "step ms", "val err before", "val err after"], train_rows)],
        notes=["Fine-tuning changes the factors' values, not their shapes: inference FLOPs equal the init's.",
               "Distillation sees only calibration tokens; errors are on held-out tokens.",
               f"data-aware whitening paths (up/down): {paths}"])


DEMO = Demo(name="low-rank-recovery",
            description="low-rank MLP (SVD / data-aware init) distilled back towards dense under a budget",
            config=Config, run=run, kind="benches", topic="low_rank_recovery", default_max_iterations=300)
