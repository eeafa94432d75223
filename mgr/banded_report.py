"""The banded FC1/FC2 study's README sections, computed from its runs: pure functions from per-configuration rows to
markdown and charts, plugged into `mgr report` by the study's specs (``[report] sections`` / ``columns``:
``section`` and ``columns`` below), plus the row builders for nanochat summaries and for the earlier experiment's
llm.c logs (`s:<step> tel:<val loss>` lines; tabulate them with ``render``).

A row is one configuration: the baseline (both bandwidths 0), FC1 only, FC2 only, or FC1+FC2 (equal bandwidths).
Every claim of the analysis carries the numbers behind it. Rows come from one seed each, so there is no confidence
interval: differences under ``tie_pct`` percent of the baseline's final loss are called no clear difference.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

from mgr.methods.banded import element_band_density
from mgr.plots import figure, save
from mgr.results import Table, fmt

KINDS = {"fc1": "FC1", "fc2": "FC2", "both": "FC1+FC2"}


@dataclasses.dataclass(frozen=True)
class ConfigRow:
    name: str
    fc1_bandwidth: int
    fc2_bandwidth: int
    fc1_density: float | None
    fc2_density: float | None
    evals: tuple[tuple[int, float], ...]                  # (step, val loss), in step order
    flops_per_step: float | None = None
    tokens_per_second: float | None = None

    @property
    def kind(self) -> str:
        if self.fc1_bandwidth == self.fc2_bandwidth == 0:
            return "baseline"
        if self.fc2_bandwidth == 0:
            return "fc1"
        if self.fc1_bandwidth == 0:
            return "fc2"
        return "both" if self.fc1_bandwidth == self.fc2_bandwidth else "other"

    @property
    def bandwidth(self) -> int:
        return max(self.fc1_bandwidth, self.fc2_bandwidth)

    @property
    def layer_density(self) -> float | None:
        """Density of the banded layer(s) of this configuration (1 for the baseline)."""
        return {"baseline": 1.0, "fc1": self.fc1_density, "fc2": self.fc2_density}.get(self.kind, self.fc1_density)

    @property
    def mlp_density(self) -> float | None:
        """Fraction of the MLP's weights kept (FC1 and FC2 have the same size)."""
        if self.fc1_density is None or self.fc2_density is None:
            return None
        return (self.fc1_density + self.fc2_density) / 2

    @property
    def final_val_loss(self) -> float | None:
        return self.evals[-1][1] if self.evals else None


# --- rows ------------------------------------------------------------------------------------------------------

def row_from_summary(name: str, summary: dict[str, Any]) -> ConfigRow:
    """A row from a nanochat run's summary.json (mgr.telemetry.v1) with its MLP bands recorded."""
    r = summary["results"]
    mlp = r["mlp"]
    series = r.get("val_bpb_series") or []
    return ConfigRow(
        name=name, fc1_bandwidth=mlp["fc1"]["bandwidth"], fc2_bandwidth=mlp["fc2"]["bandwidth"],
        fc1_density=mlp["fc1"]["density"], fc2_density=mlp["fc2"]["density"],
        evals=tuple((e["step"], e["val_loss"]) for e in series),
        flops_per_step=r.get("flops_per_step_measured"), tokens_per_second=r.get("tokens_per_second"))


def meta_from_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The overview's facts from one run of the sweep (they are shared by all its runs)."""
    r, model = summary["results"], summary["results"]["model"]
    return {"C": model["n_embd"], "L": model["n_layer"], "NH": model["n_head"], "vocab": model["vocab_size"],
            "T": model["sequence_len"], "tokens_per_step": r.get("tokens_per_step"),
            "steps": summary.get("budget", {}).get("steps"), "device": summary.get("meta", {}).get("device", {})
            .get("device_kind"), "command": summary.get("meta", {}).get("command")}


_LOG_LINE = re.compile(r"^s:(\d+)\s+tel:([-+0-9.eE]+|nan|inf)", re.MULTILINE)
_LOG_NAME = re.compile(r"(baseline|fc1|fc2|both)(?:[_-]bw|[_-])?(\d+)?")


