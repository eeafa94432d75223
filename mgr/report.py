"""`mgr report <sweep-dir>`: README.md and plots for a sweep, from its run directories alone.

Every configuration directory (``summary.json``, ``config.json``) of the sweep is read, finished or not (a partly
finished sweep reports what it has, and lists the rest as pending); earlier attempts (``*.attempt<k>``) are not.
For each training variant the README holds:

* a metric-at-step table: the demo's quality metric (``Demo.quality_metric``) at every eval step, one column per
  configuration (mean over seeds for a ``--seeds`` configuration), grouped by ``--group-by`` when given;
* a summary table: each configuration's key parameters (the config.json fields that differ between
  configurations), status, steps, FLOPs per step, the final metric (mean [95% CI] over seeds), its Δ vs the
  baseline in % (CI paired by seed when both have the same seeds, else Welch), tokens/s when the demo reports it,
  and the time (training seconds, and wall seconds) to reach the baseline's final metric, with its speedup;
* loss-vs-step, loss-vs-FLOPs and loss-vs-time plots.

Studies add their own sections or columns: ``register_section(demo, fn)`` (``fn(report) -> markdown``) and
``register_columns(demo, fn)`` (``fn(run) -> {column: value}``), or name them in the spec as
``[report] sections = ["package.module:function"]`` (section functions, after the tables) and
``[report] columns = ["package.module:function"]`` (summary-table columns). ``[report] baseline``/``group_by`` in
the spec set the defaults of ``--baseline``/``--group-by``. Run directories whose names start with ``_`` (the
sweep's shared ``_init``) are not configurations.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mgr.artifacts import atomic_write_text, read_json
from mgr.errors import UserError
from mgr.plots import plot_curves, plot_points
from mgr.quality import EvalPoint, time_to_quality
from mgr.results import Table, fmt
from mgr.stats import describe, describe_ratio, fmt_ci, paired_difference, paired_ratio, welch_difference

SECTIONS: dict[str, list[Callable[["Report"], str]]] = {}
COLUMNS: dict[str, list[Callable[["RunData"], dict[str, Any]]]] = {}


def register_section(demo: str, fn: Callable[["Report"], str]) -> None:
    SECTIONS.setdefault(demo, []).append(fn)


def register_columns(demo: str, fn: Callable[["RunData"], dict[str, Any]]) -> None:
    COLUMNS.setdefault(demo, []).append(fn)


@dataclasses.dataclass
class RunData:
    name: str
    run_dir: Path
    status: str
    config: dict  # config.json
    summary: dict | None

    @property
    def trains(self) -> dict[str, dict[str, dict]]:
        """variant -> seed -> training summary."""
        results = (self.summary or {}).get("results", {})
        if "per_seed" in results:
            per = {s: r.get("train") or {} for s, r in results["per_seed"].items()}
        else:
            per = {str(self.config.get("seed")): results.get("train") or {}}
        out: dict[str, dict[str, dict]] = {}
        for seed, trains in per.items():
            for variant, t in trains.items():
                out.setdefault(variant, {})[seed] = t
        return out

    def points(self, variant: str) -> dict[str, list[EvalPoint]]:
        return {s: [EvalPoint(**p) for p in t.get("eval_points") or []]
                for s, t in self.trains.get(variant, {}).items()}

    def final(self, variant: str) -> dict[str, float]:
        """seed -> the last eval's quality metric."""
        return {s: p[-1].value for s, p in self.points(variant).items() if p and p[-1].value is not None}

    def results_per_seed(self) -> dict[str, dict]:
        results = (self.summary or {}).get("results", {})
        return results["per_seed"] if "per_seed" in results else {str(self.config.get("seed")): results}


