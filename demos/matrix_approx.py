"""Low-rank approximation of a linear projection and of a dense MLP block: do thin factors cut the executed FLOPs
and keep the output?

Two layers with a decaying singular spectrum (mgr.structured_inputs): a dmodel x dmodel projection, and a relu²
MLP block dmodel -> expansion·dmodel -> dmodel whose two matrices are both replaced. Each weight becomes rank-r
factors of its truncated SVD, computed exactly (LAPACK) or randomized (Halko: oversampling + power iterations).
A d_in x d_out matrix then executes (x @ A) @ B, 2n·r·(d_in + d_out) FLOPs against 2n·d_in·d_out, so it saves
FLOPs only below the break-even rank d_in·d_out/(d_in + d_out). Reported per rank: executed FLOPs, time, output
error on held-out tokens and the relative weight error; and, separately, the one-off cost of each factorisation
(the exact SVD's once, since one decomposition serves every rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax.numpy as jnp

from mgr.methods import approx as A
from mgr import structured_inputs as S
from mgr import variant_bench as V
from mgr.demo import Demo
from mgr.errors import UserError
from mgr.results import Results, Table

METHODS = ("exact", "randomized")


@dataclass
class Config(V.BenchSpec):
    dmodel: int = field(default=512, metadata={
        "help": "model width: the projection is dmodel x dmodel, the MLP dmodel -> expansion·dmodel -> dmodel "
                "(ignored with --from-checkpoint)"})
    expansion: int = field(default=4, metadata={"help": "MLP hidden width / dmodel"})
    rank_fracs: tuple[float, ...] = field(default=(1 / 16, 1 / 8, 1 / 4, 1 / 2), metadata={
        "help": "ranks as fractions of dmodel (the smaller side of every matrix), comma-separated"})
    methods: tuple[str, ...] = field(default=("exact",), metadata={
        "help": "SVD methods, comma-separated: exact (LAPACK/cuSOLVER), randomized (Halko; cheaper at large sizes)"})
    oversample: int = field(default=10, metadata={"help": "randomized SVD: extra sketch columns"})
    power_iters: int = field(default=2, metadata={"help": "randomized SVD: power iterations"})

    def check(self, budget=None) -> None:
        super().check(budget)
        A.ranks_for(self.rank_fracs, 1)  # fractions in (0, 1]; the ranks need the layer's size
        if not self.methods or set(self.methods) - set(METHODS):
            raise UserError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {self.methods}")
        if self.expansion < 1 or self.oversample < 0 or self.power_iters < 0:
            raise UserError("expansion must be >= 1, oversample and power_iters >= 0")


def run(cfg: Config, ctx) -> Results:
    mlp_prob = S.make_mlp_problem(ctx.seed, cfg.dmodel, cfg.expansion * cfg.dmodel, cfg)
    lin_prob = S.make_linear_problem(ctx.seed, cfg.dmodel, cfg.dmodel, cfg)
    p = A.MLP(jnp.asarray(mlp_prob.w1_DH), jnp.asarray(mlp_prob.w2_HD))
    w = jnp.asarray(lin_prob.w_IO)
    d, h = p.w1_DH.shape
    d_in, d_out = w.shape  # dmodel x dmodel, or a real layer's W1 with --from-checkpoint
    proj = f"projection {d_in}x{d_out}"
    ranks = A.ranks_for(cfg.rank_fracs, min(d, h, d_in, d_out))

    def weight_err(f: A.LowRank, m) -> float:
        return A.relative_error(A.low_rank_weight(f), m)

    lin_variants, mlp_variants, setup = [], [], {}
    for method in cfg.methods:
        kw = dict(method=method, key=ctx.rng, oversample=cfg.oversample, power_iters=cfg.power_iters)
        lin = A.svd_low_rank_sweep(w, ranks, **kw)
        mlp, _ = A.low_rank_mlp_sweep(p, ranks, **kw)
        for r in ranks:
            lin_variants.append(V.Variant(f"{method} r={r}", A.low_rank_apply, lin[r],
                                          info={"rank": r, "weight err": weight_err(lin[r], w)}))
            mlp_variants.append(V.Variant(f"{method} r={r}", A.low_rank_mlp_apply, mlp[r], info={
                "rank": r, "W1 err": weight_err(mlp[r].up, p.w1_DH), "W2 err": weight_err(mlp[r].down, p.w2_HD)}))
        # the exact SVD computes every triplet whatever the rank: once per matrix serves the whole sweep
        for r in ranks if method == "randomized" else ranks[-1:]:
            label = f"randomized r={r}" if method == "randomized" else "exact (any rank)"
            setup[f"{proj}, {label}"] = V.setup_cost(lambda m, r=r: A.svd_low_rank(m, r, **kw), w)
            setup[f"MLP W1+W2 {d}x{h}, {label}"] = V.setup_cost(lambda q, r=r: A.low_rank_mlp(q, r, **kw)[0], p)

    bench = dict(dtype=cfg.dtype, iters=cfg.iters, warmup=cfg.warmup)
    cmp_lin = V.compare(V.Variant("dense", A.dense_apply, A.Dense(w)), lin_variants, lin_prob.x.bench,
                        lin_prob.x.val, **bench)
    cmp_mlp = V.compare(V.Variant("dense", A.mlp_apply, p), mlp_variants, mlp_prob.x.bench, mlp_prob.x.val, **bench)
    V.plot_pareto_panels({f"{proj}, {cfg.dtype}": cmp_lin.rows(),
                          f"relu² MLP {d}x{h}x{d}, {cfg.dtype}": cmp_mlp.rows()}, ctx.plot_path("pareto.png"))
    breakeven = {"projection": d_in * d_out / (d_in + d_out), "mlp": d * h / (d + h)}
    setup_rows = [[k, c["median_ms"], c["flops"], len(c["unknown"])] for k, c in setup.items()]
    return Results(
        metrics={"projection": cmp_lin.to_dict(), "mlp": cmp_mlp.to_dict(), "setup": setup,
                 "breakeven_rank": breakeven, "dmodel": d, "hidden": h, "ranks": ranks},
        tables=[cmp_lin.table(f"{proj}: dense vs truncated SVD"),
                cmp_mlp.table(f"relu² MLP block {d}x{h}x{d}: dense vs both matrices at rank r"),
                Table("factorisation cost (one-off, one timed call each)",
                      ["factorisation", "ms", "counted FLOPs", "unpriced calls"], setup_rows,
                      "SVD/QR run as LAPACK (cuSOLVER on GPU) custom calls that XLA cannot price (named in "
                      "metrics.setup): the counted FLOPs cover only the matmuls around them.")],
        notes=[f"FLOPs fall below dense only for rank < {breakeven['projection']:g} (projection) and "
               f"< {breakeven['mlp']:g} (MLP): break-even d_in·d_out/(d_in+d_out).",
               "weight err = ||W - Ŵ||_F/||W||_F; rel err = the layer's output error on held-out tokens.",
               "delivered = speedup / (dense FLOPs / variant FLOPs): 1.0 means time fell exactly as FLOPs did."])


DEMO = Demo(name="matrix-approx",
            description="truncated-SVD low rank of a projection and an MLP block: FLOPs, time and error vs rank",
            config=Config, run=run, check=Config.check, kind="benches", topic="matrix_approx")
