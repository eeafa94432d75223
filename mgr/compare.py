"""`mgr compare`: every numeric result two runs share, one row per metric, with a verdict you can act on.

Runs with several seeds (``--seeds``) are compared seed by seed: the delta of the means gets a 95% CI, paired by
seed when both runs trained the same seeds, else Welch's t. A metric only regresses or improves when its CI
excludes zero; "no significant difference" otherwise. Single-seed runs are compared on their one value each.
A run that did not complete (failed, interrupted, diverged) is itself a regression.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.table import Table as RichTable

from mgr.artifacts import read_json, read_summary
from mgr.errors import UserError
from mgr.results import Table, fmt
from mgr.stats import paired_difference, welch_difference

# (key pattern, category, direction), first match wins: +1 means higher is better, -1 lower is better. A pattern
# matches the key's end, the last key segment's start, or a whole segment anywhere (time_to_quality.*).
_RULES: tuple[tuple[str, str, int], ...] = (
    ("time_to_quality", "time", -1),
    ("tflops_per_s", "throughput", +1), ("tokens_per_second", "throughput", +1), ("mfu", "throughput", +1),
    ("effective_flops_per_second", "throughput", +1), ("speedup", "throughput", +1),
    ("median_ms", "throughput", -1),
    ("accuracy", "quality", +1), ("acc", "quality", +1), ("eval_acc", "quality", +1),
    ("loss", "quality", -1), ("bpb", "quality", -1), ("error", "quality", -1), ("err", "quality", -1),
    ("val_rel_err", "quality", -1), ("gap", "quality", -1),
    ("memory_gb", "memory", -1), ("memory", "memory", -1),
)
# Key segments that are presentation, estimator records, spread, per-eval series or statistics already derived
# from the seeds, not metrics to compare. Whole segments are matched, so a variant named "notes" is compared.
_SKIP = frozenset({"tables", "notes", "plots", "flops", "p10_ms", "p90_ms", "samples_ms", "n", "eval_points",
                   "first_eval", "interpolated", "overhead", "over_seeds", "paired", "seeds", "evals", "eval_every",
                   "target", "min", "max", "std"})
VERDICT_NONE = "no significant difference"


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
                        help="allowed relative throughput or time-to-quality loss before it counts as a regression "
                             "(default 0.05)")
    parser.add_argument("--loss-tolerance", type=_tolerance, default=0.02,
                        help="allowed relative quality loss: loss/error up, accuracy down (default 0.02)")
    parser.add_argument("--memory-tolerance", type=_tolerance, default=0.10,
                        help="allowed relative peak-memory increase (default 0.10)")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="exit 1 if a run did not complete or any metric regresses (with seeds: significantly, "
                             "beyond its tolerance)")


def flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(tree):
        yield prefix, float(tree)


def classify(key: str) -> tuple[str, int] | None:
    segments = key.split(".")
    for pattern, category, direction in _RULES:
        if key.endswith(pattern) or segments[-1].startswith(pattern) or pattern in segments[:-1]:
            return category, direction
    return None


def _load(run_dir: str) -> dict:
    summary = read_summary(run_dir)
    path = Path(run_dir)
    config = (path if path.is_dir() else path.parent) / "config.json"
    summary["_demo"] = (read_json(config) or {}).get("demo") if config.is_file() else None
    return summary


def _samples(summary: dict) -> dict[str, dict[str, float]]:
    """metric -> {seed: value}: one entry per seed of a --seeds run, else the run's one value under its seed."""
    results = summary.get("results", {})
    if isinstance(results.get("per_seed"), dict):
        per = {str(s): dict(flatten(r)) for s, r in results["per_seed"].items()}
    else:
        seed = (summary.get("meta") or {}).get("seed")
        per = {str(seed): dict(flatten(results))}
    out: dict[str, dict[str, float]] = {}
    for seed, values in per.items():
        for key, v in values.items():
            if _compared(key):
                out.setdefault(key, {})[seed] = v
    return out


def _deduplicated(keys: set[str], base: dict, cand: dict) -> list[str]:
    """A demo that also reports its training summaries (metrics[variant] = summary) lists every value twice:
    keep the train.* row only."""
    def same(a, b):
        return base[a] == base[b] and cand[a] == cand[b]
    return sorted(k for k in keys if not (f"train.{k}" in keys and same(k, f"train.{k}")))