def parse_llmc_log(text: str) -> list[tuple[int, float]]:
    """(step, val loss) of every `s:<step> tel:<val loss>` line of an llm.c training log, in step order."""
    return sorted((int(s), float(v)) for s, v in _LOG_LINE.findall(text))


def rows_from_llmc_logs(logs: dict[str, str], n_embd: int = 768) -> list[ConfigRow]:
    """Rows from the earlier experiment's logs, named as its run_all.sh named them (baseline, fc1_bw1024,
    fc2_bw512, both_bw256; log_ prefixes and .txt suffixes are dropped). Densities are those of its element-wise
    mask |j - 4i| <= b/2 on a C x 4C matrix (``element_band_density``). The step-0 eval (the shared initial model)
    is dropped. Those logs carry no time or FLOPs."""
    rows = []
    for raw, text in logs.items():
        name = Path(raw).name.removeprefix("log_").removesuffix(".txt")
        m = _LOG_NAME.fullmatch(name)
        if not m or (m.group(1) != "baseline") != bool(m.group(2)):
            raise ValueError(f"llm.c log {raw!r}: expected baseline, fc1_bw<N>, fc2_bw<N> or both_bw<N>")
        kind, bw = m.group(1), int(m.group(2) or 0)
        fc1 = bw if kind in ("fc1", "both") else 0
        fc2 = bw if kind in ("fc2", "both") else 0
        d = lambda b: element_band_density(b, n_embd, 4 * n_embd)
        rows.append(ConfigRow(name=name, fc1_bandwidth=fc1, fc2_bandwidth=fc2, fc1_density=d(fc1),
                              fc2_density=d(fc2), evals=tuple(e for e in parse_llmc_log(text) if e[0] > 0)))
    return rows


# --- sections --------------------------------------------------------------------------------------------------

def _baseline(rows: Sequence[ConfigRow]) -> ConfigRow:
    base = [r for r in rows if r.kind == "baseline"]
    if len(base) != 1:
        raise ValueError(f"need exactly one baseline (both bandwidths 0), got {len(base)}")
    return base[0]


def _bandwidths(rows: Sequence[ConfigRow]) -> list[int]:
    return sorted({r.bandwidth for r in rows if r.kind in KINDS}, reverse=True)


def _by(rows: Sequence[ConfigRow], kind: str, bw: int) -> ConfigRow | None:
    return next((r for r in rows if r.kind == kind and r.bandwidth == bw), None)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def delta_pct(row: ConfigRow, base: ConfigRow) -> float | None:
    if row.final_val_loss is None or base.final_val_loss is None:
        return None
    return 100 * (row.final_val_loss - base.final_val_loss) / base.final_val_loss


def overview(meta: dict[str, Any], rows: Sequence[ConfigRow]) -> str:
    facts = ", ".join(f"{k} {fmt(meta[k])}" for k in ("C", "L", "NH", "vocab", "T") if meta.get(k) is not None)
    lines = ["## Overview", "", f"- architecture: {facts or 'not recorded'}"]
    for key, label in (("steps", "steps"), ("tokens_per_step", "tokens per step"), ("data", "data"),
                       ("device", "device"), ("command", "command")):
        if meta.get(key) is not None:
            lines.append(f"- {label}: {fmt(meta[key])}")
    lines.append(f"- configurations: {len(rows)} ({', '.join(r.name for r in rows)})")
    dens = []
    for bw in _bandwidths(rows):
        d1 = next((r.fc1_density for r in rows if r.fc1_bandwidth == bw), None)
        d2 = next((r.fc2_density for r in rows if r.fc2_bandwidth == bw), None)
        dens.append([str(bw), _pct(d1), _pct(d2), _pct(None if d1 is None or d2 is None else (d1 + d2) / 2)])
    table = Table("Density by bandwidth", ["bandwidth", "FC1 density", "FC2 density", "MLP density (FC1+FC2)"],
                  dens, note="density = fraction of the layer's weights that exist and execute")
    return "\n".join(lines) + "\n\n" + table.markdown()


