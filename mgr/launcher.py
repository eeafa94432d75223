"""Runs one demo under a budget and always leaves a summary behind, whatever happens to the run."""

from __future__ import annotations

import signal
import traceback
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from mgr.artifacts import SCHEMA_VERSION, RunWriter
from mgr.budget import Budget, combine_records
from mgr.context import RunContext
from mgr.demo import Demo
from mgr.errors import Diverged, UserError
from mgr.mesh import DeviceMesh, ScratchWriter, describe, is_writer
from mgr.meta import run_meta
from mgr.results import Results, Table, fmt, to_jsonable

EXIT_INTERRUPTED = 130


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def launch(demo: Demo, config: Any, *, budget: Budget, seed: int, artifacts_dir: str, run_id: str,
           kind: str | None = None, topic: str | None = None, argv: list[str] | None = None,
           console: Console | None = None, mesh: DeviceMesh | None = None) -> tuple[int, dict]:
    """Run ``demo`` and write its run directory. Returns (exit code, summary)."""
    console = console or Console()
    budget = budget.or_default(demo.default_iterations(config))
    kind, topic = kind or demo.kind, topic or demo.default_topic
    writer = (RunWriter if is_writer() else ScratchWriter)(artifacts_dir, kind, topic, run_id)  # mgr.mesh
    writer.write_json("config.json", {"demo": demo.name, "config": config, "seed": seed, "budget": budget.to_dict()})
    meta = {**run_meta(run_id=run_id, kind=kind, topic=topic, argv=argv or [], seed=seed), "mesh": describe(mesh)}
    ctx = RunContext(seed=seed, budget=budget, writer=writer, mesh=mesh)
    status, error, results, code = "completed", None, Results(), 0
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        results = demo.run(config, ctx)
    except KeyboardInterrupt:
        status, error, code = "interrupted", "interrupted by signal", EXIT_INTERRUPTED
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
        summary = _summary(meta, budget, ctx, results, status, error)
        writer.write_json("summary.json", summary)
        writer.write_text("run.md", render_markdown(summary))
        writer.close()
        if is_writer():
            print_summary(summary, console)
    return code, summary


def _summary(meta: dict, budget: Budget, ctx: RunContext, results: Results, status: str,
             error: str | None) -> dict:
    return to_jsonable({
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "error": error,
        "meta": meta,
        "budget": {**budget.to_dict(), **combine_records(ctx.budget_records), "variants": ctx.budget_records},
        "results": {**results.metrics, "train": ctx.train_summaries,
                    "tables": [t.to_dict() for t in results.tables], "notes": results.notes,
                    "plots": sorted(f"plots/{p.name}" for p in ctx.writer.plots_dir.iterdir())},
        "run_dir": str(ctx.run_dir),
    })


def training_table(summary: dict) -> Table | None:
    train = summary.get("results", {}).get("train") or {}
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
                 note="FLOPs/step: XLA cost analysis of the compiled step, loop-corrected (mgr.flops).")


def summary_tables(summary: dict) -> list[Table]:
    tables = [Table.from_dict(t) for t in summary.get("results", {}).get("tables", [])]
    train = training_table(summary)
    return ([train] if train else []) + tables


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
    for key, value in _header_lines(summary):
        console.print(f"[bold]{key:>8}[/bold]  {value}", highlight=False, markup=True, soft_wrap=True)
    for table in summary_tables(summary):
        rich_table = RichTable(title=table.title, title_justify="left", box=box.SIMPLE_HEAD)
        for col in table.columns:
            rich_table.add_column(str(col), overflow="fold")
        for row in table.rows:
            rich_table.add_row(*(fmt(c) for c in row))
        console.print(rich_table)
        if table.note:
            console.print(table.note, highlight=False)
    for note in summary.get("results", {}).get("notes", []):
        console.print(f"• {note}", highlight=False)

