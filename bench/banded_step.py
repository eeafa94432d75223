"""Banded FC1/FC2 on the real nanochat training step: `python -m bench.banded_step [--depth 4] [--bandwidths ...]`.

For the dense baseline and FC1 / FC2 / FC1+FC2 banded at each bandwidth, the full nanochat train step (forward,
backward, AdamW) is built by nanochat.train, compiled once and priced by mgr.flops (XLA loop-corrected and jaxpr
matmul FLOPs), then that executable is timed on the same batch in interleaved rounds (every variant once per round,
so load on a shared machine hits all alike; warm-up calls excluded). Reported per variant: MLP density, FLOPs/step
(measured, ratio to dense, analytic ratio 6N + 12LHDT), step ms median (p10–p90 over all timed calls), speedup vs
dense and delivered = speedup × FLOPs ratio (1.0: time fell exactly as FLOPs did).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from mgr.errors import UserError
from mgr.demo import Demo
from mgr.flops import compile_and_count
from mgr.methods.banded import banded_mlp, mlp_bands
from mgr.results import Results, Table
from mgr.timing import Timing, measure
from nanochat import train as nanochat
from nanochat.model import estimate_flops


@dataclass
class Config:
    depth: int = field(default=4, metadata={"help": "nanochat depth (width 64·depth, MLP 4x)"})
    bandwidths: tuple[int, ...] = field(default=(512, 256, 128), metadata={
        "help": "bandwidths along 4C, comma-separated (each run as FC1, FC2 and FC1+FC2)"})
    sequence_len: int = field(default=256, metadata={"help": "tokens per row"})
    batch_size: int = field(default=8, metadata={"help": "rows per step"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype; auto = bf16 on GPU",
                                                 "choices": ("auto", "float32", "bfloat16")})
    steps: int = field(default=5, metadata={"help": "timed steps per variant per round"})
    rounds: int = field(default=3, metadata={"help": "interleaved rounds over all variants"})


def variants(config: Config) -> dict[str, tuple[int, int]]:
    out = {"dense": (0, 0)}
    for bw in config.bandwidths:
        out |= {f"FC1-{bw}": (bw, 0), f"FC2-{bw}": (0, bw), f"FC1+FC2-{bw}": (bw, bw)}
    return out


def run(config: Config, ctx) -> Results:
    if config.rounds < 1 or not config.bandwidths:
        raise UserError("--rounds must be >= 1 and --bandwidths non-empty")
    nc = nanochat.Config(depth=config.depth, sequence_len=config.sequence_len, batch_size=config.batch_size,
                         dtype=config.dtype)
    nanochat.check_config(nc)
    cfg = nanochat.model_config(nc, vocab_size=257)
    bands = {name: mlp_bands(cfg.n_embd, *bw) for name, bw in variants(config).items()}  # all checked first
    key = jax.random.key(ctx.seed)
    x = jax.random.randint(key, (config.batch_size, config.sequence_len), 0, cfg.vocab_size)
    batch = {"inputs_BT": x, "targets_BT": jnp.roll(x, -1, axis=1)}
    compiled = {}
    for name, (fc1, fc2) in variants(config).items():
        graphdef, params = nnx.split(nanochat.build_model(nc, cfg, ctx.seed, mlp=banded_mlp(fc1, fc2)), nnx.Param)
        tx = nanochat.make_optimizer(nc, params)
        state = nanochat.init_state(params, tx)
        record, exe = compile_and_count(jax.jit(nanochat.make_train_step(graphdef, tx, nc)), state, batch)
        compiled[name] = (exe, state, record)
    samples: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(config.rounds):
        for name, (exe, state, _) in compiled.items():
            samples[name] += measure(exe, state, batch, iters=config.steps,
                                     warmup=max(ctx.budget.warmup_steps, 1)).samples_ms
    dense_rec = compiled["dense"][2]
    dense_t = Timing.from_samples(samples["dense"])
    dense_analytic = estimate_flops(cfg)
    rows, per = [], {}
    for name, (_, _, record) in compiled.items():
        t = Timing.from_samples(samples[name])
        b = bands[name]
        ratio, speedup = record.flops / dense_rec.flops, dense_t.median_ms / t.median_ms
        analytic_ratio = estimate_flops(cfg, mlp_density=b["mlp_density"]) / dense_analytic
        per[name] = {"fc1_density": b["fc1"]["density"], "fc2_density": b["fc2"]["density"],
                     "flops": record.to_dict(), "flops_ratio": ratio, "analytic_flops_ratio": analytic_ratio,
                     "step_ms": t.to_dict(), "speedup": speedup, "delivered": speedup * ratio}
        rows.append([name, f"{b['fc1']['density']:.3f}/{b['fc2']['density']:.3f}", record.flops,
                     record.matmul_flops, ratio, analytic_ratio,
                     f"{t.median_ms:.2f} ({t.p10_ms:.2f}–{t.p90_ms:.2f})", speedup, speedup * ratio])
    table = Table(f"nanochat d{config.depth} train step, banded MLP (B={config.batch_size}, "
                  f"T={config.sequence_len}, {nanochat.compute_dtype(nc)})",
                  ["variant", "density FC1/FC2", "FLOPs/step (XLA)", "matmul FLOPs/step", "FLOPs ratio",
                   "analytic ratio", "ms/step median (p10–p90)", "speedup", "delivered"], rows,
                  note="delivered = speedup × FLOPs ratio: 1.0 means the step time fell as much as its FLOPs.")
    return Results(metrics={"variants": per, "model": cfg.__dict__},
                   tables=[table],
                   notes=[f"{config.rounds} interleaved rounds × {config.steps} timed steps per variant; warm-up "
                          f"calls excluded; device {jax.devices()[0].device_kind}",
                          "the band's gather/scatter-add are memory traffic outside the matmul FLOPs; on CPU and "
                          "for small windows they, not the matmuls, can set the step time"])


BENCH = Demo(name="banded-step", description="banded FC1/FC2: FLOPs and step time of the nanochat train step",
             config=Config, run=run, kind="bench", topic="banded_step")


def main(argv: list[str] | None = None) -> int:
    from bench import main as bench_main
    return bench_main(BENCH, sys.argv[1:] if argv is None else argv, prog="python -m bench.banded_step")


if __name__ == "__main__":
    sys.exit(main())