def _delta(b: dict[str, float], c: dict[str, float]) -> dict[str, Any]:
    """The candidate's mean minus the baseline's, with a CI when both have several seeds."""
    common = sorted(b.keys() & c.keys())
    if len(b) > 1 and len(c) > 1 and set(b) == set(c):
        return paired_difference([b[s] for s in common], [c[s] for s in common])
    if len(b) > 1 and len(c) > 1:
        return welch_difference(list(b.values()), list(c.values()))
    mean_b, mean_c = sum(b.values()) / len(b), sum(c.values()) / len(c)
    return {"mean": mean_c - mean_b, "ci95": None, "test": None, "significant": None}


def compare_runs(args: argparse.Namespace, console: Console) -> int:
    base, cand = _load(args.baseline), _load(args.candidate)
    if base["_demo"] and cand["_demo"] and base["_demo"] != cand["_demo"]:
        raise UserError(f"runs of different demos: {base['_demo']} ({args.baseline}) vs {cand['_demo']} "
                        f"({args.candidate})")
    base_s, cand_s = _samples(base), _samples(cand)
    shared = base_s.keys() & cand_s.keys()
    if not shared:
        raise UserError(f"{args.baseline} and {args.candidate} share no numeric results to compare")
    tolerance = {"throughput": args.throughput_tolerance, "time": args.throughput_tolerance,
                 "quality": args.loss_tolerance, "memory": args.memory_tolerance}
    mean = {k: sum(v.values()) / len(v) for k, v in base_s.items()}
    cmean = {k: sum(v.values()) / len(v) for k, v in cand_s.items()}
    seeded = any(len(v) > 1 for v in base_s.values()) and any(len(v) > 1 for v in cand_s.values())
    rows: list[list[str]] = []
    regressions: list[str] = []
    for status_of, which in ((base, "baseline"), (cand, "candidate")):
        status = status_of.get("status")
        if status != "completed":
            regressions.append(f"{which} run {status}")
            console.print(f"{which} run status: {status} ({(status_of.get('error') or '').splitlines()[:1]})",
                          highlight=False)
    for key in _deduplicated(shared, mean, cmean):
        b, c = mean[key], cmean[key]
        d = _delta(base_s[key], cand_s[key])
        scale = abs(b) if b != 0 else None
        rel = d["mean"] / scale if scale else (0.0 if d["mean"] == 0 else math.inf)
        ci = [x / scale for x in d["ci95"]] if d["ci95"] is not None and scale else None
        verdict = ""
        rule = classify(key)
        if rule is not None:
            category, direction = rule
            worse = -direction * rel
            if d["significant"] is not None and not d["significant"]:
                verdict = VERDICT_NONE
            else:
                verdict = "regressed" if worse > tolerance[category] else ("improved" if worse < 0 else "ok")
            if verdict == "regressed":
                regressions.append(key)
        shown = f"{rel:+.2%}" if math.isfinite(rel) else "inf"
        if ci is not None:
            shown += f" [{ci[0]:+.2%}, {ci[1]:+.2%}]"
        n = f" (n={len(base_s[key])})" if len(base_s[key]) > 1 else ""
        rows.append([key, fmt(b) + n, fmt(c) + (f" (n={len(cand_s[key])})" if len(cand_s[key]) > 1 else ""),
                     shown, verdict])
    columns = ["metric", "baseline", "candidate", "Δ rel" + (" [95% CI]" if seeded else ""), "verdict"]
    title = f"{args.baseline}  →  {args.candidate}"
    if console.is_terminal:
        table = RichTable(title=title, title_justify="left")
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:  # piped or in a file: full-width Markdown, never a wrapped name or number
        console.print(Table(title, columns, rows).markdown(), highlight=False, markup=False, soft_wrap=True)
    if seeded:
        console.print("with seeds: means over seeds; CI of the difference paired by seed when both runs trained "
                      "the same seeds, else Welch's t; a CI that spans 0 is no significant difference", highlight=False)
    if regressions:
        console.print(f"{len(regressions)} regression(s): {', '.join(regressions)}", highlight=False)
    return 1 if regressions and args.fail_on_regression else 0
