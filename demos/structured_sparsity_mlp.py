"""Structured sparsity in a relu² MLP: prune whole hidden neurons, optionally 2:4 on top.

Neuron pruning keeps the keep_frac·h most important hidden neurons (by weight norms ||W1[:,i]||·||W2[i,:]|| or by
calibration activations E|act_i|·||W2[i,:]||) and gathers them, once, into a smaller dense MLP: executed FLOPs
fall to keep_frac of dense, for real. 2:4 sparsity (2 largest of every 4 weights along the input dim) halves the
matmul FLOPs only on a sparse kernel, which JAX does not have: those variants execute dense, and the table shows
their NOMINAL FLOPs (what a 2:4 kernel would execute) beside the executed ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax.numpy as jnp

from mgr.methods import approx as A
from mgr import structured_inputs as S
from mgr import variant_bench as V
from mgr.demo import Demo
from mgr.errors import UserError
from mgr.results import Results


@dataclass
class Config(V.BenchSpec):
    dmodel: int = field(default=512, metadata={"help": "MLP input/output width (ignored with --from-checkpoint)"})
    expansion: int = field(default=4, metadata={"help": "MLP hidden width / dmodel"})
    keep_fracs: tuple[float, ...] = field(default=(0.75, 0.5, 0.25), metadata={
        "help": "fractions of hidden neurons kept, comma-separated"})
    importance: tuple[str, ...] = field(default=A.IMPORTANCE, metadata={
        "help": "neuron importance, comma-separated: weight (||W1[:,i]||·||W2[i,:]||), activation (calibration "
                "E|act_i|·||W2[i,:]||)"})
    two_four: bool = field(default=True, metadata={
        "help": "also run 2:4-masked dense and pruned variants (executed dense: JAX has no 2:4 kernel)"})

    def check(self, budget=None) -> None:
        super().check(budget)
        for keep in self.keep_fracs:
            A.kept_count(keep, 1)  # fractions in (0, 1]; the counts need the layer's size
        if not self.importance or set(self.importance) - set(A.IMPORTANCE):
            raise UserError(f"importance must be a non-empty subset of {', '.join(A.IMPORTANCE)}, "
                            f"got {self.importance}")
        if not self.keep_fracs or self.expansion < 1:
            raise UserError(f"keep_fracs must be non-empty and expansion >= 1, got {self.keep_fracs} and "
                            f"{self.expansion}")


def run(cfg: Config, ctx) -> Results:
    prob = S.make_mlp_problem(ctx.seed, cfg.dmodel, cfg.expansion * cfg.dmodel, cfg)
    p = A.MLP(jnp.asarray(prob.w1_DH), jnp.asarray(prob.w2_HD))
    d, h = p.w1_DH.shape
    kept = {keep: A.kept_count(keep, h) for keep in cfg.keep_fracs}  # checks every fraction before any variant is built
    if cfg.two_four and (d % 4 or any(k % 4 for k in kept.values())):
        raise UserError(f"2:4 needs dmodel and every kept neuron count divisible by 4, got dmodel {d} and kept "
                        f"{sorted(kept.values())} of {h}: choose other --keep-fracs or pass --no-two-four")
    variants = [V.Variant("2:4", A.mlp_apply, A.sparsify_2_4(p), nominal_flops=A.nominal_2_4_flops,
                          info={"keep": 1.0, "neurons": h, "importance": None, "2:4": True})] if cfg.two_four else []
    for keep in cfg.keep_fracs:
        for imp in cfg.importance:
            small, _ = A.prune_mlp(p, keep, importance=imp, x_ND=prob.x.train)
            info = {"keep": keep, "neurons": kept[keep], "importance": imp}
            variants.append(V.Variant(f"{imp} keep={keep:g}", A.mlp_apply, small, info=info | {"2:4": False}))
            if cfg.two_four:
                variants.append(V.Variant(f"{imp} keep={keep:g} +2:4", A.mlp_apply, A.sparsify_2_4(small),
                                          nominal_flops=A.nominal_2_4_flops, info=info | {"2:4": True}))

    cmp = V.compare(V.Variant("dense", A.mlp_apply, p), variants, prob.x.bench, prob.x.val,
                    dtype=cfg.dtype, iters=cfg.iters, warmup=cfg.warmup)
    V.plot_pareto(cmp.rows(), ctx.plot_path("pareto.png"), title=f"MLP {d}x{h} neuron pruning, {cfg.dtype}")
    return Results(
        metrics={"comparison": cmp.to_dict(), "dmodel": d, "hidden": h},
        tables=[cmp.table(f"dense relu² MLP {d}x{h} vs pruned / 2:4")],
        notes=["Pruned variants execute a smaller dense MLP (kept neurons gathered once, outside the timed call).",
               "2:4 variants execute DENSE (no 2:4 kernel in JAX): 'nominal' columns are what a sparse kernel "
               "would execute (half the matmul FLOPs), not a measurement."])


DEMO = Demo(name="structured-sparsity-mlp",
            description="neuron pruning (smaller dense MLP) and 2:4 masks: FLOPs, time and output error",
            config=Config, run=run, check=Config.check, kind="benches", topic="structured_sparsity_mlp")
