"""nanochat training throughput by depth: `python -m bench.nanochat_throughput [--depths 2,4,6] [--steps 20] ...`

Each depth is a full, short nanochat run through the launcher (the same run as `python -m nanochat.train`, whose
command it records), kept under this bench's run directory in runs/nanochat/d<depth>/. The table puts side by side
what those runs measured: tokens/s and step times (warm-up excluded), achieved TFLOP/s from the FLOPs estimator,
MFU where the device's bf16 peak is known (GPU), and FLOPs per token analytic (6N + 12LHDT) vs measured.
On GPU the default dtype "auto" trains in bf16, as nanochat does.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from rich.console import Console

from mgr.budget import Budget
from mgr.demo import Demo
from mgr.errors import UserError
from mgr.launcher import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, launch
from mgr.plots import plot_curves
from mgr.results import Results, Table, fmt
from nanochat import train as nanochat
from nanochat.attention import CHOICES
from nanochat.model import GPTConfig, matmul_params


@dataclass
class Config:
    depths: tuple[int, ...] = field(default=(2, 4, 6), metadata={"help": "model depths, comma-separated"})
    sequence_len: int = field(default=256, metadata={"help": "tokens per row"})
    batch_size: int = field(default=8, metadata={"help": "rows per step"})
    steps: int = field(default=20, metadata={"help": "training steps per depth"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype; auto = bf16 on GPU",
                                                 "choices": ("auto", "float32", "bfloat16")})
    attention_type: str = field(default="auto", metadata={
        "help": "attention kernel (nanochat/attention.py); auto = probed fastest correct one", "choices": CHOICES})
    scan_layers: bool = field(default=True, metadata={"help": "run the blocks as a lax.scan"})


def nanochat_config(config: Config, depth: int) -> nanochat.Config:
    # One eval batch and a short sample at the end only, and no checkpoint: a throughput run is not resumed.
    return nanochat.Config(depth=depth, sequence_len=config.sequence_len, batch_size=config.batch_size,
                           dtype=config.dtype, attention_type=config.attention_type, scan_layers=config.scan_layers,
                           eval_every=0, eval_tokens=config.batch_size * config.sequence_len, sample_tokens=16,
                           checkpoint=False)


def command(nc: nanochat.Config, budget: Budget, seed: int) -> list[str]:
    """The `python -m nanochat.train` command that repeats one depth's run (flags that differ from defaults)."""
    argv = ["python", "-m", "nanochat.train"]
    for f in dataclasses.fields(nc):
        value, flag = getattr(nc, f.name), "--" + f.name.replace("_", "-")
        if value == f.default:
            continue
        argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return argv + ["--max-iterations", str(budget.max_iterations), "--warmup-steps", str(budget.warmup_steps),
                   "--seed", str(seed)]


def train_depth(config: Config, depth: int, ctx) -> dict:
    nc = nanochat_config(config, depth)
    code, summary = launch(nanochat.DEMO, nc, budget=ctx.budget, seed=ctx.seed, artifacts_dir=str(ctx.run_dir),
                           run_id=f"d{depth}", kind="runs", topic="nanochat", argv=command(nc, ctx.budget, ctx.seed),
                           console=Console(quiet=True), mesh=ctx.mesh)
    if code == EXIT_TERMINATED:
        raise Terminated(f"depth {depth} terminated")
    if code == EXIT_INTERRUPTED:
        raise KeyboardInterrupt(f"depth {depth} interrupted")
    return summary


def check(config: Config, budget: Budget) -> None:
    # Each depth's run directory is named d<depth>, so a repeated depth would collide after its training.
    if not config.depths or min(config.depths) < 1 or len(set(config.depths)) != len(config.depths):
        raise UserError(f"--depths needs distinct depths >= 1, got {','.join(map(str, config.depths)) or 'none'}")
    for depth in config.depths:  # every depth's options are checked before hours of training start
        nanochat.check_config(nanochat_config(config, depth), budget)


