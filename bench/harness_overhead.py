"""What the training harness costs per step: `python -m bench.harness_overhead [--depth 2] [--steps 10] [--rounds 20]`

One nanochat train step, compiled the way the harness compiles it (jit with state donation, ahead of time), runs
the same number of steps on the same pre-built device batches twice per round:

* bare:    a plain Python loop over the compiled step, blocking once at the end;
* harness: ``ctx.train`` with everything on (budget tracking, metrics read in windows of ``ctx.sync_every`` steps
           and streamed to metrics.jsonl, NaN check, step timing).

Per-step time is the wall time of the whole loop over the step count; rounds alternate the two. The overhead is
fastest round over fastest round, minus one: other load on the machine only adds time, so the fastest rounds are the
least disturbed. Also reported: the median of per-round ratios, process CPU time per step, and the harness's own
host work measured directly, as the same two loops around a step with no device work (microseconds per step).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgr.artifacts import RunWriter
from mgr.budget import Budget
from mgr.context import RunContext
from mgr.demo import Demo
from mgr.errors import UserError
from mgr.flops import compile_and_count
from mgr.results import Results, Table
from nanochat import train as nanochat
from nanochat.tokenizer import load_tokenizer

TARGET_OVERHEAD = 0.02


@dataclass
class Config:
    depth: int = field(default=2, metadata={"help": "nanochat depth of the timed step"})
    sequence_len: int = field(default=128, metadata={"help": "tokens per row"})
    batch_size: int = field(default=4, metadata={"help": "rows per step"})
    steps: int = field(default=10, metadata={"help": "steps per timed loop"})
    rounds: int = field(default=20, metadata={"help": "bare/harness pairs, alternated"})
    host_cost_steps: int = field(default=2000, metadata={"help": "steps per loop around the no-op step"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype; auto = bf16 on GPU",
                                                 "choices": ("auto", "float32", "bfloat16")})


def build_step(config: Config, seed: int):
    """(step_fn, initial state, batch_fn over pre-built device batches) for a synthetic-data nanochat step."""
    # attention pinned to "xla": both loops run the same step, and auto's probe would only add start-up time
    nc = nanochat.Config(depth=config.depth, sequence_len=config.sequence_len, batch_size=config.batch_size,
                         dtype=config.dtype, eval_tokens=config.sequence_len, attention_type="xla")
    loader, _ = nanochat.build_data(nc, seed, load_tokenizer("byte"))
    # Batches are built up front: the data pipeline is the same work in both loops and not the harness's cost.
    batches = [jax.device_put(loader(s)) for s in range(config.steps)]
    model = nanochat.build_model(nc, nanochat.model_config(nc, loader.vocab_size), seed)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = nanochat.make_optimizer(nc, params)
    state = nanochat.init_state(params, tx)
    state["total_steps"] = jnp.asarray(config.steps, jnp.int32)
    return nanochat.make_train_step(graphdef, tx, nc), state, batches.__getitem__


def bare_loop(executable, state, batch_fn, steps: int) -> tuple[float, float]:
    """(wall, process CPU) milliseconds per step of a plain loop over ``executable``, one sync at the end."""
    state = jax.tree.map(lambda x: x.copy(), state)  # the executable donates its state
    wall, cpu = time.perf_counter(), time.process_time()
    for s in range(steps):
        state, metrics = executable(state, batch_fn(s))
    jax.block_until_ready((state, metrics))
    return 1e3 * (time.perf_counter() - wall) / steps, 1e3 * (time.process_time() - cpu) / steps


def alternate(ctx, name: str, step_fn, state, batch_fn, rounds: int) -> tuple[dict[str, np.ndarray], list]:
    """Per-round ms/step {"bare_wall", "bare_cpu", "harness_wall", "harness_cpu"} and the TrainResults, over
    ``rounds`` alternated pairs of loops of ``ctx.budget.max_iterations`` steps. Both run
    `jax.jit(step_fn, donate_argnums=0)` compiled ahead of time with compile_and_count, as the harness compiles it."""
    _, executable = compile_and_count(jax.jit(step_fn, donate_argnums=0), state, batch_fn(0))
    steps = ctx.budget.max_iterations
    bare_loop(executable, state, batch_fn, min(3, steps))  # first-call costs, outside every timing
    times, results = {k: [] for k in ("bare_wall", "bare_cpu", "harness_wall", "harness_cpu")}, []
    for i in range(rounds):
        wall, cpu = bare_loop(executable, state, batch_fn, steps)
        times["bare_wall"].append(wall)
        times["bare_cpu"].append(cpu)
        cpu = time.process_time()
        results.append(ctx.train(f"{name}_{i}", step_fn, state, batch_fn))
        times["harness_cpu"].append(1e3 * (time.process_time() - cpu) / results[-1].steps)
        times["harness_wall"].append(1e3 * results[-1].wall_s / results[-1].steps)
    return {k: np.array(v) for k, v in times.items()}, results


def noop_step(state, batch):
    """A step with no device work and nanochat's metrics (three scalars): what is left is host cost."""
    x = state["x"] + batch["b"]
    return {"x": x}, {"loss": x.sum(), "grad_norm": x.mean(), "lr_mult": x[0]}