def bandwidth_tables(rows: Sequence[ConfigRow]) -> list[Table]:
    """One table per bandwidth: val loss at every eval step of the baseline and the three banded layouts."""
    base = _baseline(rows)
    tables = []
    for bw in _bandwidths(rows):
        cols = [base] + [_by(rows, k, bw) for k in KINDS]
        loss = [dict(c.evals) if c else {} for c in cols]
        steps = sorted(set().union(*loss))
        best = lambda s: min((v[s] for v in loss if s in v), default=None)
        body = [[str(s)] + [_bold(v.get(s), v.get(s) == best(s) and s == steps[-1]) for v in loss] for s in steps]
        tables.append(Table(f"Bandwidth = {bw}", ["step", "Baseline"] + [f"{KINDS[k]}-{bw}" for k in KINDS],
                            body, note="val loss (nats/token); bold: lowest final loss"))
    return tables


def _bold(value: float | None, bold: bool) -> str:
    return "—" if value is None else (f"**{value:.4f}**" if bold else f"{value:.4f}")


def analysis(rows: Sequence[ConfigRow], *, tolerance_pct: float = 1.0, tie_pct: float = 0.1) -> list[str]:
    """The study's questions answered from the numbers, one claim per bullet with its figures."""
    base = _baseline(rows)
    L0 = base.final_val_loss
    tie = tie_pct / 100 * L0
    out = [f"One seed per configuration, so no confidence intervals: differences under {tie_pct:g}% of the "
           f"baseline's final loss {L0:.4f} (= {tie:.4f}) are called no clear difference."]
    late = [v for _, v in base.evals[len(base.evals) // 2:]]
    wobble = max((b - a for a, b in zip(late, late[1:])), default=0.0)
    if wobble > 0:
        out.append(f"Scale of eval noise: the baseline's val loss rises by up to {wobble:.4f} "
                   f"({100 * wobble / L0:.2f}%) between consecutive evals in the second half of training; "
                   f"differences of that size are not evidence.")
    for bw in _bandwidths(rows):
        r1, r2, rb = (_by(rows, k, bw) for k in KINDS)
        if not (r1 and r2):
            continue
        d1, d2 = r1.final_val_loss - L0, r2.final_val_loss - L0
        if abs(d1 - d2) < tie:
            verdict = "FC1 and FC2 tolerate it alike"
        else:
            verdict = f"{'FC1' if d1 < d2 else 'FC2'} tolerates sparsity better"
        out.append(f"Bandwidth {bw}: {verdict} (ΔFC1 {d1:+.4f} = {100 * d1 / L0:+.2f}%, ΔFC2 {d2:+.4f} = "
                   f"{100 * d2 / L0:+.2f}%).")
        if rb:
            db, ds = rb.final_val_loss - L0, d1 + d2
            kind = ("additive" if abs(db - ds) < tie else "sub-additive (less than the sum)" if db < ds
                    else "super-additive (more than the sum)")
            out.append(f"Bandwidth {bw}: FC1+FC2 degradation is {kind}: Δboth {db:+.4f} vs ΔFC1 + ΔFC2 {ds:+.4f} "
                       f"(difference {db - ds:+.4f}).")
    for kind, label in KINDS.items():
        ok = [r for r in rows if r.kind == kind and delta_pct(r, base) is not None
              and delta_pct(r, base) <= tolerance_pct and r.mlp_density is not None]
        if not any(r.kind == kind for r in rows):
            continue
        if ok:
            best = min(ok, key=lambda r: r.mlp_density)
            out.append(f"Sweet spot {label} (rule: smallest MLP density with Δ ≤ {tolerance_pct:g}%): bandwidth "
                       f"{best.bandwidth}, MLP density {_pct(best.mlp_density)}, Δ {delta_pct(best, base):+.2f}%.")
        else:
            out.append(f"Sweet spot {label}: no bandwidth keeps Δ ≤ {tolerance_pct:g}%.")
    timed = [r for r in rows if r is not base and r.flops_per_step and r.tokens_per_second]
    if base.flops_per_step and base.tokens_per_second and timed:
        turned = 0
        for r in timed:
            flops_saved = 1 - r.flops_per_step / base.flops_per_step
            time_saved = 1 - base.tokens_per_second / r.tokens_per_second
            turned += time_saved > 0
            share = f"{100 * time_saved / flops_saved:.0f}% of the FLOPs saving" if flops_saved > 0 else "—"
            out.append(f"{r.name}: FLOPs/step {-100 * flops_saved:+.1f}%, time/step {-100 * time_saved:+.1f}% "
                       f"({share} became time).")
        out.append(f"FLOPs saved turned into time saved in {turned} of {len(timed)} sparse configurations.")
    return out


def charts(rows: Sequence[ConfigRow], plot_dir: Path) -> list[Path]:
    """val loss vs step per bandwidth, final Δ vs density (mgr report draws loss vs time for every sweep)."""
    base, bws, paths = _baseline(rows), _bandwidths(rows), []
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    if bws:
        fig, axes = figure(len(bws))
        for ax, bw in zip(axes, bws):
            for r in [base] + [_by(rows, k, bw) for k in KINDS]:
                if r:
                    ax.plot(*zip(*r.evals), marker="o", markersize=3, label=r.name)
            ax.set(title=f"bandwidth {bw}", xlabel="step", ylabel="val loss")
            ax.legend()
        paths.append(save(fig, plot_dir / "val_loss_by_bandwidth.png"))
        fig, (ax,) = figure()
        for kind, label in KINDS.items():
            pts = sorted((r.layer_density, delta_pct(r, base)) for r in rows if r.kind == kind)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set(xlabel="density of the banded layer(s)", ylabel="final Δ vs baseline (%)",
               title="final val loss vs density")
        ax.legend()
        paths.append(save(fig, plot_dir / "delta_vs_density.png"))
    return paths


def render(meta: dict[str, Any], rows: Sequence[ConfigRow], *, plot_dir: Path | None = None,
           tolerance_pct: float = 1.0, title: str | None = None) -> str:
    """Overview, the per-bandwidth tables, the analysis and (into ``plot_dir``, linked relative to it) the charts.

    ``mgr report`` calls it through ``section``; for the earlier experiment's llm.c logs call it directly::

        rows = rows_from_llmc_logs({p.name: p.read_text() for p in Path("logs").glob("log_*.txt")})
        Path("README.md").write_text(render({"C": 768, "L": 12, "NH": 12}, rows, plot_dir=Path("."), title="..."))
    """
    parts = ([f"# {title}", ""] if title else []) + [overview(meta, rows), "## Validation loss at each eval", ""]
    parts += [t.markdown() for t in bandwidth_tables(rows)]
    parts += ["## Analysis", ""] + [f"- {line}" for line in analysis(rows, tolerance_pct=tolerance_pct)]
    if plot_dir is not None:
        parts += ["", "## Charts", ""] + [f"![{p.stem}]({p.name})" for p in charts(rows, plot_dir)]
    return "\n".join(parts) + "\n"


# --- mgr report: [report] sections = ["mgr.banded_report:section"], columns = ["mgr.banded_report:columns"] --

def _banded_runs(report) -> list:
    return [r for r in report.runs if (r.summary or {}).get("results", {}).get("mlp")]


def columns(run) -> dict[str, Any]:
    """The summary table's extra columns (mgr.report.summary_table): which layer is banded, the MLP's density."""
    mlp = (run.summary or {}).get("results", {}).get("mlp")
    if not mlp:
        return {}
    row = row_from_summary(run.name, run.summary)
    return {"layer": KINDS.get(row.kind, row.kind), "MLP density": _pct(row.mlp_density)}


def section(report) -> str:
    """The banded study's sections of ``mgr report``'s README, from the sweep's nanochat run directories (the
    summary table, loss-vs-time plot and time to the baseline's loss are mgr.report's own)."""
    runs = _banded_runs(report)
    rows = [row_from_summary(r.name, r.summary) for r in runs]
    if sum(r.kind == "baseline" for r in rows) != 1:
        return "## Banded FC1/FC2\n\nWaiting for exactly one completed baseline run (both bandwidths 0).\n"
    config = runs[0].config.get("config") or {}
    meta = {**meta_from_summary(runs[0].summary), "data": config.get("data") or "synthetic default (nanochat.data)"}
    return render(meta, rows, plot_dir=report.sweep_dir)