@dataclasses.dataclass
class Report:
    sweep_dir: Path
    demo: str
    metric: str
    runs: list[RunData]
    baseline: RunData | None
    key_params: list[str]
    group_by: str | None
    columns: list[Callable[["RunData"], dict[str, Any]]] = dataclasses.field(default_factory=list)  # [report]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    # Lists read as the flag was written (1,2,3), not as a Python tuple.
    return {prefix: ",".join(map(str, tree)) if isinstance(tree, list) else tree}


def _params(run: RunData) -> dict[str, Any]:
    c = run.config
    return {**_flat(c.get("config") or {}), "seed": c.get("seeds") and ",".join(map(str, c["seeds"])) or c.get("seed"),
            **{f"budget.{k}": v for k, v in (c.get("budget") or {}).items()}}


def load(sweep_dir: Path) -> tuple[str, list[RunData], dict]:
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a sweep directory")
    record = read_json(sweep_dir / "sweep.json") if (sweep_dir / "sweep.json").exists() else {}
    listed = [c["name"] for c in record.get("configs", [])]
    found = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and ".attempt" not in p.name
                   and not p.name.startswith("_") and (p / "config.json").exists())
    runs = []
    for name in listed + [n for n in found if n not in listed]:
        run_dir = sweep_dir / name
        summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").exists() else None
        config = read_json(run_dir / "config.json") if (run_dir / "config.json").exists() else {}
        status = (summary or {}).get("status") or ("running or cut off" if config else "pending")
        runs.append(RunData(name, run_dir, status, config, summary))
    if not runs:
        raise UserError(f"{sweep_dir} holds no configurations (no sweep.json, no run directories)")
    demo = record.get("demo") or next((r.config.get("demo") for r in runs if r.config), None)
    return demo, runs, record


def _column(run: RunData, variant: str, several_variants: bool) -> str:
    return f"{run.name}/{variant}" if several_variants else run.name


def _mean_series(points: dict[str, list[EvalPoint]], attr: str) -> tuple[list[float], list[float]]:
    """The quality metric against ``attr`` (step, flops, train_s), averaged over seeds at each eval index."""
    series = [p for p in points.values() if p]
    n = min((len(p) for p in series), default=0)
    xs = [float(np.mean([getattr(p[i], attr) for p in series])) for i in range(n)]
    ys = [float(np.mean([p[i].value for p in series])) for i in range(n)]
    return xs, ys


def step_tables(report: Report, variants: list[str]) -> list[Table]:
    tables = []
    groups: dict[Any, list[RunData]] = {}
    for run in report.runs:
        groups.setdefault(_params(run).get(report.group_by) if report.group_by else None, []).append(run)
    for variant in variants:
        for group, runs in groups.items():
            runs = [r for r in runs if variant in r.trains]
            if not runs:
                continue
            by_step: dict[int, dict[str, float]] = {}
            for run in runs:
                steps, values = _mean_series(run.points(variant), "step")
                for s, v in zip(steps, values):
                    by_step.setdefault(int(round(s)), {})[run.name] = v
            rows = [[s, *(by_step[s].get(r.name) for r in runs)] for s in sorted(by_step)]
            where = f", {report.group_by} = {fmt(group)}" if report.group_by else ""
            tables.append(Table(f"{report.metric} at every eval step ({variant}{where})",
                                ["step", *(r.name for r in runs)], rows,
                                note="mean over seeds where a configuration ran several"))
    return tables


def _time_to(points: dict[str, list[EvalPoint]], targets: dict[str, float], mean_target: float | None,
             field: str) -> dict[str, float]:
    """seed -> time to the target: the baseline's final metric of the same seed, else the baseline's mean."""
    out = {}
    for seed, p in points.items():
        q = time_to_quality(p, targets.get(seed, mean_target), "")
        if q and q["reached"]:
            out[seed] = q[field]
    return out


def _pct(stat: dict, base_mean: float | None) -> str:
    if stat.get("mean") is None or not base_mean:
        return "—"
    scaled = {**stat, "mean": stat["mean"] / abs(base_mean),
              "ci95": None if stat.get("ci95") is None else [x / abs(base_mean) for x in stat["ci95"]]}
    return fmt_ci(scaled, digits=3, pct=True)


