"""The banded study's report (mgr/banded_report.py) on synthetic rows whose answers are known by construction,
its sections and columns inside `mgr report` on synthetic run directories, and the llm.c log parser."""

import dataclasses
import json

import pytest

from mgr import banded_report as R

BWS = (256, 128, 64)
STEPS = (10, 20, 30)
DENS = {256: 1 / 3, 128: 1 / 6, 64: 1 / 12}
# Final-loss penalties chosen so every analysis answer is known: FC2 better at 256 and 128, a tie at 64;
# FC1+FC2 additive at 256, sub-additive at 128, super-additive at 64.
PENALTY = {("fc1", 256): 0.010, ("fc2", 256): 0.002, ("both", 256): 0.012,
           ("fc1", 128): 0.030, ("fc2", 128): 0.010, ("both", 128): 0.018,
           ("fc1", 64): 0.060, ("fc2", 64): 0.0601, ("both", 64): 0.200}
BASE = 2.0


def make_row(name, kind, bw, flops=100.0, tps=1000.0):
    fc1 = bw if kind in ("fc1", "both") else 0
    fc2 = bw if kind in ("fc2", "both") else 0
    final = BASE + PENALTY.get((kind, bw), 0.0)
    evals = tuple((s, final + 0.5 * (STEPS[-1] - s) / 10) for s in STEPS)
    return R.ConfigRow(name, fc1, fc2, DENS.get(fc1, 1.0), DENS.get(fc2, 1.0), evals, flops_per_step=flops,
                       tokens_per_second=tps)


@pytest.fixture
def rows():
    out = [make_row("baseline", "baseline", 0)]
    for kind in ("fc1", "fc2", "both"):
        for bw in BWS:
            mlp = (DENS[bw] + (1 if kind != "both" else DENS[bw])) / 2
            # Time falls half as much as FLOPs (0.4 of the MLP's share of the step's FLOPs is the MLP).
            flops = 100 * (0.6 + 0.4 * mlp)
            out.append(make_row(f"{kind}-{bw}", kind, bw, flops=flops, tps=1000 / (1 - (100 - flops) / 200)))
    return out


def test_bandwidth_tables_hold_every_eval_of_the_four_layouts(rows):
    tables = R.bandwidth_tables(rows)
    assert [t.title for t in tables] == ["Bandwidth = 256", "Bandwidth = 128", "Bandwidth = 64"]
    t = tables[1]
    assert list(t.columns) == ["step", "Baseline", "FC1-128", "FC2-128", "FC1+FC2-128"]
    assert [r[0] for r in t.rows] == [str(s) for s in STEPS]
    assert t.rows[-1] == ["30", "**2.0000**", "2.0300", "2.0100", "2.0180"]
    assert t.rows[0][1] == f"{BASE + 1.0:.4f}"


def test_analysis_answers_the_study_questions_with_numbers(rows):
    text = "\n".join(R.analysis(rows, tolerance_pct=1.0, tie_pct=0.1))
    assert "Scale of eval noise" not in text  # the synthetic baseline falls monotonically
    wobbly = [dataclasses.replace(rows[0], evals=((10, 2.5), (20, 2.1), (30, 2.0), (40, 2.03), (50, 2.0)))]
    assert "rises by up to 0.0300 (1.50%) between consecutive evals" in "\n".join(R.analysis(wobbly + rows[1:]))
    assert "Bandwidth 256: FC2 tolerates sparsity better (ΔFC1 +0.0100 = +0.50%, ΔFC2 +0.0020 = +0.10%)" in text
    assert "Bandwidth 64: FC1 and FC2 tolerate it alike" in text
    assert "Bandwidth 256: FC1+FC2 degradation is additive: Δboth +0.0120 vs ΔFC1 + ΔFC2 +0.0120" in text
    assert "Bandwidth 128: FC1+FC2 degradation is sub-additive" in text
    assert "Bandwidth 64: FC1+FC2 degradation is super-additive" in text
    # Rule: smallest MLP density with Δ <= 1%: FC1 only passes at 256 (+0.5%), FC2 at 256 and 128 (+0.5%).
    assert "Sweet spot FC1 (rule: smallest MLP density with Δ ≤ 1%): bandwidth 256, MLP density 66.7%" in text
    assert "Sweet spot FC2 (rule: smallest MLP density with Δ ≤ 1%): bandwidth 128, MLP density 58.3%" in text
    assert "Sweet spot FC1+FC2 (rule: smallest MLP density with Δ ≤ 1%): bandwidth 128" in text
    assert "(50% of the FLOPs saving became time)" in text
    assert "FLOPs saved turned into time saved in 9 of 9 sparse configurations." in text