def host_cost_us(ctx, steps: int, rounds: int) -> tuple[float, float]:
    """(bare, ctx.train) wall microseconds per step around the no-op step, fastest rounds. Its own context (and
    budget) under <run_dir>/host_cost/, so the thousands of steps it needs leave the main record alone."""
    writer = RunWriter(ctx.run_dir, "host_cost", "noop_step", "run")
    noop_ctx = RunContext(seed=ctx.seed, budget=Budget(max_iterations=steps, warmup_steps=1), writer=writer,
                          console=ctx.console)
    batch = jax.device_put({"b": np.ones((8,), np.float32)})
    try:
        times, _ = alternate(noop_ctx, "noop", noop_step, {"x": jnp.zeros((8,))}, lambda s: batch, rounds)
    finally:
        writer.close()
    return 1e3 * times["bare_wall"].min(), 1e3 * times["harness_wall"].min()


def run(config: Config, ctx) -> Results:
    for name in ("rounds", "host_cost_steps"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    step_fn, state, batch_fn = build_step(config, ctx.seed)
    t, results = alternate(ctx, "harness", step_fn, state, batch_fn, config.rounds)
    # Other load only ever adds time, so the fastest rounds are the least disturbed estimate of each loop's cost.
    overhead = t["harness_wall"].min() / t["bare_wall"].min() - 1
    overhead_paired = float(np.median(t["harness_wall"] / t["bare_wall"])) - 1
    cpu_overhead = float(np.median(t["harness_cpu"] / t["bare_cpu"])) - 1
    bare_us, harness_us = host_cost_us(ctx, config.host_cost_steps, min(config.rounds, 5))
    host_share = (harness_us - bare_us) / 1e3 / t["bare_wall"].min()
    rows = [[label, t[f"{k}_wall"].min(), np.median(t[f"{k}_wall"]), t[f"{k}_wall"].max(), np.median(t[f"{k}_cpu"]),
             us] for label, k, us in (("bare loop (sync at end)", "bare", bare_us),
                                      ("ctx.train (metrics, budget, artifacts)", "harness", harness_us))]
    table = Table(f"harness overhead, nanochat d{config.depth}, T={config.sequence_len}, batch {config.batch_size}, "
                  f"{config.steps} steps x {config.rounds} rounds",
                  ["loop", "ms/step fastest round", "median", "slowest", "CPU ms/step median",
                   "µs/step around a no-op step"], rows,
                  note=f"overhead {100 * overhead:+.2f}% "
                       f"(fastest rounds; target within ±{100 * TARGET_OVERHEAD:.0f}%), "
                       f"{100 * overhead_paired:+.2f}% (median of paired rounds), CPU time {100 * cpu_overhead:+.2f}%; "
                       f"harness host work {harness_us - bare_us:.0f} µs/step = {100 * host_share:.2f}% of the step. "
                       "ms/step = loop wall time / steps; CPU = process time, all threads.")
    within = abs(overhead) <= TARGET_OVERHEAD
    metrics = {"overhead": overhead, "overhead_paired_median": overhead_paired, "cpu_overhead": cpu_overhead,
               "within_target": within, "ms_per_step_rounds": t,
               "host_cost_us_per_step": {"bare": bare_us, "harness": harness_us, "share_of_step": host_share},
               "flops_per_step": results[0].flops_per_step}
    notes = [] if within else [
        f"overhead {100 * overhead:+.2f}% is outside ±{100 * TARGET_OVERHEAD:.0f}% although the harness's host work "
        f"is {100 * host_share:.2f}% of a step; with rounds this spread the machine was busy: rerun on an idle one"]
    return Results(metrics=metrics, tables=[table], notes=notes)


BENCH = Demo(name="harness-overhead", description="per-step cost of ctx.train against a bare loop over the same step",
             config=Config, run=run, kind="bench", topic="harness_overhead")


def main(argv: list[str] | None = None) -> int:
    from bench import main as bench_main
    return bench_main(BENCH, sys.argv[1:] if argv is None else argv, prog="python -m bench.harness_overhead")


if __name__ == "__main__":
    sys.exit(main())