def run(config: Config, ctx) -> Results:
    rows, per_depth, notes = [], {}, []
    for depth in config.depths:
        ctx.console.print(f"depth {depth}: training {config.steps} steps ...", highlight=False)
        summary = train_depth(config, depth, ctx)
        r = summary["results"]
        t = r["train"]["nanochat"]
        cfg = GPTConfig(**r["model"])
        params = matmul_params(cfg) + cfg.vocab_size * cfg.n_embd  # + the embedding table, which is a gather
        tokens = r["tokens_per_step"]
        step = t["step_ms"]
        row = {
            "depth": depth, "params": params, "tokens_per_second": r["tokens_per_second"],
            "step_ms": step, "tflops_per_second_est": r["tflops_per_second_est"], "mfu": r["mfu"],
            "mfu_analytic": r["mfu_analytic"], "attention": r["attention"]["chosen"],
            "flops_per_token_analytic": r["flops_per_token_analytic"],
            "matmul_flops_per_token_measured": r["matmul_flops_per_step_measured"] / tokens,
            "xla_flops_per_token_measured": r["flops_per_step_measured"] / tokens,
            "peak_memory_allocated_gb": r["peak_memory_allocated_gb"], "compute_dtype": r["compute_dtype"],
            "status": summary["status"], "run_dir": summary["run_dir"],
        }
        per_depth[f"d{depth}"] = row
        rows.append([depth, params, row["tokens_per_second"],
                     f"{fmt(step['median_ms'])} ({fmt(step['p10_ms'])}–{fmt(step['p90_ms'])})",
                     row["tflops_per_second_est"], row["mfu"], row["mfu_analytic"], row["attention"],
                     row["flops_per_token_analytic"],
                     row["matmul_flops_per_token_measured"],
                     row["matmul_flops_per_token_measured"] / row["flops_per_token_analytic"],
                     row["xla_flops_per_token_measured"], row["peak_memory_allocated_gb"]])
        if summary["status"] != "completed":
            notes.append(f"d{depth} ended {summary['status']}: {summary['error']}")
    depths = list(per_depth.values())
    plot_curves(ctx.plot_path("tokens_per_second_vs_params.png"),
                {"tokens/s": ([d["params"] for d in depths], [_nan_if_none(d["tokens_per_second"]) for d in depths])},
                xlabel="parameters", ylabel="training tokens/s", logx=True, title="nanochat throughput by depth")
    dtype = depths[0]["compute_dtype"] if depths else config.dtype
    if config.steps <= max(ctx.budget.warmup_steps, 1):
        notes.append(f"{config.steps} step(s) per depth are all warm-up (--warmup-steps "
                     f"{ctx.budget.warmup_steps}): a smoke run, no step times or throughput")
    notes += [f"compute dtype {dtype}; {config.steps} steps per depth, step times exclude the first "
              f"{ctx.budget.warmup_steps} and the final eval",
              "MFU needs the device's dense bf16 peak (known GPUs in mgr/meta.py); it is — on CPU and in fp32",
              f"each depth's full nanochat run (losses, samples, plot): {ctx.run_dir}/runs/nanochat/d<depth>/"]
    table = Table(f"nanochat throughput, T={config.sequence_len}, batch {config.batch_size}",
                  ["depth", "params", "tokens/s", "ms/step median (p10–p90)", "TFLOP/s (est.)", "MFU",
                   "MFU analytic", "attention", "FLOPs/token analytic", "matmul FLOPs/token measured",
                   "measured/analytic", "FLOPs/token (mgr.flops, all ops)", "peak GB"], rows,
                  note="analytic = 6N + 12·L·H·Dh·T (MFU analytic uses it; MFU uses the estimator's FLOPs, which "
                       "price cuDNN/Pallas attention analytically); matmul measured = the estimator's matmul count "
                       "of the compiled step; mgr.flops = all ops incl. elementwise, softmax and optimizer.")
    return Results(metrics={"depths": per_depth, "compute_dtype": dtype}, tables=[table], notes=notes)


def _nan_if_none(value):
    return float("nan") if value is None else value


BENCH = Demo(name="nanochat-throughput", description="nanochat training throughput, TFLOP/s and MFU by depth",
             config=Config, run=run, check=check, kind="bench", topic="nanochat_throughput")


def main(argv: list[str] | None = None) -> int:
    from bench import main as bench_main
    return bench_main(BENCH, sys.argv[1:] if argv is None else argv, prog="python -m bench.nanochat_throughput")


if __name__ == "__main__":
    sys.exit(main())