def test_render_writes_every_section_and_the_charts(rows, tmp_path):
    meta = {"C": 192, "L": 3, "NH": 3, "vocab": 257, "T": 64, "steps": 30}
    text = R.render(meta, rows, plot_dir=tmp_path, title="Banded FC1/FC2")
    for heading in ("# Banded FC1/FC2", "## Overview", "### Density by bandwidth", "### Bandwidth = 64",
                    "## Analysis", "## Charts"):
        assert heading in text
    assert "| 64 | 8.3% | 8.3% | 8.3% |" in text
    for name in ("val_loss_by_bandwidth", "delta_vs_density"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        assert f"]({name}.png)" in text
    assert all(len(line) <= 200 or line.startswith("|") for line in text.splitlines())


def test_llmc_logs_parse_into_rows():
    def log(vals):
        lines = ["step 1/5000: train loss 10.9 (12 ms)"]
        lines += [f"s:{s} tel:{v:.4f}" for s, v in vals]
        return "\n".join(lines + ["s:9 trl:3.0000"]) + "\n"
    logs = {"logs/log_baseline.txt": log([(0, 10.8544), (500, 4.0036), (1000, 3.4095)]),
            "log_fc2_bw512.txt": log([(0, 10.8544), (500, 4.0155), (1000, 3.3967)]),
            "both_bw256": log([(500, 4.1009), (1000, 3.4815)])}
    rows = {r.name: r for r in R.rows_from_llmc_logs(logs, n_embd=768)}
    assert rows["baseline"].evals == ((500, 4.0036), (1000, 3.4095)) and rows["baseline"].kind == "baseline"
    assert rows["fc2_bw512"].kind == "fc2" and rows["fc2_bw512"].bandwidth == 512
    assert rows["fc2_bw512"].fc2_density == pytest.approx(0.1600, abs=1e-4) and rows["fc2_bw512"].fc1_density == 1
    assert rows["both_bw256"].kind == "both" and rows["both_bw256"].final_val_loss == 3.4815
    assert R.parse_llmc_log("s:5 tel:nan\ns:3 tel:2.5\n")[0] == (3, 2.5)
    with pytest.raises(ValueError, match="expected baseline"):
        R.rows_from_llmc_logs({"fc3_bw12": ""})
    table = R.bandwidth_tables(list(rows.values()))
    assert [t.title for t in table] == ["Bandwidth = 512", "Bandwidth = 256"]


def test_mgr_report_plugs_in_the_banded_section_and_columns(rows, tmp_path):
    """A sweep directory as `mgr sweep --spec experiments/banded_fc_cpu.toml` leaves it (run dirs, sweep.json
    with the spec's [report], the shared _init run) gives one README: mgr.report's summary table with the layer and
    density columns, then the banded sections."""
    from mgr.report import build
    sweep_dir = tmp_path / "sweeps" / "banded"
    report_opts = {"baseline": "baseline", "sections": ["mgr.banded_report:section"],
                   "columns": ["mgr.banded_report:columns"]}
    for r in rows + [make_row("_init", "baseline", 0)]:
        step_s = 512 / r.tokens_per_second
        series = [{"step": s, "val_loss": v, "val_bpb": None, "train_s_est": s * step_s} for s, v in r.evals]
        points = [{"step": s, "flops": s * r.flops_per_step, "train_s": s * step_s, "wall_s": 2 * s * step_s,
                   "value": v} for s, v in r.evals]
        results = {"model": {"n_embd": 192, "n_layer": 3, "n_head": 3, "vocab_size": 257, "sequence_len": 64},
                   "tokens_per_step": 512, "flops_per_step_measured": r.flops_per_step,
                   "tokens_per_second": r.tokens_per_second, "val_bpb_series": series,
                   "mlp": {"fc1": {"bandwidth": r.fc1_bandwidth, "density": r.fc1_density},
                           "fc2": {"bandwidth": r.fc2_bandwidth, "density": r.fc2_density}},
                   "train": {"nanochat": {"steps": 30, "flops_per_step": r.flops_per_step, "eval_points": points}}}
        (sweep_dir / r.name).mkdir(parents=True)
        (sweep_dir / r.name / "summary.json").write_text(json.dumps({
            "status": "completed", "budget": {"steps": 30}, "results": results,
            "meta": {"device": {"device_kind": "cpu"}, "command": "mgr sweep nanochat"}}))
        (sweep_dir / r.name / "config.json").write_text(json.dumps({"demo": "nanochat", "seed": 0, "config": {
            "fc1_bandwidth": r.fc1_bandwidth, "fc2_bandwidth": r.fc2_bandwidth, "data": None}}))
    (sweep_dir / "sweep.json").write_text(json.dumps({"demo": "nanochat", "report": report_opts,
                                                      "configs": [{"name": r.name} for r in rows]}))
    text = build(sweep_dir)
    assert "10 configurations, 10 completed" in text and "_init" not in text
    summary = text[text.index("### Summary"):text.index("### val_loss at every eval step")]
    header = next(l for l in summary.splitlines() if l.startswith("| configuration"))
    assert header.startswith("| configuration | fc1_bandwidth | fc2_bandwidth | status |")
    assert header.endswith("| layer | MLP density |")
    both64 = next(l for l in summary.splitlines() if l.startswith("| both-64 |")).split(" | ")
    assert both64[-2:] == ["FC1+FC2", "8.3% |"] and both64[-4] == "not reached"  # it ends above the baseline
    fc1_128 = next(l for l in summary.splitlines() if l.startswith("| fc1-128 |")).split(" | ")
    assert fc1_128[7] == "+1.5% (n=1)" and fc1_128[-1] == "58.3% |"
    banded = text[text.index("## Overview"):]
    assert banded.startswith(R.render({"C": 192, "L": 3, "NH": 3, "vocab": 257, "T": 64, "tokens_per_step": 512,
                                       "steps": 30, "device": "cpu", "command": "mgr sweep nanochat",
                                       "data": "synthetic default (nanochat.data)"}, rows,
                                      plot_dir=tmp_path / "again").rstrip())
    for plot in ("val_loss_by_bandwidth.png", "delta_vs_density.png", "loss_vs_time.png"):
        assert (sweep_dir / plot).stat().st_size > 0 and f"]({plot})" in text
