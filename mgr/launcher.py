"""Runs one demo under a budget and always leaves a summary behind, whatever happens to the run.

With several seeds (``--seeds``) the demo runs once per seed, one after another, in the same run directory: each
seed's metrics and training summaries are kept (``results.per_seed``), every numeric result gets its mean, std and
95% CI over the seeds (``results.over_seeds``), and every variant is paired by seed with the first one trained
(``results.paired``: differences and ratios with their CIs).
"""

from __future__ import annotations

import dataclasses
import signal
import time
import traceback
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from mgr import IMPORTED_AT
from mgr.artifacts import SCHEMA_VERSION, RunWriter, atomic_write_json, check_output_file
from mgr.budget import Budget, combine_records
from mgr.context import RunContext
from mgr.demo import Demo
from mgr.errors import Diverged, UserError
from mgr.mesh import DeviceMesh, ScratchWriter, is_writer
from mgr.mesh import describe as describe_mesh
from mgr.meta import run_meta
from mgr.results import Results, Table, fmt, to_jsonable
from mgr.stats import describe, describe_ratio, fmt_ci, paired_difference, paired_ratio

EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM), what a scheduler or `kill` sends
SEED_LIMIT = 2**32  # jax.random.key keeps 32 bits of a seed: 2**32 would give seed 0's key again
_started_once = False  # the process start-up is charged to its first launch only (a sweep runs several)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the loop is so that it stops like Ctrl-C (metrics read, summary written)."""


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


def check_seed(seed: Any, flag: str = "--seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{flag} must be a whole number in [0, 2^32), got {seed!r}")


def launch(demo: Demo, config: Any, *, budget: Budget, seed: int, artifacts_dir: str, run_id: str,
           kind: str | None = None, topic: str | None = None, argv: list[str] | None = None,
           console: Console | None = None, json_out: str | None = None,
           seeds: tuple[int, ...] = (), mesh: DeviceMesh | None = None) -> tuple[int, dict]:
    """Run ``demo`` (once per seed of ``seeds`` when given, else with ``seed``) and write its run directory (and
    the summary to ``json_out`` too); on a ``mesh`` only process 0 writes (mgr.mesh). Returns (exit code, summary).

    Everything that can be checked without running (seed, budget, the demo's config, where files go) is checked
    before the run directory exists; from then on whatever happens ends in a summary."""
    global _started_once
    started = time.perf_counter()
    startup_s, _started_once = (0.0 if _started_once else started - IMPORTED_AT), True
    console = console or Console()
    budget = budget.or_default(demo.default_iterations(config))
    kind, topic = kind or demo.kind, topic or demo.default_topic
    if demo.check is not None:
        demo.check(config, budget)
    if json_out is not None:
        check_output_file(json_out, "--json-out")
    seeds = tuple(seeds) or (seed,)
    for s in seeds:
        check_seed(s, "--seeds" if len(seeds) > 1 else "--seed")
    writer = (RunWriter if is_writer() else ScratchWriter)(artifacts_dir, kind, topic, run_id)  # mgr.mesh
    meta = {"run_id": run_id, "kind": kind, "topic": topic, "argv": argv or [], "seed": seeds[0],
            "mesh": describe_mesh(mesh)}
    runs: list[tuple[int, RunContext, Results]] = []
    status, error, code = "completed", None, 0
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    several = len(seeds) > 1
    try:
        writer.write_json("config.json", {"demo": demo.name, "config": config, "seed": seeds[0],
                                          "seeds": list(seeds) if several else None, "budget": budget.to_dict()})
        meta = {**run_meta(run_id=run_id, kind=kind, topic=topic, argv=argv or [], seed=seeds[0]),
                "mesh": describe_mesh(mesh)}
        for s in seeds:
            ctx = RunContext(seed=s, budget=budget, writer=writer, quality_metric=demo.quality_metric,
                             plot_prefix=f"seed{s}_" if several else "", log_extra={"seed": s} if several else None,
                             mesh=mesh)
            runs.append((s, ctx, Results()))
            runs[-1] = (s, ctx, demo.run(config, ctx))
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        status, code = "interrupted", EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        error = "terminated by SIGTERM" if terminated else "interrupted (Ctrl-C)"
    except Diverged as e:
        status, error, code = "diverged", str(e), 1
    except UserError as e:
        status, error = "failed", str(e)
        raise
    except Exception as e:
        status, error = "failed", f"{e.__class__.__name__}: {e}\n{traceback.format_exc()}"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        summary = _summary(meta, budget, runs, status, error, writer,
                           {"startup_s": startup_s, "launch_wall_s": time.perf_counter() - started})
        try:
            writer.write_json("summary.json", summary)
            writer.write_text("run.md", render_markdown(summary))
            writer.close()
            if json_out is not None and is_writer():
                atomic_write_json(Path(json_out), summary)
        except OSError as e:  # a full disk: one line, whatever the run's own outcome was
            raise UserError(f"cannot write the run's record in {writer.run_dir} or --json-out: "
                            f"{e.strerror or e}") from None
        if is_writer():
            print_summary(summary, console)
    return code, summary


