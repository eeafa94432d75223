"""`mgr compare` over seeds (paired vs Welch), run status, demo mismatch, duplicates, higher-is-better metrics."""

import json

import numpy as np
import pytest
from scipy import stats as sp

from mgr.cli import main
from tests.conftest import one_error_line
from tests.test_cli import compare_rows


def _seeded(tmp_path, name, losses: dict, *, status="completed", demo="toy", acc=None):
    run_dir = tmp_path / name
    run_dir.mkdir()
    per_seed = {str(s): {"train": {"v": {"final_loss": loss, "time_to_quality": {"reached": True, "wall_s": 2 * loss}}},
                         **({"eval_acc": acc[s]} if acc else {})} for s, loss in losses.items()}
    (run_dir / "summary.json").write_text(json.dumps({
        "schema_version": "mgr.telemetry.v1", "status": status, "error": None, "meta": {"seed": 0},
        "results": {"seeds": list(losses), "per_seed": per_seed}}))
    (run_dir / "config.json").write_text(json.dumps({"demo": demo}))
    return str(run_dir)


BASE = {0: 2.0, 1: 3.0, 2: 4.0, 3: 2.5}
SHIFT = {0: 0.1, 1: 0.12, 2: 0.09, 3: 0.11}  # a consistent +4% or so within each seed, far below the seed spread


def test_paired_by_seed_finds_a_consistent_shift(tmp_path, capsys):
    base = _seeded(tmp_path, "base", BASE)
    cand = _seeded(tmp_path, "cand", {s: v + SHIFT[s] for s, v in BASE.items()})
    assert main(["compare", base, cand, "--fail-on-regression"]) == 1
    rows = compare_rows(capsys.readouterr().out)
    delta, verdict = rows["train.v.final_loss"]
    assert verdict == "regressed"
    diffs = np.array(list(SHIFT.values()))
    lo, hi = sp.t.interval(0.95, 3, loc=diffs.mean(), scale=sp.sem(diffs))
    mean_base = np.mean(list(BASE.values()))
    assert delta == f"{diffs.mean() / mean_base:+.2%} [{lo / mean_base:+.2%}, {hi / mean_base:+.2%}]"
    assert rows["train.v.time_to_quality.wall_s"][1] == "ok"  # compared, lower is better, within 5% tolerance


def test_unpaired_seeds_use_welch_and_find_no_difference(tmp_path, capsys):
    base = _seeded(tmp_path, "base", BASE)
    cand = _seeded(tmp_path, "cand", {s + 10: v + SHIFT[s] for s, v in BASE.items()})  # other seeds
    assert main(["compare", base, cand, "--fail-on-regression"]) == 0  # no significant regression: exit 0
    assert compare_rows(capsys.readouterr().out)["train.v.final_loss"][1] == "no significant difference"


def test_accuracy_is_higher_is_better(tmp_path, capsys):
    acc = {0: 0.9, 1: 0.8, 2: 0.85, 3: 0.95}
    base = _seeded(tmp_path, "base", BASE, acc=acc)
    cand = _seeded(tmp_path, "cand", BASE, acc={s: a + 0.05 + 0.001 * s for s, a in acc.items()})
    assert main(["compare", base, cand, "--fail-on-regression"]) == 0
    assert compare_rows(capsys.readouterr().out)["eval_acc"][1] == "improved"


@pytest.mark.parametrize("status", ["failed", "interrupted", "diverged"])
def test_a_run_that_did_not_complete_is_a_regression(tmp_path, capsys, status):
    base = _seeded(tmp_path, "base", BASE)
    cand = _seeded(tmp_path, "cand", BASE, status=status)
    assert main(["compare", base, cand]) == 0
    assert main(["compare", base, cand, "--fail-on-regression"]) == 1
    assert f"candidate run {status}" in capsys.readouterr().out


def test_different_demos_and_nothing_shared_are_one_error_line(tmp_path, capsys):
    base = _seeded(tmp_path, "base", BASE)
    other = _seeded(tmp_path, "other", BASE, demo="nanochat")
    assert main(["compare", base, other]) == 2
    assert "different demos" in one_error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "summary.json").write_text(json.dumps({"schema_version": "mgr.telemetry.v1", "status": "completed",
                                                    "results": {"x": "text"}}))
    assert main(["compare", base, str(empty)]) == 2
    assert "share no numeric results" in one_error_line(capsys)
    assert main(["compare", base, str(empty / "summary.json")]) == 2  # the summary file stands for its run
    assert "share no numeric results" in one_error_line(capsys)
    (empty / "notes.txt").write_text("hello")
    assert main(["compare", base, str(empty / "notes.txt")]) == 2
    assert "not a run directory" in one_error_line(capsys)


def test_one_row_per_metric(tmp_path, capsys):
    dirs = []
    for name, loss in (("a", 1.0), ("b", 1.5)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        train = {"final_loss": loss, "steps": 3}
        (run_dir / "summary.json").write_text(json.dumps({"schema_version": "mgr.telemetry.v1", "status": "completed", "results": {
            "attention": train, "train": {"attention": train}}}))
        dirs.append(str(run_dir))
    assert main(["compare", *dirs]) == 0
    rows = compare_rows(capsys.readouterr().out)
    assert set(rows) == {"train.attention.final_loss", "train.attention.steps"}
