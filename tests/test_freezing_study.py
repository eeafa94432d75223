"""The block-update study's Pareto section (mgr.report.tradeoff_section) on synthetic runs, and its reduced grid
run end to end through mgr sweep + mgr report."""

import json

import numpy as np

from mgr.cli import main
from mgr.report import Report, load, tradeoff_section
from mgr.stats import describe, describe_ratio, fmt_ci


def _run(sweep_dir, name, schedule, speedups, gaps):
    """A --seeds block-update-schedule run: full_update beside one other schedule, per seed."""
    run_dir = sweep_dir / name
    run_dir.mkdir(parents=True)
    per_seed = {str(s): {"schedules": {
        "full_update": {"speedup_timed_depths": 1.0, "gap_vs_full_pct": 0.0, "mean_active_depth": 8.0},
        schedule: {"speedup_timed_depths": sp, "gap_vs_full_pct": g, "mean_active_depth": 5.0,
                   "speedup_to_full_final_train_s": None, "gap_equal_time_pct": -g}}}
        for s, (sp, g) in enumerate(zip(speedups, gaps))}
    (run_dir / "config.json").write_text(json.dumps({"demo": "block-update-schedule", "config": {}, "seed": 0,
                                                     "seeds": [0, 1, 2]}))
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "results": {"per_seed": per_seed}}))


def _collect(results):
    from demos.block_update_schedule import _schedule_tradeoff
    return _schedule_tradeoff(results)


def test_tradeoff_marks_the_front_and_ci_separated_wins(tmp_path):
    sweep = tmp_path / "sweeps" / "study"
    _run(sweep, "static_k4", "static_suffix", [1.30, 1.31, 1.29], [2.0, 2.2, 1.8])
    _run(sweep, "static_k6", "static_suffix", [1.10, 1.12, 1.11], [0.9, 1.1, 1.0])
    _run(sweep, "good", "dynamic_suffix", [1.30, 1.32, 1.31], [0.5, 0.6, 0.4])  # k4's speed at half k6's gap
    _run(sweep, "noisy", "dynamic_suffix", [1.0, 1.6, 1.3], [0.0, 3.0, 1.5])  # CIs overlap everything
    _run(sweep, "slow", "progressive", [1.05, 1.06, 1.04], [1.5, 1.6, 1.4])  # dominated by static_k6
    demo, runs, _ = load(sweep)
    report = Report(sweep, demo, "val_loss", runs, None, [], None)
    text = tradeoff_section(report, _collect, title="study", reference_group="static_suffix")
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")]
    header, rows = cells[0], {row[0]: row for row in cells[1:] if "/" in row[0]}
    assert set(rows) == {"static_k4/static_suffix", "static_k6/static_suffix", "good/dynamic_suffix",
                         "noisy/dynamic_suffix", "slow/progressive"}
    good = rows["good/dynamic_suffix"]
    assert good[2] == fmt_ci(describe_ratio([1.30, 1.32, 1.31]), 3)
    assert good[3] == fmt_ci(describe([0.5, 0.6, 0.4]), 3)
    front, beats = header.index("on front"), header.index("beats static_suffix (CIs separated)")
    assert good[front] == "yes" and rows["slow/progressive"][front] == ""
    assert rows["static_k4/static_suffix"][front] == ""  # good has the same speed at a smaller gap
    assert good[beats] == "static_k4/static_suffix, static_k6/static_suffix"
    assert rows["noisy/dynamic_suffix"][beats] == "" and rows["slow/progressive"][beats] == ""
    assert "Above the static_suffix front with separated CIs: good/dynamic_suffix." in text
    assert (sweep / "tradeoff.png").stat().st_size > 0


def test_no_winner_is_said_plainly(tmp_path):
    sweep = tmp_path / "sweeps" / "study"
    _run(sweep, "static_k4", "static_suffix", [1.30, 1.31, 1.29], [2.0, 2.2, 1.8])
    _run(sweep, "noisy", "dynamic_suffix", [1.0, 1.6, 1.3], [0.0, 3.0, 1.5])
    demo, runs, _ = load(sweep)
    text = tradeoff_section(Report(sweep, demo, "val_loss", runs, None, [], None), _collect, title="study",
                            reference_group="static_suffix")
    assert "No point beats a static_suffix point with separated CIs" in text


SPEC = """
demo = "block-update-schedule"
[flags]
model = "resmlp"
depth = 4
width = 16
batch_size = 32
max_iterations = 24
eval_every = 8
eval_tokens = 512
timing_rounds = 2
freeze_start_frac = 0.25
probe_every = 4
seeds = "0,1"
[[config]]
name = "static_k2"
schedules = "full_update,static_suffix"
static_depth = 2
[[config]]
name = "progressive"
schedules = "full_update,progressive"
[[config]]
name = "plasticity_snr"
schedules = "full_update,dynamic_suffix"
rule = "plasticity"
relevance = "snr"
"""


def test_the_reduced_study_runs_and_reports(tmp_path, capsys):
    spec = tmp_path / "study.toml"
    spec.write_text(SPEC)
    assert main(["sweep", "--spec", str(spec), "--artifacts-dir", str(tmp_path / "a")]) == 0
    sweep = tmp_path / "a" / "sweeps" / "study"
    assert main(["report", str(sweep)]) == 0
    text = (sweep / "README.md").read_text()
    assert "Speedup (timed depths) vs val-loss gap to full_update, over seeds" in text
    for point in ("static_k2/static_suffix", "progressive/progressive", "plasticity_snr/dynamic_suffix"):
        assert f"| {point} |" in text
    assert "(n=2)" in text and (sweep / "schedules_tradeoff.png").stat().st_size > 0
    summary = json.loads((sweep / "plasticity_snr" / "summary.json").read_text())
    for seed in ("0", "1"):
        e = summary["results"]["per_seed"][seed]["schedules"]["dynamic_suffix"]
        assert e["n_probes"] > 0 and np.isfinite(e["final_eval"]["val_loss_se"])
        assert e["gap_equal_time_pct"] is None or np.isfinite(e["gap_equal_time_pct"])
