"""Low-rank approximation of one linear layer: do thin factors cut the executed FLOPs and keep the output?

A d_in x d_out weight with a decaying singular spectrum (mgr.structured_inputs) is replaced by rank-r factors of
its truncated SVD, computed exactly (LAPACK) or randomized (Halko: oversampling + power iterations). The variant
executes (x @ A) @ B, 2n·r·(d_in + d_out) FLOPs against 2n·d_in·d_out, so it saves FLOPs only below the
break-even rank d_in·d_out/(d_in + d_out). Reported per rank: executed FLOPs, time, output error on held-out
tokens, and the weight energy the rank keeps; and, separately, the one-off cost of each factorisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from mgr import approx as A
from mgr import structured_inputs as S
from mgr import variant_bench as V
from mgr.demo import Demo
from mgr.errors import UserError
from mgr.results import Results, Table

METHODS = ("exact", "randomized")


@dataclass
class Config(V.BenchSpec):
    d_in: int = field(default=1024, metadata={"help": "input width of the layer (ignored with --from-checkpoint)"})
    d_out: int = field(default=1024, metadata={"help": "output width of the layer (ignored with --from-checkpoint)"})
    rank_fracs: tuple[float, ...] = field(default=(1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2), metadata={
        "help": "ranks as fractions of min(d_in, d_out), comma-separated"})
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": "SVD methods: exact, randomized"})
    oversample: int = field(default=10, metadata={"help": "randomized SVD: extra sketch columns"})
    power_iters: int = field(default=2, metadata={"help": "randomized SVD: power iterations"})


def run(cfg: Config, ctx) -> Results:
    if not cfg.methods or set(cfg.methods) - set(METHODS):
        raise UserError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {cfg.methods}")
    prob = S.make_linear_problem(ctx.seed, cfg.d_in, cfg.d_out, cfg)
    w = jnp.asarray(prob.w_IO)
    d_in, d_out = w.shape
    energy = np.cumsum(np.linalg.svd(prob.w_IO.astype(np.float64), compute_uv=False) ** 2)
    ranks = A.ranks_for(cfg.rank_fracs, min(d_in, d_out))
    variants, setup = [], {}
    for method in cfg.methods:
        for r in ranks:
            kw = dict(method=method, key=ctx.rng, oversample=cfg.oversample, power_iters=cfg.power_iters)
            name = f"{method} r={r}"
            variants.append(V.Variant(name, A.low_rank_apply, A.svd_low_rank(w, r, **kw),
                                      info={"rank": r, "energy kept": energy[r - 1] / energy[-1]}))
            # the exact SVD computes every triplet whatever the rank: its cost is measured once
            if method == "randomized" or r == ranks[0]:
                label = name if method == "randomized" else "exact (any rank)"
                setup[label] = V.setup_cost(lambda m, r=r, kw=kw: A.svd_low_rank(m, r, **kw), w)
    setup_rows = [[k, c["median_ms"], c["flops"], len(c["unknown"])] for k, c in setup.items()]

    cmp = V.compare(V.Variant("dense", A.dense_apply, A.Dense(w)), variants, prob.x.bench, prob.x.val,
                    dtype=cfg.dtype, iters=cfg.iters, warmup=cfg.warmup)
    V.plot_pareto(cmp.rows(), ctx.plot_path("pareto.png"), title=f"low-rank {d_in}x{d_out}, {cfg.dtype}")
    breakeven = d_in * d_out / (d_in + d_out)
    return Results(
        metrics={"comparison": cmp.to_dict(), "setup": setup, "breakeven_rank": breakeven, "shape": [d_in, d_out]},
        tables=[cmp.table(f"dense vs truncated SVD, W {d_in}x{d_out}"),
                Table("factorisation cost (one-off)", ["variant", "median ms", "counted FLOPs", "unpriced calls"],
                      setup_rows, "SVD/QR run as LAPACK (cuSOLVER on GPU) custom calls that XLA cannot price "
                      "(named in metrics.setup): the counted FLOPs cover only the matmuls around them.")],
        notes=[f"FLOPs fall below dense only for rank < {breakeven:.0f} (break-even d_in·d_out/(d_in+d_out)).",
               "delivered = speedup / (dense FLOPs / variant FLOPs): 1.0 means time fell exactly as FLOPs did."])


DEMO = Demo(name="matrix-approx", description="truncated-SVD low rank of one layer: FLOPs, time and error vs rank",
            config=Config, run=run, kind="benches", topic="matrix_approx")
