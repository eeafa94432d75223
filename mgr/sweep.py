"""`mgr sweep`: a grid or list of configurations of one demo, each a normal run directory, resumable and shardable.

    mgr sweep nanochat --grid lr=1e-3,3e-3 --grid seed=0,1 --max-iterations 200
    mgr sweep --spec experiment.toml [--shard K/N] [--dry-run]

A spec file (TOML)::

    demo = "nanochat"
    name = "lr_study"             # optional: default the file's stem
    [flags]                       # shared by every configuration (any `mgr run <demo>` flag, `_` or `-`)
    max_iterations = 200
    [[config]]                    # named configurations ...
    name = "baseline"
    lr = 3e-3
    [grid]                        # ... and/or a grid (crossed with every named configuration)
    seed = [0, 1]

``shared_init = true`` (top level) gives every configuration the same initial model: the sweep first runs the
shared [flags] once with ``--init-only`` as ``artifacts/sweeps/<name>/_init/`` (skipped when that run completed,
so a resumed sweep reuses it; shards take turns under a file lock) and passes ``--init-from <that run dir>`` to
every configuration (the demo must have both flags, as nanochat does). ``[report]`` holds ``mgr report``'s options
(see mgr.report).

Configuration i runs as ``artifacts/sweeps/<name>/<config>/`` (kind "sweeps", topic the sweep's name), so every
tool that reads a run directory reads it. ``sweep.json`` in ``artifacts/sweeps/<name>/`` lists the configurations
and their status; each update is a read-modify-write under an exclusive file lock (``sweep.json.lock``) written
atomically, so shards on a shared filesystem (``--shard K/N`` runs the configurations with index ≡ K mod N, e.g.
one SLURM array task each) can fill one sweep. Rerunning the sweep skips completed configurations and reruns the
others; an earlier attempt's directory is kept, renamed ``<config>.attempt<k>``. Every configuration's flags are
checked before anything runs.

Also here: ``mean_and_spread``, the seed summary of demos that vmap their seeds (matrix-gauge).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import itertools
import json
import os
import re
import socket
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mgr.artifacts import atomic_write_json, read_json
from mgr.errors import UserError

SCHEMA = "mgr.sweep.v1"
KIND = "sweeps"
DONE = "completed"
# Flags a sweep sets itself for every configuration.
_RESERVED = ("run_id", "artifacts_dir", "artifacts_kind", "artifacts_topic", "init_from", "init_only")
INIT = "_init"  # the shared initial model's run directory (shared_init); mgr report skips names starting with _


def mean_and_spread(values) -> dict[str, float]:
    """Mean, standard deviation, min and max over seeds (or any 1-D sample)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max()),
            "n": int(arr.size)}


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    name: str
    flags: dict[str, Any]  # this configuration's own flags (named config and grid values), over the shared ones


@dataclasses.dataclass(frozen=True)
class Sweep:
    demo: str
    name: str
    shared_argv: tuple[str, ...]
    configs: tuple[SweepConfig, ...]
    report: dict = dataclasses.field(default_factory=dict)  # the spec's [report] options, for mgr report
    shared_init: bool = False
    init_from: str | None = None  # the shared init run every configuration starts from (set by run_sweep)

    def argv(self, config: SweepConfig) -> list[str]:
        init = ["--init-from", self.init_from] if self.init_from else []
        return [*self.shared_argv, *flags_to_argv(config.flags), *init]

    def init_argv(self) -> list[str]:
        return [*self.shared_argv, "--init-only"]


def flags_to_argv(flags: dict[str, Any]) -> list[str]:
    """TOML or grid values as `mgr run` flags: True → --x, False → --no-x, lists comma-joined."""
    argv: list[str] = []
    for key, value in flags.items():
        flag = "--" + str(key).replace("_", "-")
        if str(key).replace("-", "_") in _RESERVED:
            raise UserError(f"sweep configurations may not set {flag}: the sweep names their run directories")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv


def _value_name(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return re.sub(r"[^A-Za-z0-9.,+-]", "-", text)


def expand(named: list[dict[str, Any]], grid: dict[str, list]) -> tuple[SweepConfig, ...]:
    """Named configurations crossed with the grid; a grid point is named key=value_key=value."""
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"grid axis {key!r} needs a non-empty list of values")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    bases = named or [{}]
    configs = []
    for base in bases:
        base = dict(base)
        base_name = base.pop("name", None)
        if named and not base_name:
            raise UserError("every [[config]] needs a name")
        for point in points:
            label = "_".join(f"{k}={_value_name(v)}" for k, v in point.items())
            name = "_".join(p for p in (str(base_name or ""), label) if p)
            configs.append(SweepConfig(name or "default", {**base, **point}))
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"configuration names repeat: {', '.join(duplicates)}")
    for name in names:
        if name in (".", "..") or "/" in name or name.startswith("."):
            raise UserError(f"invalid configuration name {name!r}")
    return tuple(configs)


def load_spec(path: str, name: str | None, extra_argv: list[str]) -> Sweep:
    try:
        spec = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--spec {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--spec {path} is not valid TOML: {e}") from None
    keys = ("demo", "name", "flags", "config", "grid", "report", "shared_init")
    unknown = set(spec) - set(keys)
    if unknown:
        raise UserError(f"--spec {path}: unknown keys {', '.join(sorted(unknown))} ({', '.join(keys)})")
    if not isinstance(spec.get("demo"), str):
        raise UserError(f"--spec {path} needs demo = \"<name>\"")
    if not isinstance(spec.get("shared_init", False), bool):
        raise UserError(f"--spec {path}: shared_init must be true or false")
    configs = expand(list(spec.get("config", [])), dict(spec.get("grid", {})))
    return Sweep(spec["demo"], name or spec.get("name") or Path(path).stem,
                 (*flags_to_argv(dict(spec.get("flags", {}))), *extra_argv), configs, dict(spec.get("report", {})),
                 spec.get("shared_init", False))


def from_grid(demo: str, grid_args: list[str], name: str | None, extra_argv: list[str]) -> Sweep:
    grid: dict[str, list] = {}
    for item in grid_args:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UserError(f"--grid expects key=v1,v2,..., got {item!r}")
        grid[key.strip().replace("-", "_")] = [v.strip() for v in values.split(",") if v.strip()]
    configs = expand([], grid)
    digest = hashlib.sha1(json.dumps([demo, extra_argv, grid]).encode()).hexdigest()[:8]
    return Sweep(demo, name or f"{demo}-{digest}", tuple(extra_argv), configs)


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not match or not int(match[2]) > int(match[1]) >= 0:
        raise argparse.ArgumentTypeError(f"must be K/N with 0 <= K < N, got {text!r}")
    return int(match[1]), int(match[2])


# --- sweep.json: the shared record of the configurations and their status ---------------------------------------

class SweepRecord:
    def __init__(self, sweep_dir: Path):
        self.path = sweep_dir / "sweep.json"
        self.lock_path = sweep_dir / "sweep.json.lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        """The record, read and written back under an exclusive lock (safe with concurrent shards)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                record = read_json(self.path) if self.path.exists() else {}
                yield record
                atomic_write_json(self.path, record)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def init(self, sweep: Sweep) -> None:
        with self.locked() as record:
            if record and record.get("demo") != sweep.demo:
                raise UserError(f"{self.path} is a sweep of {record.get('demo')}, not {sweep.demo}: pass --name")
            record.update(schema=SCHEMA, demo=sweep.demo, name=sweep.name, shared_argv=list(sweep.shared_argv),
                          report=sweep.report)
            known = {c["name"]: c for c in record.get("configs", [])}
            for c in sweep.configs:
                entry = known.setdefault(c.name, {"name": c.name, "status": "pending", "attempts": 0})
                entry.update(flags=c.flags, argv=sweep.argv(c))
            record["configs"] = list(known.values())

    def update(self, name: str, **fields) -> None:
        with self.locked() as record:
            for c in record["configs"]:
                if c["name"] == name:
                    c.update(fields, updated=_dt.datetime.now().isoformat(timespec="seconds"))


# --- running -----------------------------------------------------------------------------------------------------

def _status_of(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _set_aside(run_dir: Path) -> Path:
    k = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.attempt{k}")).exists():
        k += 1
    run_dir.rename(aside)
    return aside


def plan_config(demo, config, budget, seed: int) -> dict:
    """The budget record of the first variant the demo trains (steps, FLOPs), compiled but not trained."""
    from mgr.artifacts import RunWriter
    from mgr.context import PlanOnly, RunContext
    with tempfile.TemporaryDirectory() as tmp:
        writer = RunWriter(tmp, "plan", "plan", "plan")
        ctx = RunContext(seed=seed, budget=budget.or_default(demo.default_iterations(config)), writer=writer,
                         quality_metric=demo.quality_metric)
        ctx.plan_only = True
        try:
            demo.run(config, ctx)
        except PlanOnly:
            pass
        finally:
            writer.close()
    return next(iter(ctx.budget_records.values()), {})


def run_sweep(sweep: Sweep, artifacts_dir: str, shard: tuple[int, int] = (0, 1), dry_run: bool = False,
              out=None) -> int:
    from mgr.cli import parse_demo_args, select_device
    from mgr.launcher import launch
    from mgr.results import fmt

    out = out or sys.stdout
    sweep_dir = Path(artifacts_dir) / KIND / sweep.name
    if sweep.shared_init:
        sweep = dataclasses.replace(sweep, init_from=os.path.abspath(sweep_dir / INIT))  # any shard's cwd
        try:
            init_args = parse_demo_args(sweep.demo, sweep.init_argv())
        except UserError as e:
            raise UserError(f"shared_init: {e}") from None
    parsed = {}
    for c in sweep.configs:  # every configuration checked before anything runs
        try:
            parsed[c.name] = parse_demo_args(sweep.demo, sweep.argv(c))
        except UserError as e:
            raise UserError(f"configuration {c.name}: {e}") from None
    devices = {args.device for _, _, args, _ in parsed.values()}
    if len(devices) > 1:
        raise UserError(f"configurations ask for different --device values: {', '.join(sorted(devices))}")
    select_device(devices.pop())
    mine = [c for i, c in enumerate(sweep.configs) if i % shard[1] == shard[0]]
    print(f"sweep {sweep.name}: {len(sweep.configs)} configurations of {sweep.demo}"
          + (f", shard {shard[0]}/{shard[1]}: {len(mine)}" if shard[1] > 1 else "") + f" -> {sweep_dir}", file=out)
    if dry_run:
        for c in mine:
            demo, config, args, budget = parsed[c.name]
            planned = plan_config(demo, config, budget, (getattr(args, "seeds", ()) or (args.seed,))[0])
            print(f"  {c.name}: {' '.join(sweep.argv(c)) or '(defaults)'}; planned {planned.get('max_steps')} "
                  f"steps x {fmt(planned.get('flops_per_step_est'))} FLOPs = "
                  f"{fmt(planned.get('planned_total_flops_est'))} FLOPs", file=out)
        return 0
    record = SweepRecord(sweep_dir)
    record.init(sweep)
    if sweep.shared_init and mine:
        outcome = _shared_init(sweep, init_args, sweep_dir, artifacts_dir, out)
        if outcome != DONE:
            print(f"shared init {outcome}: rerun the same command to retry", file=out)
            return 130 if outcome == "interrupted" else 1
    failed = 0
    for c in mine:
        run_dir = sweep_dir / c.name
        status = _status_of(run_dir)
        if status == DONE:
            print(f"skip {c.name}: completed", file=out)
            record.update(c.name, status=DONE, run_dir=str(run_dir))
            continue
        if run_dir.exists():
            aside = _set_aside(run_dir)
            print(f"rerun {c.name}: the previous attempt was {status or 'cut off before its summary'}; kept as "
                  f"{aside.name}", file=out)
        else:
            print(f"run {c.name}", file=out)
        demo, config, args, budget = parsed[c.name]
        with record.locked() as rec:
            entry = next(e for e in rec["configs"] if e["name"] == c.name)
            entry.update(status="running", host=socket.gethostname(), pid=os.getpid(), run_dir=str(run_dir),
                         attempts=entry.get("attempts", 0) + 1)
        outcome = "interrupted"
        try:
            code, summary = launch(demo, config, budget=budget, seed=args.seed, seeds=getattr(args, "seeds", ()),
                                   artifacts_dir=artifacts_dir, kind=KIND, topic=sweep.name, run_id=c.name,
                                   argv=["mgr", "sweep", sweep.demo, *sweep.argv(c)])
            outcome = summary["status"]
        except KeyboardInterrupt:
            raise
        except Exception as e:  # recorded in its summary; the sweep goes on with the next configuration
            outcome = "failed"
            print(f"failed {c.name}: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}", file=out)
        finally:
            record.update(c.name, status=outcome)
        if outcome == "interrupted":
            print(f"interrupted in {c.name}: rerun the same command to resume", file=out)
            return 130
        failed += outcome != DONE
    if failed:
        print(f"{failed} configuration(s) did not complete: rerun the same command to retry them", file=out)
    return 1 if failed else 0


def _shared_init(sweep: Sweep, parsed, sweep_dir: Path, artifacts_dir: str, out) -> str:
    """Run the shared flags once with --init-only as <sweep>/_init unless that completed; its status."""
    from mgr.launcher import launch
    run_dir = sweep_dir / INIT
    with open(sweep_dir / f"{INIT}.lock", "a") as lock:  # one shard makes it, the others wait and reuse it
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            status = _status_of(run_dir)
            if status == DONE:
                print(f"skip {INIT}: completed (the shared initial model)", file=out)
                return DONE
            if run_dir.exists():
                aside = _set_aside(run_dir)
                print(f"rerun {INIT}: the previous attempt was {status or 'cut off'}; kept as {aside.name}", file=out)
            else:
                print(f"run {INIT}: the shared initial model (--init-only)", file=out)
            demo, config, args, budget = parsed
            try:
                _, summary = launch(demo, config, budget=budget, seed=args.seed, seeds=getattr(args, "seeds", ()),
                                    artifacts_dir=artifacts_dir, kind=KIND, topic=sweep.name, run_id=INIT,
                                    argv=["mgr", "sweep", sweep.demo, *sweep.init_argv()])
                return summary["status"]
            except KeyboardInterrupt:
                raise
            except Exception as e:
                print(f"failed {INIT}: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}", file=out)
                return "failed"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def add_sweep_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("demo", nargs="?", help="demo to sweep (or demo = ... in --spec)")
    parser.add_argument("--spec", help="TOML spec: demo, [flags], [[config]] and/or [grid] (see mgr.sweep)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a grid axis over a demo or run flag (repeat for more axes); crossed")
    parser.add_argument("--name", help="sweep name: artifacts/sweeps/<name>/ (default: the spec's stem, or the demo "
                                       "and a hash of the grid and flags, so rerunning resumes it)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="K/N",
                        help="run only the configurations whose index is K mod N (one array task per shard)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the configurations and their planned steps and FLOPs (compiles, no training)")
    parser.add_argument("--artifacts-dir", default="artifacts", help="root of the run directories")


def sweep_command(args: argparse.Namespace, extra: list[str]) -> int:
    """`mgr sweep`: arguments the sweep parser does not know are the demo's flags, shared by every config."""
    if args.spec:
        if args.grid:
            raise UserError("give the grid in --spec or with --grid, not both")
        sweep = load_spec(args.spec, args.name, extra)
        if args.demo and args.demo != sweep.demo:
            raise UserError(f"--spec {args.spec} sweeps {sweep.demo}, not {args.demo}")
    else:
        if not args.demo:
            raise UserError("usage: mgr sweep <demo> --grid KEY=V1,V2 [flags] or mgr sweep --spec FILE")
        if not args.grid:
            raise UserError("mgr sweep needs at least one --grid KEY=V1,V2 (or a --spec)")
        sweep = from_grid(args.demo, args.grid, args.name, extra)
    return run_sweep(sweep, args.artifacts_dir, args.shard, args.dry_run)
