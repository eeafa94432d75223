"""Data-aware low rank: choose the rank-r factors for the activations the layer actually sees.

Plain truncated SVD minimises ||W - Ŵ||_F, treating every input direction alike. Real activations are anisotropic
(a decaying covariance spectrum, heavy tails, a few outlier channels), so the error that matters is
||X (W - Ŵ)||_F. Whitening by the Cholesky factor of XᵀX on calibration tokens makes that the plain Frobenius
error of Lᵀ W, whose truncated SVD gives the optimum Ŵ = L^{-T} [Lᵀ W]_r; an optional diagonal on top (the exact
least-squares optimum given the low-rank term) costs only 2n·min(d_in, d_out) more FLOPs. All variants at the
same rank execute the same thin matmuls, so the comparison is error at equal FLOPs, on held-out tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax.numpy as jnp

from mgr import approx as A
from mgr import structured_inputs as S
from mgr import variant_bench as V
from mgr.demo import Demo
from mgr.results import Results, Table


@dataclass
class Config(V.BenchSpec):
    d_in: int = field(default=1024, metadata={"help": "input width of the layer (ignored with --from-checkpoint)"})
    d_out: int = field(default=1024, metadata={"help": "output width of the layer (ignored with --from-checkpoint)"})
    rank_fracs: tuple[float, ...] = field(default=(1 / 32, 1 / 16, 1 / 8, 1 / 4), metadata={
        "help": "ranks as fractions of min(d_in, d_out), comma-separated"})
    damping: float = field(default=1e-4, metadata={
        "help": "lambda of the XᵀX + lambda·mean(diag)·I fallback when XᵀX is not positive definite"})
    # anisotropic activations with LLM-like outlier channels are the case this method is for
    act_beta: float = field(default=1.5, metadata={"help": "activation covariance eigenvalues ~ (i+1)^-beta"})
    heavy_tail_df: float | None = field(default=5.0, metadata={
        "help": "Student-t degrees of freedom (> 2) for heavy-tailed activations; none = Gaussian"})
    outlier_channels: int = field(default=8, metadata={"help": "activation channels scaled up by outlier_scale"})


def run(cfg: Config, ctx) -> Results:
    prob = S.make_linear_problem(ctx.seed, cfg.d_in, cfg.d_out, cfg)
    w, x_cal = jnp.asarray(prob.w_IO), jnp.asarray(prob.x.train)
    white = A.whitening(x_cal, damping=cfg.damping)
    setup = {"whitening": V.setup_cost(lambda: A.whitening(x_cal, damping=cfg.damping), jit=False)}
    cal_norm = A.activation_error(x_cal, w, jnp.zeros_like(w))  # ||X W||_F
    variants = []
    for r in A.ranks_for(cfg.rank_fracs, min(w.shape)):
        candidates = {"svd": A.svd_low_rank(w, r),
                      "data-aware": A.data_aware_low_rank(w, x_cal, r, white=white)[0],
                      "data-aware+diag": A.data_aware_low_rank(w, x_cal, r, white=white, diagonal=True)[0]}
        for method, factors in candidates.items():
            cal_err = A.activation_error(x_cal, w, A.low_rank_weight(factors)) / cal_norm
            variants.append(V.Variant(f"{method} r={r}", A.low_rank_apply, factors,
                                      info={"method": method, "rank": r, "calib err": cal_err}))
        setup[f"data-aware r={r} (given whitening)"] = V.setup_cost(
            lambda m, r=r: A.data_aware_low_rank(m, x_cal, r, white=white)[0], w)

    cmp = V.compare(V.Variant("dense", A.dense_apply, A.Dense(w)), variants, prob.x.bench, prob.x.val,
                    dtype=cfg.dtype, iters=cfg.iters, warmup=cfg.warmup)
    V.plot_pareto(cmp.rows(), ctx.plot_path("pareto.png"), title=f"data-aware low rank {w.shape}, {cfg.dtype}")
    setup_rows = [[k, c["median_ms"], c["flops"], len(c["unknown"])] for k, c in setup.items()]
    return Results(
        metrics={"comparison": cmp.to_dict(), "whitening_path": white.path, "setup": setup,
                 "shape": list(w.shape)},
        tables=[cmp.table("dense vs SVD vs data-aware low rank",
                          note=f"calib err = ||X(W-Ŵ)||/||XW|| on the {prob.x.train.shape[0]} calibration tokens "
                               "(the objective data-aware minimises); rel err on held-out tokens, vs float32 dense"),
                Table("factorisation cost (one-off)", ["step", "median ms", "counted FLOPs", "unpriced calls"],
                      setup_rows, "Cholesky/SVD are custom calls XLA cannot price; the whitening's fallback "
                      "chain runs on the host, so it is timed but not priced.")],
        notes=[f"whitening path: {white.path} (cholesky | damped | eigh).",
               "Equal rank means equal executed matmul FLOPs: compare errors row against row."])


DEMO = Demo(name="data-aware-low-rank",
            description="low rank fitted to calibration activations (whitened SVD, + diagonal) vs plain SVD",
            config=Config, run=run, kind="benches", topic="data_aware_low_rank")
