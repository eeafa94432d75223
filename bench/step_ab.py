"""Two nanochat train steps side by side on CPU: `python -m bench.step_ab --a 852f9a9 --b . [--depths 2,4] ...`

Each side is a checkout (a directory, or a commit of this repository unpacked with `git archive` into the run
directory) plus optional nanochat.Config overrides and XLA flags, so one command compares today's commit with a
branch, or two configs / runtime flags of one checkout. Each side runs in its own process (bench/step_worker.py with
PYTHONPATH = that checkout), pinned with `taskset` to the same core, XLA on one thread; after compiling and a first
step, rounds alternate A, B, A, B, ... of `--steps` steps each over one fixed batch. Reported per depth: process CPU
time per step (median, p10-p90 over rounds) and wall time of each side, B/A as the median of per-round CPU ratios
(p10-p90), and the first step's loss of each side from the same initial batch (same config and seed: equal numbers
mean the step computes the same thing). The machine's load average is recorded: CPU time is much less sensitive to
other load than wall time, but shared caches still are.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mgr.demo import Demo
from mgr.errors import UserError
from mgr.results import Results, Table

WORKER = Path(__file__).with_name("step_worker.py")
REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@dataclass
class Config:
    a: str = field(default="HEAD", metadata={"help": "side A: a checkout directory or a commit of this repository"})
    b: str = field(default=".", metadata={"help": "side B: a checkout directory or a commit"})
    a_flags: str = field(default="", metadata={"help": "side A's nanochat.Config overrides, key=value,..."})
    b_flags: str = field(default="", metadata={"help": "side B's nanochat.Config overrides, key=value,..."})
    a_xla_flags: str = field(default="", metadata={"help": "extra XLA_FLAGS of side A"})
    b_xla_flags: str = field(default="", metadata={"help": "extra XLA_FLAGS of side B"})
    depths: tuple[int, ...] = field(default=(2, 4), metadata={"help": "model depths, comma-separated"})
    sequence_len: int = field(default=256, metadata={"help": "tokens per row"})
    batch_size: int = field(default=8, metadata={"help": "rows per step"})
    recipe: str = field(default="classic", metadata={
        "help": "model recipe of both sides (checkouts from before --recipe train the classic model)",
        "choices": ("classic", "current")})
    optimizer_type: str = field(default="adamw", metadata={"help": "optimizer of both sides"})
    steps: int = field(default=3, metadata={"help": "steps per timed round"})
    rounds: int = field(default=7, metadata={"help": "A/B round pairs, alternated"})
    core: int = field(default=0, metadata={"help": "CPU core both sides are pinned to (-1: no pinning)"})


def parse_overrides(text: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"config override {item!r} is not key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = {"True": True, "False": False}.get(value, value)
    return out


def checkout(spec: str, run_dir: Path, name: str) -> tuple[Path, str]:
    """(directory to put on PYTHONPATH, label): spec itself if it is a directory, else `git archive` of the commit."""
    path = Path(spec)
    if path.is_dir():
        return path.resolve(), f"dir {path.resolve()}"
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", spec], capture_output=True, text=True)
    if rev.returncode:
        raise UserError(f"--{name} {spec!r} is neither a directory nor a commit of {REPO}")
    target = run_dir / f"checkout_{name}"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", spec], capture_output=True, check=True).stdout
    shutil.rmtree(target, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target, f"commit {rev.stdout.strip()}"


class Side:
    def __init__(self, root: Path, nc: dict, xla_flags: str, core: int, seed: int):
        env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{ONE_THREAD} {xla_flags}".strip(), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(WORKER), json.dumps({"config": nc, "vocab": 257, "seed": seed})]
        if core >= 0:
            cmd = ["taskset", "-c", str(core), *cmd]
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise UserError(f"bench worker exited with code {self.proc.wait()} (its stderr is above)")
        return json.loads(line)

    def time(self, steps: int) -> dict:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("q\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def spread(x: np.ndarray, digits: int = 0) -> str:
    return f"{np.percentile(x, 10):.{digits}f}–{np.percentile(x, 90):.{digits}f}"


def run(config: Config, ctx) -> Results:
    if config.rounds < 1 or config.steps < 1 or not config.depths:
        raise UserError("--rounds, --steps must be >= 1 and --depths non-empty")
    run_dir = Path(ctx.run_dir)
    sides = {name: checkout(getattr(config, name), run_dir, name) for name in ("a", "b")}
    overrides = {name: parse_overrides(getattr(config, f"{name}_flags")) for name in ("a", "b")}
    load_before = os.getloadavg()
    rows, metrics = [], {}
    for depth in config.depths:
        base = {"depth": depth, "sequence_len": config.sequence_len, "batch_size": config.batch_size,
                "dtype": "float32", "recipe": config.recipe, "optimizer_type": config.optimizer_type}
        procs = {}
        try:
            for name, (root, _) in sides.items():
                procs[name] = Side(root, {**base, **overrides[name]}, getattr(config, f"{name}_xla_flags"),
                                   config.core, ctx.seed)
            times = {name: [] for name in procs}
            for _ in range(config.rounds):
                for name, side in procs.items():
                    times[name].append(side.time(config.steps))
        finally:
            for side in procs.values():
                side.close()
        cpu = {n: np.array([t["cpu_ms"] for t in ts]) for n, ts in times.items()}
        wall = {n: np.array([t["wall_ms"] for t in ts]) for n, ts in times.items()}
        ratio = cpu["b"] / cpu["a"]
        for name in ("a", "b"):
            rows.append([f"d{depth}", name.upper(), np.median(cpu[name]), spread(cpu[name]), np.median(wall[name]),
                         procs[name].ready["loss"],
                         None if name == "a" else f"{np.median(ratio):.3f} ({spread(ratio, 2)})"])
        metrics[f"d{depth}"] = {"cpu_ms": {n: v.tolist() for n, v in cpu.items()},
                                "wall_ms": {n: v.tolist() for n, v in wall.items()},
                                "first_loss": {n: p.ready["loss"] for n, p in procs.items()},
                                "cpu_ratio_b_over_a_median": float(np.median(ratio))}
    load_after = os.getloadavg()
    metrics.update(sides={n: label for n, (_, label) in sides.items()}, overrides=overrides,
                   loadavg_before=load_before, loadavg_after=load_after, cpus=os.cpu_count())
    table = Table(f"nanochat train step on CPU, T={config.sequence_len}, B={config.batch_size}, fp32, "
                  f"{config.optimizer_type}, {config.recipe}; {config.rounds} rounds x {config.steps} steps",
                  ["depth", "side", "CPU ms", "p10–p90", "wall ms", "loss 1", "B/A CPU (p10–p90)"], rows,
                  note=f"ms per step; loss 1 = first step's loss. A = {sides['a'][1]} {overrides['a'] or ''}; B = {sides['b'][1]} {overrides['b'] or ''}. "
                       f"One XLA thread each, pinned to core {config.core}; load average {load_before[0]:.1f} before, "
                       f"{load_after[0]:.1f} after, on {os.cpu_count()} CPUs.")
    return Results(metrics=metrics, tables=[table])


BENCH = Demo(name="step-ab", description="two nanochat CPU train steps side by side (checkouts, configs, XLA flags)",
             config=Config, run=run, kind="bench", topic="step_ab")


def main(argv: list[str] | None = None) -> int:
    from bench import main as bench_main
    return bench_main(BENCH, sys.argv[1:] if argv is None else argv, prog="python -m bench.step_ab")


if __name__ == "__main__":
    sys.exit(main())