def _summary(meta: dict, budget: Budget, runs: list[tuple[int, RunContext, Results]], status: str,
             error: str | None, writer: RunWriter, launcher_s: dict) -> dict:
    plots = sorted(f"plots/{p.name}" for p in writer.plots_dir.iterdir())
    records = {(name if len(runs) == 1 else f"seed{s}/{name}"): r
               for s, ctx, _ in runs for name, r in ctx.budget_records.items()}
    if len(runs) <= 1:  # none: the run failed before its context existed
        train = runs[0][1].train_summaries if runs else {}
        res = runs[0][2] if runs else Results()
        results = {**res.metrics, "train": train, "tables": [t.to_dict() for t in res.tables], "notes": res.notes}
    else:
        per_seed = {str(s): {**res.metrics, "train": ctx.train_summaries} for s, ctx, res in runs}
        results = {"seeds": [s for s, _, _ in runs], "per_seed": per_seed, "over_seeds": over_seeds(per_seed),
                   "paired": paired_by_seed(per_seed),
                   "tables": [dataclasses.replace(t, title=f"{t.title} (seed {s})").to_dict() for s, _, res in runs
                              for t in res.tables],
                   "notes": [f"seed {s}: {n}" for s, _, res in runs for n in res.notes]}
    in_train = sum((t.get("decomposition") or {}).get("wall_s") or 0.0
                   for _, ctx, _ in runs for t in ctx.train_summaries.values())
    results["decomposition"] = {**launcher_s, "in_training_s": in_train,
                                "outside_training_s": launcher_s["launch_wall_s"] - in_train}
    results["plots"] = plots
    return to_jsonable({
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "error": error,
        "meta": meta,
        "budget": {**budget.to_dict(), **combine_records(records), "variants": records},
        "results": results,
        "run_dir": str(writer.run_dir),
    })


# Result subtrees that are presentation, estimator records or per-eval series, not results to average over seeds.
_NOT_AVERAGED = frozenset({"tables", "notes", "plots", "flops", "eval_points", "samples_ms", "model", "n"})


def _leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            if str(k) not in _NOT_AVERAGED:
                out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix] = float(tree)
    return out


def over_seeds(per_seed: dict[str, dict]) -> dict[str, dict]:
    """Mean, std and 95% CI over seeds of every numeric result all seeds share; speedups (ratios) get the
    geometric mean and a log-scale CI."""
    leaves = [_leaves(to_jsonable(r)) for r in per_seed.values()]
    common = set.intersection(*(set(d) for d in leaves)) if leaves else set()
    return {k: (describe_ratio if "speedup" in k.rsplit(".", 1)[-1] else describe)([d[k] for d in leaves])
            for k in sorted(common)}


def _ttq(train: dict, field: str) -> float | None:
    block = train.get("time_to_quality") or {}
    return block.get(field) if block.get("reached") else None


def paired_by_seed(per_seed: dict[str, dict]) -> dict[str, dict]:
    """Every variant against the first one trained, paired by seed: final-loss difference, step-time speedup,
    and time-to-quality speedups (training and wall seconds) where both reached the target."""
    trains = [r.get("train") or {} for r in per_seed.values()]
    names = list(trains[0]) if trains else []
    out: dict[str, dict] = {}
    for name in names[1:]:
        both = [t for t in trains if names[0] in t and name in t]
        base, var = [t[names[0]] for t in both], [t[name] for t in both]

        def pairs(get):
            ab = [(get(b), get(v)) for b, v in zip(base, var)]
            ab = [(a, b) for a, b in ab if a is not None and b is not None]
            return [a for a, _ in ab], [b for _, b in ab]

        loss_a, loss_b = pairs(lambda t: t.get("final_loss"))
        ms_a, ms_b = pairs(lambda t: (t.get("step_ms") or {}).get("median_ms"))
        entry = {"baseline": names[0], "final_loss_diff": paired_difference(loss_a, loss_b),
                 "step_time_speedup": paired_ratio(ms_a, ms_b)}
        for field in ("train_s", "wall_s"):
            entry[f"time_to_quality_speedup_{field}"] = paired_ratio(*pairs(lambda t: _ttq(t, field)))
        out[name] = entry
    return out


