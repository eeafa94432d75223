"""Runs one demo under a budget and always leaves a summary behind, whatever happens to the run."""

from __future__ import annotations

import signal
import traceback
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from mgr.artifacts import SCHEMA_VERSION, RunWriter, atomic_write_json, check_output_file
from mgr.budget import Budget, combine_records
from mgr.context import RunContext
from mgr.demo import Demo
from mgr.errors import Diverged, UserError
from mgr.meta import run_meta
from mgr.results import Results, Table, fmt, to_jsonable

EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM), what a scheduler or `kill` sends
SEED_LIMIT = 2**32  # jax.random.key keeps 32 bits of a seed: 2**32 would give seed 0's key again


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the loop is so that it stops like Ctrl-C (metrics read, summary written)."""


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


def check_seed(seed: Any, flag: str = "--seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{flag} must be a whole number in [0, 2^32), got {seed!r}")


def launch(demo: Demo, config: Any, *, budget: Budget, seed: int, artifacts_dir: str, run_id: str,
           kind: str | None = None, topic: str | None = None, argv: list[str] | None = None,
           console: Console | None = None, json_out: str | None = None) -> tuple[int, dict]:
    """Run ``demo`` and write its run directory (and the summary to ``json_out`` too). Returns (exit code, summary).

    Everything that can be checked without running (seed, budget, the demo's config, where files go) is checked
    before the run directory exists; from then on whatever happens ends in a summary."""
    console = console or Console()
    check_seed(seed)
    budget = budget.or_default(demo.default_iterations(config))
    kind, topic = kind or demo.kind, topic or demo.default_topic
    if demo.check is not None:
        demo.check(config, budget)
    if json_out is not None:
        check_output_file(json_out, "--json-out")
    writer = RunWriter(artifacts_dir, kind, topic, run_id)
    meta = {"run_id": run_id, "kind": kind, "topic": topic, "argv": argv or [], "seed": seed}
    ctx = None
    status, error, results, code = "completed", None, Results(), 0
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        writer.write_json("config.json", {"demo": demo.name, "config": config, "seed": seed,
                                          "budget": budget.to_dict()})
        meta = run_meta(run_id=run_id, kind=kind, topic=topic, argv=argv or [], seed=seed)
        ctx = RunContext(seed=seed, budget=budget, writer=writer)
        results = demo.run(config, ctx)
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
        summary = _summary(meta, budget, writer, ctx, results, status, error)
        try:
            writer.write_json("summary.json", summary)
            writer.write_text("run.md", render_markdown(summary))
            writer.close()
            if json_out is not None:
                atomic_write_json(Path(json_out), summary)
        except OSError as e:  # a full disk: one line, whatever the run's own outcome was
            raise UserError(f"cannot write the run's record in {writer.run_dir} or --json-out: "
                            f"{e.strerror or e}") from None
        print_summary(summary, console)
    return code, summary


def _summary(meta: dict, budget: Budget, writer: RunWriter, ctx: RunContext | None, results: Results, status: str,
             error: str | None) -> dict:
    budget_records = ctx.budget_records if ctx else {}
    return to_jsonable({
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "error": error,
        "meta": meta,
        "budget": {**budget.to_dict(), **combine_records(budget_records), "variants": budget_records},
        "results": {**results.metrics, "train": ctx.train_summaries if ctx else {},
                    "tables": [t.to_dict() for t in results.tables], "notes": results.notes,
                    "plots": sorted(f"plots/{p.name}" for p in writer.plots_dir.iterdir())},
        "run_dir": str(writer.run_dir),
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
        ("budget", _budget_line(summary.get("budget", {}))),
        ("seed", str(meta.get("seed"))),
        ("git", f"{(git.get('commit') or '?')[:12]}{' (dirty)' if git.get('dirty') else ''}"),
        ("run dir", summary.get("run_dir", "")),
    ]


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

