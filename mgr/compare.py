"""`mgr compare`: every numeric result the two runs share, with relative deltas and regression thresholds."""

from __future__ import annotations

import argparse
import math
from typing import Any, Iterator

from rich.console import Console
from rich.table import Table as RichTable

from mgr.artifacts import read_summary
from mgr.results import fmt

# (category, direction) by key suffix: +1 means higher is better, -1 lower is better.
_RULES: tuple[tuple[str, str, int], ...] = (
    ("tflops_per_s", "throughput", +1), ("tokens_per_second", "throughput", +1), ("mfu", "throughput", +1),
    ("median_ms", "throughput", -1),
    ("loss", "loss", -1), ("bpb", "loss", -1), ("error", "loss", -1),
    ("memory_gb", "memory", -1), ("memory", "memory", -1),
)
# Key segments that are presentation, estimator records or spread, not metrics to compare. Whole segments are
# matched, so a variant named "notes" or "narrow" is still compared.
_SKIP = frozenset({"tables", "notes", "plots", "flops", "p10_ms", "p90_ms", "samples_ms", "n"})


def _compared(key: str) -> bool:
    return _SKIP.isdisjoint(key.split("."))


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a fraction >= 0, got {text!r}")
    return value


def add_compare_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("baseline", help="baseline run directory")
    parser.add_argument("candidate", help="candidate run directory")
    parser.add_argument("--throughput-tolerance", type=_tolerance, default=0.05,
                        help="allowed relative throughput loss before it counts as a regression (default 0.05)")
    parser.add_argument("--loss-tolerance", type=_tolerance, default=0.02,
                        help="allowed relative loss/error increase (default 0.02)")
    parser.add_argument("--memory-tolerance", type=_tolerance, default=0.10,
                        help="allowed relative peak-memory increase (default 0.10)")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 if any metric regresses")


def flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(tree):
        yield prefix, float(tree)


def classify(key: str) -> tuple[str, int] | None:
    for suffix, category, direction in _RULES:
        if key.endswith(suffix) or key.split(".")[-1].startswith(suffix):
            return category, direction
    return None


def _load(run_dir: str) -> dict:
    return read_summary(run_dir)


def compare_runs(args: argparse.Namespace, console: Console) -> int:
    base, cand = _load(args.baseline), _load(args.candidate)
    base_flat = {k: v for k, v in flatten(base.get("results", {})) if _compared(k)}
    cand_flat = {k: v for k, v in flatten(cand.get("results", {})) if _compared(k)}
    tolerance = {"throughput": args.throughput_tolerance, "loss": args.loss_tolerance,
                 "memory": args.memory_tolerance}
    table = RichTable(title=f"{args.baseline}  →  {args.candidate}", title_justify="left")
    for col in ("metric", "baseline", "candidate", "Δ rel", "verdict"):
        table.add_column(col)
    regressions = []
    for key in sorted(base_flat.keys() & cand_flat.keys()):
        b, c = base_flat[key], cand_flat[key]
        rel = (c - b) / abs(b) if b != 0 else (0.0 if c == 0 else math.inf)
        verdict = ""
        rule = classify(key)
        if rule is not None:
            category, direction = rule
            worse = -direction * rel
            verdict = "regressed" if worse > tolerance[category] else ("improved" if worse < 0 else "ok")
            if verdict == "regressed":
                regressions.append(key)
        table.add_row(key, fmt(b), fmt(c), f"{rel:+.2%}" if math.isfinite(rel) else "inf", verdict)
    console.print(table)
    if regressions:
        console.print(f"{len(regressions)} regression(s): {', '.join(regressions)}", highlight=False)
    return 1 if regressions and args.fail_on_regression else 0
