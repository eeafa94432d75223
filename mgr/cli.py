"""The `mgr` command: list demos, run one under a budget, show a run, compare two runs, sweep a grid, report it."""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from pathlib import Path

from rich.console import Console

from mgr.errors import UserError
from mgr.mesh import parse_mesh

DEVICES = ("auto", "cpu", "gpu")


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print only the error, on one line, and exit 2."""

    def error(self, message: str):
        raise UserError(message)


def _positive_int(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}") from None
    # NaN and inf are checked first: int() raises on them instead of answering.
    if not math.isfinite(value) or value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(value)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def whole_number(minimum: int, below: int | None = None):
    """One rule for every count and seed: a whole number, also in float notation (1e3, 2048.0), in range."""
    def parse(text: str) -> int:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        # NaN and inf are checked first: int() raises on them instead of answering.
        if not math.isfinite(value) or value != int(value) or value < minimum or (below and value >= below):
            bound = f"in [{minimum}, {below:.4g})" if below else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be a whole number {bound}, got {text!r}")
        return int(text) if text.strip().lstrip("+").isdigit() else int(value)  # int(): exact past 2^53
    return parse


_non_negative_int = whole_number(0)


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or any(not 0 <= s < 2**32 for s in seeds):
        raise argparse.ArgumentTypeError(f"must be distinct seeds in [0, 2^32), got {text!r}")
    return seeds


def budget_from_args(args: argparse.Namespace):
    from mgr.budget import Budget
    return Budget(max_iterations=args.max_iterations, target_flops=args.target_flops, time_budget=args.time_budget,
                  warmup_steps=args.warmup_steps, target_loss=args.target_loss, stop_at_target=args.stop_at_target)


def add_run_flags(parser: argparse.ArgumentParser, *, budget: bool = True, warmup_steps: int = 1,
                  seeds: bool = False) -> None:
    """Flags every run shares: budget (unless the caller sets it, as benches do with --steps), seed, artifacts,
    device."""
    if budget:
        b = parser.add_argument_group("budget (the run stops at the first one reached)")
        b.add_argument("--max-iterations", type=_positive_int, help="training steps per variant")
        b.add_argument("--target-flops", type=_positive_float,
                       help="FLOPs per variant; steps = ceil(F / measured FLOPs per step)")
        b.add_argument("--time-budget", type=_positive_float,
                       help="seconds of training per variant (compilation and eval excluded)")
        b.add_argument("--target-loss", type=_positive_float,
                       help="quality target on the demo's validation metric (nanochat, block-update-schedule: "
                            "val_loss; matrix-gauge: eval_loss): stop at the first eval at or below it; checked "
                            "only at evals (their cadence is the resolution); the other budgets still cap the run")
        b.add_argument("--no-stop-at-target", dest="stop_at_target", action="store_false",
                       help="keep training past --target-loss, recording the crossing")
    r = parser.add_argument_group("run")
    r.add_argument("--warmup-steps", type=_non_negative_int, default=warmup_steps,
                   help=f"steps excluded from throughput figures, not from the budget (default: {warmup_steps})")
    r.add_argument("--seed", type=whole_number(0, below=2**32), default=0,
                   help="seed of the run's PRNG key and data order, in [0, 2^32) (default: 0)")
    if seeds:
        r.add_argument("--seeds", type=_seed_list, default=(),
                       help="comma-separated seeds run one after another in this run directory (replaces --seed): "
                            "per-seed results kept, every metric with its mean and 95%% CI, variants paired by "
                            "seed")
    r.add_argument("--artifacts-dir", default="artifacts", help="root of the run directories (default: artifacts)")
    r.add_argument("--artifacts-kind", help="override the demo's kind (first directory level)")
    r.add_argument("--artifacts-topic",
                   help="override the demo's topic (second directory level; may nest, e.g. fixed_flops/nanochat)")
    r.add_argument("--run-id", help="run directory name (default: YYYYMMDD_HHMMSS_mmm, unique and sortable)")
    r.add_argument("--device", choices=DEVICES, default="auto", help="JAX platform (default: auto)")
    r.add_argument("--json-out", metavar="PATH",
                   help="also write the run's summary.json to PATH (its directory is created)")
    r.add_argument("--mesh", type=parse_mesh, metavar="data=N",
                   help="devices the global batch is split over (default: all devices of the platform, across "
                        "processes; 1 device runs the single-device loop)")
    r.add_argument("--fsdp", action="store_true",
                   help="shard parameters and optimizer state along the data axis (default: replicate them)")


def launch_from_args(demo, config, args: argparse.Namespace, budget, command: list[str]) -> int:
    """Launch with the run flags of ``add_run_flags``: processes joined, then device and mesh, so nothing is
    written for a missing one."""
    import jax

    from mgr.artifacts import default_run_id
    from mgr.launcher import launch
    from mgr.mesh import agree, init_distributed, make_mesh
    init_distributed()
    select_device(args.device)
    mesh = make_mesh(args.mesh, args.fsdp)
    if budget.time_budget is not None and jax.process_count() > 1:
        # Each process would stop on its own clock, at different steps, and the collectives would hang.
        raise UserError("--time-budget is not supported across processes; use --max-iterations or --target-flops")
    code, _ = launch(demo, config, budget=budget, seed=args.seed, artifacts_dir=args.artifacts_dir,
                     run_id=agree(args.run_id or default_run_id()), kind=args.artifacts_kind,
                     topic=args.artifacts_topic, argv=command, json_out=args.json_out,
                     seeds=getattr(args, "seeds", ()), mesh=mesh)
    return code


def select_device(device: str) -> None:
    import jax
    if device == "auto":
        return
    platform = {"cpu": "cpu", "gpu": "cuda"}[device]
    jax.config.update("jax_platforms", platform)
    try:
        jax.devices()
    except Exception:  # JAX raises RuntimeError or trips an assertion, by version, when the platform is missing
        raise UserError(f"--device {device}: no {device.upper()} backend is available") from None


def _resolve_demo(name: str):
    from demos import REGISTRY, load
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown demo {name!r}; {hint}see `mgr list`")
    return load(name)


def parse_demo_args(name: str, argv: list[str], prog: str = "mgr run"):
    """(demo, config, args, budget) of a `mgr run <name> ...` command line, every value checked."""
    import dataclasses
    from mgr.flags import add_config_file_flag, add_config_flags, config_file_defaults, config_from_args
    from mgr.mesh import init_distributed

    init_distributed()  # before a demo's import could create a JAX backend
    demo = _resolve_demo(name)
    parser = OneLineParser(prog=f"{prog} {name}" if prog == "mgr run" else prog, description=demo.description)
    add_config_flags(parser, demo.config)
    # A demo with its own seeds option (matrix-gauge vmaps them in one step) keeps it; the others get --seeds.
    add_run_flags(parser, seeds="seeds" not in {f.name for f in dataclasses.fields(demo.config)})
    add_config_file_flag(parser)
    parser.set_defaults(**config_file_defaults(parser, argv))
    args = parser.parse_args(argv)
    try:
        config = config_from_args(demo.config, args)
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid options for {name}: {e}") from None
    return demo, config, args, budget_from_args(args)


def run_demo(name: str, argv: list[str], prog: str = "mgr run", command: list[str] | None = None) -> int:
    """`mgr run <name> ...`; also the entry point of `python -m nanochat.train`. ``command`` is what the run
    records as its command line (default: this process's sys.argv)."""
    demo, config, args, budget = parse_demo_args(name, argv, prog)
    return launch_from_args(demo, config, args, budget, command or [Path(sys.argv[0]).name, *sys.argv[1:]])


def guarded(fn, *args) -> int:
    """Bad input becomes one `error:` line and exit 2; Ctrl-C exit 130; never a traceback for either."""
    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def run_demo_safely(name: str, argv: list[str], prog: str) -> int:
    """Entry point of module CLIs such as `python -m nanochat.train` (the same run as `mgr run nanochat`)."""
    return guarded(run_demo, name, argv, prog, [*prog.split(), *argv])


def _list() -> int:
    from demos import REGISTRY, load
    console = Console()
    for name in REGISTRY:
        # soft_wrap: piped, each demo stays one line whatever the width
        console.print(f"[bold]{name:<26}[/bold] {load(name).description}", highlight=False, soft_wrap=True)
    return 0


def _show(run_dir: str) -> int:
    from mgr.artifacts import read_summary
    from mgr.launcher import print_summary
    summary = read_summary(run_dir)
    try:
        print_summary(summary, Console())
    except (AttributeError, TypeError, KeyError, ValueError) as e:  # a hand-edited summary of the wrong shape
        raise UserError(f"{run_dir}: a field of the summary has the wrong type ({e.__class__.__name__}: {e})") \
            from None
    return 0


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["run"]:
        if len(argv) < 2 or argv[1].startswith("-"):
            raise UserError("usage: mgr run <demo> [options]; `mgr list` shows the demos")
        return run_demo(argv[1], argv[2:], command=["mgr", *argv])
    from mgr.compare import add_compare_flags, compare_runs
    from mgr.report import add_report_flags, report_command
    from mgr.sweep import add_sweep_flags, sweep_command
    parser = OneLineParser(prog="mgr", description="Time-to-quality research harness.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sub.add_parser("list", help="list demos")
    run = sub.add_parser("run", help="run a demo under a budget (mgr run <demo> --help for its options)",
                         add_help=False)
    run.add_argument("demo")
    show = sub.add_parser("show", help="print a run's tables again")
    show.add_argument("run_dir", help="a run directory or its summary.json")
    add_compare_flags(sub.add_parser("compare", help="compare two runs metric by metric"))
    add_sweep_flags(sub.add_parser("sweep", allow_abbrev=False,
                                   help="run a grid/list of configurations of a demo (resumable, shardable); "
                                        "unknown flags are the demo's, shared by all"))
    add_report_flags(sub.add_parser("report", help="write README.md and plots for a sweep directory"))
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "sweep":
        raise UserError(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "list":
        return _list()
    if args.command == "show":
        return _show(args.run_dir)
    if args.command == "compare":
        return compare_runs(args, Console())
    if args.command == "sweep":
        return sweep_command(args, extra)
    if args.command == "report":
        return report_command(args)
    raise AssertionError(f"unhandled command {args.command!r}")


def main(argv: list[str] | None = None) -> int:
    return guarded(_dispatch, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