def _difference(base: dict[str, float], cand: dict[str, float]) -> dict:
    common = sorted(base.keys() & cand.keys())
    if len(common) > 1 and set(base) == set(cand):
        return paired_difference([base[s] for s in common], [cand[s] for s in common])
    if len(base) > 1 and len(cand) > 1:
        return welch_difference(list(base.values()), list(cand.values()))
    if base and cand:
        return {"n": 1, "mean": np.mean(list(cand.values())) - np.mean(list(base.values())), "ci95": None}
    return {"n": 0, "mean": None, "ci95": None}


def summary_table(report: Report, variant: str, several_variants: bool) -> Table:
    base = report.baseline
    base_final = base.final(variant) if base else {}
    target = float(np.mean(list(base_final.values()))) if base_final else None
    base_tt = ({f: _time_to(base.points(variant), base_final, target, f) for f in ("train_s", "wall_s")}
               if base else {})
    extra_fns = COLUMNS.get(report.demo, []) + report.columns
    rows, extra_cols = [], []
    for run in report.runs:
        trains = run.trains.get(variant, {})
        params = _params(run)
        final = run.final(variant)
        flops = [t.get("flops_per_step") for t in trains.values() if t.get("flops_per_step")]
        steps = [t.get("steps") for t in trains.values() if t.get("steps") is not None]
        tokens = [r.get("tokens_per_second") for r in run.results_per_seed().values()
                  if isinstance(r.get("tokens_per_second"), (int, float))]
        row = [_column(run, variant, several_variants), *(params.get(k) for k in report.key_params), run.status,
               int(np.mean(steps)) if steps else None, float(np.mean(flops)) if flops else None,
               fmt_ci(describe(list(final.values()))) if final else "—",
               "baseline" if run is base else _pct(_difference(base_final, final), target) if base else "—",
               float(np.mean(tokens)) if tokens else None]
        for field in ("train_s", "wall_s"):
            mine = _time_to(run.points(variant), base_final, target, field)
            row.append(fmt_ci(describe(list(mine.values()))) if mine else ("not reached" if trains else "—"))
            common = sorted(mine.keys() & base_tt.get(field, {}).keys())
            speedup = paired_ratio([base_tt[field][s] for s in common], [mine[s] for s in common])
            row.append(fmt_ci(speedup) if speedup["mean"] is not None else "—")
        extras: dict[str, Any] = {}
        for fn in extra_fns:
            extras.update(fn(run))
        extra_cols += [c for c in extras if c not in extra_cols]
        rows.append((row, extras))
    columns = ["configuration", *report.key_params, "status", "steps", "FLOPs/step", f"final {report.metric}",
               "Δ vs baseline", "tokens/s", "train s to baseline's final", "speedup (train s)",
               "wall s to baseline's final", "speedup (wall s)", *extra_cols]
    body = [row + [extras.get(c) for c in extra_cols] for row, extras in rows]
    return Table(
        f"Summary ({variant})" if several_variants else "Summary", columns, body,
        note=f"baseline: {base.name if base else 'none (--baseline NAME)'}. final: {report.metric} at the last "
             "eval, mean [95% CI] (n seeds); Δ: relative to the baseline's mean, CI paired by seed when both ran "
             "the same seeds, else Welch; time to the baseline's final metric: interpolated between evals "
             "(mgr.quality; the same seed's final where the baseline ran that seed, else its mean), training seconds "
             "(evals and compilation excluded) and wall seconds; speedup: "
             "baseline's time over this one's, paired by seed (geometric mean). FLOPs/step: mgr.flops estimator.")


