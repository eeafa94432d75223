"""K configurations as one vmapped program vs K runs in turn: `python -m bench.vmapped_sweep [--k 8] [--steps 20]`

Configurations of nanochat that differ only in values that keep every shape — the seed (init and data order) and
the learning rate (a traced ``lr_scale`` in the state) — train as one ``jax.vmap`` of the ordinary step over a
leading configuration axis, through ``ctx.train`` like any run; then the same K configurations train one after
another (one compiled step serves them all). Both see the same batches (K loaders, one per seed). Reported: the
K sequential runs' summed median step time over the vmapped step's, the same for training seconds (data
included), and the largest difference between a configuration's final loss in the two (the programs are the same
maths, so it should be rounding only). Small models leave a device mostly idle; this ratio is what a jitted sweep
buys on it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgr.demo import Demo
from mgr.errors import UserError
from mgr.results import Results, Table
from nanochat import train as nanochat
from nanochat.tokenizer import load_tokenizer


@dataclass
class Config:
    depth: int = field(default=2, metadata={"help": "nanochat depth"})
    sequence_len: int = field(default=128, metadata={"help": "tokens per row"})
    batch_size: int = field(default=8, metadata={"help": "rows per step and configuration"})
    k: int = field(default=8, metadata={"help": "configurations (seeds run-seed .. run-seed+K-1)"})
    lrs: tuple[float, ...] = field(default=(1e-3, 3e-3), metadata={"help": "learning rates, cycled over the K"})
    steps: int = field(default=20, metadata={"help": "training steps per configuration"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype; auto = bf16 on GPU",
                                                 "choices": ("auto", "float32", "bfloat16")})


def run(config: Config, ctx) -> Results:
    if config.k < 1 or not config.lrs or min(config.lrs) <= 0:
        raise UserError("--k must be >= 1 and --lrs positive")
    nc = nanochat.Config(depth=config.depth, sequence_len=config.sequence_len, batch_size=config.batch_size,
                         dtype=config.dtype, eval_tokens=config.sequence_len)
    tokenizer = load_tokenizer("byte")
    seeds = [ctx.seed + i for i in range(config.k)]
    lrs = [config.lrs[i % len(config.lrs)] for i in range(config.k)]
    loaders = [nanochat.build_data(nc, s, tokenizer)[0] for s in seeds]
    cfg = nanochat.model_config(nc, loaders[0].vocab_size)
    graphdef, params0 = nnx.split(nanochat.build_model(nc, cfg, seeds[0]), nnx.Param)
    tx = nanochat.make_optimizer(nc, params0)
    step = nanochat.make_train_step(graphdef, tx, nc)
    states = []
    for seed, lr in zip(seeds, lrs):
        params = nnx.split(nanochat.build_model(nc, cfg, seed), nnx.Param)[1]
        states.append({**nanochat.init_state(params, tx), "lr_scale": jnp.asarray(lr / nc.lr, jnp.float32)})
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def stacked_batch(s: int) -> dict:
        return jax.tree.map(lambda *xs: np.stack(xs), *[loader(s) for loader in loaders])

    vmapped = ctx.train(f"vmapped_k{config.k}", jax.vmap(step), stacked, stacked_batch)
    one_by_one = [ctx.train(f"seed{seed}_lr{lr:g}", step, state, loader)
                  for seed, lr, state, loader in zip(seeds, lrs, states, loaders)]
    seq_ms = sum(r.step_ms.median_ms for r in one_by_one)
    seq_s = sum(r.wall_s for r in one_by_one)
    loss_diff = float(np.max(np.abs(np.asarray(vmapped.final_loss) - np.asarray([r.final_loss for r in one_by_one]))))
    metrics = {"k": config.k, "seeds": seeds, "lrs": lrs, "vmapped_step_ms": vmapped.step_ms.median_ms,
               "sequential_step_ms_sum": seq_ms, "step_time_ratio": seq_ms / vmapped.step_ms.median_ms,
               "vmapped_train_s": vmapped.wall_s, "sequential_train_s": seq_s,
               "train_time_ratio": seq_s / vmapped.wall_s, "max_final_loss_diff": loss_diff}
    rows = [[f"{config.k} configurations, vmapped", vmapped.step_ms.median_ms, vmapped.wall_s],
            [f"{config.k} configurations, one after another", seq_ms, seq_s],
            ["sequential / vmapped", metrics["step_time_ratio"], metrics["train_time_ratio"]]]
    return Results(metrics=metrics, tables=[Table(
        f"nanochat d{config.depth}: {config.k} configurations (seeds x lr {','.join(map(str, config.lrs))}), "
        f"{config.steps} steps each", ["program", "ms per step of all K (median)", "training s (data incl.)"], rows,
        note=f"largest |final loss vmapped - sequential| over the configurations: {loss_diff:.2e}")])


BENCH = Demo(name="vmapped-sweep", description="K nanochat configurations as one vmapped program vs one by one",
             config=Config, run=run, kind="bench", topic="vmapped_sweep")


def main(argv: list[str] | None = None) -> int:
    from bench import main as bench_main
    return bench_main(BENCH, sys.argv[1:] if argv is None else argv, prog="python -m bench.vmapped_sweep")


if __name__ == "__main__":
    sys.exit(main())