def _trains(summary: dict) -> dict[str, dict]:
    """Training summaries by row label: the variant, or seed/variant in a --seeds run."""
    results = summary.get("results", {})
    if "per_seed" in results:
        return {f"{s}/{name}": t for s, r in results["per_seed"].items() for name, t in (r.get("train") or {}).items()}
    return results.get("train") or {}


def training_table(summary: dict) -> Table | None:
    train = _trains(summary)
    if not train:
        return None
    rows = []
    for name, t in train.items():
        step = t.get("step_ms") or {}
        rows.append([name, t.get("steps"), t.get("stopped_by"), t.get("final_loss"),
                     f"{fmt(step.get('median_ms'))} ({fmt(step.get('p10_ms'))}–{fmt(step.get('p90_ms'))})",
                     t.get("flops_per_step"), t.get("tflops_per_s"), t.get("peak_memory_gb")])
    return Table("Training (same budget for every variant)",
                 ["variant", "steps", "stopped by", "final loss", "ms/step median (p10–p90)", "FLOPs/step",
                  "TFLOP/s", "peak GB"], rows,
                 note="FLOPs/step: the compiled step's optimised HLO priced by mgr.flops (loops at their trip counts, all devices).")


def quality_tables(summary: dict) -> list[Table]:
    """Time to quality (when a target was set) and the measured decomposition of every variant's wall time."""
    train = _trains(summary)
    ttq_rows, rows, target = [], [], None
    for name, t in train.items():
        d, q = t.get("decomposition") or {}, t.get("time_to_quality")
        if q:
            target = q.get("target")
            ttq_rows.append([name, q.get("reached"), q.get("steps"), q.get("flops"), q.get("train_s"),
                             q.get("wall_s")])
        if d:
            o = d.get("overhead") or {}
            eff = d.get("effective_flops_per_second")
            rows.append([name, d.get("wall_s"), d.get("step_s"), None if eff is None else eff / 1e12,
                         f"{fmt(o.get('compile_s'))} ({fmt(o.get('flops_pricing_s'))})", o.get("eval_s"),
                         o.get("data_s"), (o.get("hooks_s") or 0) + (o.get("host_sync_s") or 0),
                         d.get("residual_pct")])
    tables = []
    if ttq_rows:
        tables.append(Table(
            f"Time to quality (target {fmt(target)})",
            ["variant", "reached", "steps", "FLOPs", "train s", "wall s"], ttq_rows,
            note="Interpolated between the first eval at or below the target and the one before (linear in "
                 "log-loss); the eval cadence sets the resolution (time_to_quality.first_eval is that eval). "
                 "train s: evals and compilation excluded; wall s: everything since the variant started."))
    if rows:
        tables.append(Table(
            "Wall time = step time + pipeline overhead",
            ["variant", "wall s", "step s", "eff. TFLOP/s", "compile s (pricing)", "eval s", "data s",
             "hooks+sync s", "residual %"], rows,
            note="step s: the timed steps (synced windows less the host time inside them) plus the median for "
                 "the rest; eff. TFLOP/s: spent FLOPs over step s; data: time in batch_fn; residual: wall minus "
                 "step time and overheads."))
    return tables


def seeds_table(summary: dict) -> Table | None:
    """Each variant against the first over seeds: paired differences and ratios with their 95% CIs."""
    results = summary.get("results", {})
    paired = results.get("paired") or {}
    if not paired:
        return None
    rows = [[name, p["baseline"], fmt_ci(p["final_loss_diff"]), fmt_ci(p["step_time_speedup"]),
             fmt_ci(p["time_to_quality_speedup_train_s"]), fmt_ci(p["time_to_quality_speedup_wall_s"])]
            for name, p in paired.items()]
    return Table(f"Paired by seed (seeds {','.join(map(str, results.get('seeds', [])))})",
                 ["variant", "vs", "final loss Δ", "step-time speedup", "TTQ speedup (train s)",
                  "TTQ speedup (wall s)"], rows,
                 note="mean [95% CI] (n seeds); Δ: variant - baseline per seed (paired t); speedups: geometric "
                      "mean of the per-seed ratios baseline/variant (paired t on the log ratio). A CI that spans "
                      "0 (Δ) or 1 (speedup) is no significant difference.")