def plots(report: Report, variants: list[str]) -> list[str]:
    several = len(variants) > 1
    written = []
    for attr, label, file in (("step", "step", "loss_vs_step.png"), ("flops", "training FLOPs (estimator)",
                                                                       "loss_vs_flops.png"),
                              ("train_s", "training seconds (evals, compilation excluded)", "loss_vs_time.png")):
        curves = {}
        for run in report.runs:
            for variant in variants:
                xs, ys = _mean_series(run.points(variant), attr)
                if xs:
                    curves[_column(run, variant, several)] = (xs, ys)
        if curves:
            plot_curves(report.sweep_dir / file, curves, xlabel=label, ylabel=report.metric,
                        title=f"{report.demo}: {report.metric} at evals (mean over seeds)")
            written.append(file)
    return written


def build(sweep_dir: Path, baseline: str | None = None, group_by: str | None = None) -> str:
    from demos import REGISTRY, load as load_demo
    demo, runs, record = load(sweep_dir)
    options = record.get("report") or {}
    baseline = baseline or options.get("baseline")
    group_by = group_by or options.get("group_by")
    metric = load_demo(demo).quality_metric if demo in REGISTRY else "val_loss"
    names = [r.name for r in runs]
    if baseline is not None and baseline not in names:
        raise UserError(f"--baseline {baseline}: no such configuration; there are {', '.join(names)}")
    params = [_params(r) for r in runs if r.config]
    keys = sorted({k for p in params for k in p})
    key_params = [k for k in keys if len({repr(p.get(k)) for p in params}) > 1]
    if group_by is not None and group_by not in keys:
        raise UserError(f"--group-by {group_by}: not a config.json field; fields: {', '.join(keys)}")
    report = Report(sweep_dir, demo, metric, runs, next((r for r in runs if r.name == baseline), None), key_params,
                    group_by, [_import(path, "columns") for path in options.get("columns", [])])
    variants = list(dict.fromkeys(v for r in runs for v in r.trains))
    done = sum(r.status == "completed" for r in runs)
    lines = [f"# Sweep {sweep_dir.name}: {demo}", "",
             f"{len(runs)} configurations, {done} completed"
             + (f"; not completed: {', '.join(f'{r.name} ({r.status})' for r in runs if r.status != 'completed')}"
                if done < len(runs) else "") + ".",
             f"Generated by `mgr report {sweep_dir}` from the run directories; rerun it to update.", ""]
    shared = {k: v for k, v in (params[0] if params else {}).items() if k not in key_params}
    if shared:
        lines += ["Shared parameters: " + ", ".join(f"`{k}={fmt(v)}`" for k, v in shared.items()
                                                    if v is not None), ""]
    for variant in variants:
        lines.append(summary_table(report, variant, len(variants) > 1).markdown())
    for table in step_tables(report, variants):
        lines.append(table.markdown())
    for fn in SECTIONS.get(demo, []) + [_import(path, "sections") for path in options.get("sections", [])]:
        lines += [fn(report), ""]
    for file in plots(report, variants):
        lines += [f"![{file}]({file})", ""]
    text = "\n".join(lines).rstrip() + "\n"
    atomic_write_text(sweep_dir / "README.md", text)
    return text


def _import(path: str, key: str) -> Callable:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"[report] {key}: cannot load {path!r} ({e})") from None


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dir", help="artifacts/sweeps/<name>")
    parser.add_argument("--baseline", help="configuration the others are compared with (Δ, time to its final "
                                           "metric); default: [report] baseline in the spec, else none")
    parser.add_argument("--group-by", help="config.json field (e.g. config.depth) splitting the per-step tables")


def report_command(args: argparse.Namespace) -> int:
    sweep_dir = Path(args.sweep_dir)
    build(sweep_dir, args.baseline, args.group_by)
    print(f"wrote {sweep_dir / 'README.md'}")
    return 0


def tradeoff_section(report: Report, collect: Callable[[dict], dict[str, dict[str, Any]]], *, title: str,
                     reference_group: str, plot_file: str = "tradeoff.png") -> str:
    """A Pareto study across a sweep: every (configuration, variant) as a point of speedup vs quality gap over
    seeds, each with its 95% CI, and which points beat ``reference_group``'s points with separated CIs.

    ``collect(results_of_one_seed) -> {variant: {"group", "speedup", "gap_pct", **more}}`` reads a demo's own
    per-seed results; the speedup and gap are the demo's, paired in-process with its reference variant. ``more``
    are extra columns (ratios named ``*speedup*`` get geometric CIs). A point is on the front when no other point
    has a larger-or-equal mean speedup and a smaller-or-equal mean gap (one strictly); it beats a reference point
    when it is no worse on both means and its CI is clear of the other's on at least one axis."""
    samples: dict[str, dict[str, list]] = {}
    groups: dict[str, str] = {}
    for run in report.runs:
        if run.status != "completed":
            continue
        for results in run.results_per_seed().values():
            for variant, values in collect(results).items():
                label = f"{run.name}/{variant}"
                groups[label] = values["group"]
                for key, value in values.items():
                    if key != "group":
                        samples.setdefault(label, {}).setdefault(key, []).append(value)
    if not samples:
        return f"## {title}\n\nNo completed configuration yet.\n"
    stat = {label: {k: (describe_ratio if "speedup" in k else describe)(v) for k, v in cols.items()}
            for label, cols in samples.items()}
    stat = {label: s for label, s in stat.items() if None not in (s["speedup"]["mean"], s["gap_pct"]["mean"])}

    def ci(label, key):
        s = stat[label][key]
        return s["ci95"] or [s["mean"], s["mean"]]

    def dominates(p, q, separated=False):
        sp, gp, sq, gq = (stat[x][k]["mean"] for x in (p, q) for k in ("speedup", "gap_pct"))
        if not (sp >= sq and gp <= gq and (sp > sq or gp < gq)):
            return False
        return not separated or ci(p, "speedup")[0] > ci(q, "speedup")[1] or ci(p, "gap_pct")[1] < ci(q, "gap_pct")[0]

    labels = sorted(stat, key=lambda x: -stat[x]["speedup"]["mean"])
    reference = [q for q in labels if groups[q] == reference_group]
    extra = sorted({k for cols in samples.values() for k in cols} - {"speedup", "gap_pct"})
    rows = []
    for p in labels:
        front = not any(dominates(q, p) for q in labels if q != p)
        beats = [q for q in reference if q != p and dominates(p, q, separated=True)]
        rows.append([p, groups[p], fmt_ci(stat[p]["speedup"], 3), fmt_ci(stat[p]["gap_pct"], 3),
                     *(fmt_ci(stat[p][k], 3) for k in extra), "yes" if front else "",
                     ", ".join(beats) if groups[p] != reference_group else ""])
    table = Table(title, ["point", "group", "speedup", "gap %", *extra, "on front",
                          f"beats {reference_group} (CIs separated)"], rows,
                  note="mean [95% CI] (n seeds); speedups are geometric means with log-scale CIs.")
    plot_points(report.sweep_dir / plot_file,
                {g: [(p.split("/")[0], stat[p]["speedup"]["mean"], stat[p]["gap_pct"]["mean"], ci(p, "speedup"),
                      ci(p, "gap_pct")) for p in labels if groups[p] == g] for g in dict.fromkeys(groups.values())},
                xlabel="speedup (x)", ylabel="quality gap (%)", title=title)
    winners = sorted({p for p, *_ in rows if groups[p] != reference_group and
                      any(dominates(p, q, separated=True) for q in reference)})
    verdict = (f"Above the {reference_group} front with separated CIs: {', '.join(winners)}." if winners else
               f"No point beats a {reference_group} point with separated CIs: no rule is shown to be better.")
    return f"{table.markdown()}\n{verdict}\n\n![{plot_file}]({plot_file})\n"