def summary_tables(summary: dict) -> list[Table]:
    tables = [Table.from_dict(t) for t in summary.get("results", {}).get("tables", [])]
    train = [t for t in (training_table(summary), *quality_tables(summary), seeds_table(summary)) if t]
    return train + tables


def _budget_line(budget: dict) -> str:
    if not budget.get("variants"):
        return "not used (no training loop in this run)"
    requested = ", ".join(f"{k}={fmt(budget.get(k))}" for k in ("max_iterations", "target_flops", "time_budget")
                          if budget.get(k) is not None)
    steps = ", ".join(f"{name} {v.get('steps')}" for name, v in budget["variants"].items())
    return (f"{requested or 'none'}; stopped by {budget.get('stopped_by')}; steps {steps}; "
            f"{fmt(budget.get('spent_flops'))} FLOPs spent in all")


def _header_lines(summary: dict) -> list[tuple[str, str]]:
    meta = summary.get("meta", {})
    device = meta.get("device", {})
    git = meta.get("git", {})
    return [
        ("status", summary.get("status", "?")
         + (f" ({summary['error'].splitlines()[0]})" if summary.get("error") else "")),
        ("command", meta.get("command", "")),
        ("device", f"{device.get('device_kind', '?')} ({device.get('platform', '?')})"),
        *([("mesh", _mesh_line(meta["mesh"]))] if meta.get("mesh", {}).get("devices", 1) > 1 else []),
        ("budget", _budget_line(summary.get("budget", {}))),
        ("seed", str(meta.get("seed"))),
        ("git", f"{(git.get('commit') or '?')[:12]}{' (dirty)' if git.get('dirty') else ''}"),
        ("run dir", summary.get("run_dir", "")),
    ]


def _mesh_line(mesh: dict) -> str:
    layout = "FSDP (params and optimizer state sharded)" if mesh.get("fsdp") else "data parallel (replicated)"
    return (f"data={mesh.get('devices')}, {layout}, {mesh.get('processes')} process(es); FLOPs are global, "
            f"per device = global / {mesh.get('devices')}")


def render_markdown(summary: dict) -> str:
    meta = summary.get("meta", {})
    lines = [f"# {meta.get('kind')}/{meta.get('topic')} — {meta.get('run_id')}", ""]
    lines += [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}" for k, v in _header_lines(summary)]
    lines.append("")
    for table in summary_tables(summary):
        lines += [table.markdown()]
    for note in summary.get("results", {}).get("notes", []):
        lines.append(f"- {note}")
    for p in summary.get("results", {}).get("plots") or []:
        lines.append(f"![{p}]({p})")
    return "\n".join(lines) + "\n"


def print_summary(summary: dict, console: Console) -> None:
    """Header, tables and notes. No cell is ever wrapped: a terminal wide enough gets a rich table, a file or a
    pipe plain aligned columns at full width, a narrow terminal one `column: value` line per cell."""
    for key, value in _header_lines(summary):
        console.print(f"[bold]{key:>8}[/bold]  {escape(str(value))}", highlight=False, soft_wrap=True)
    for table in summary_tables(summary):
        # rich's table adds two columns of padding per cell and a margin
        if console.is_terminal and table.width() + 2 * len(table.columns) <= console.width:
            rich_table = RichTable(title=table.title, title_justify="left", box=box.SIMPLE_HEAD)
            header, rows = table.cells()
            for col in header:
                rich_table.add_column(col, no_wrap=True)
            for row in rows:
                rich_table.add_row(*row)
            console.print(rich_table)
            if table.note:
                console.print(table.note, highlight=False, markup=False)
        else:
            text = table.plain() if not console.is_terminal else table.records()
            console.print("\n" + text, highlight=False, markup=False, soft_wrap=True, end="")
    for note in summary.get("results", {}).get("notes", []):
        console.print(f"• {note}", highlight=False, markup=False, soft_wrap=not console.is_terminal)

