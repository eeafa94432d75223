"""The `mgr` command: bad input is one `error:` line and exit 2; list, help, show and compare do their job."""

import json
import re
import subprocess
import sys

import jax
import pytest

import demos
from mgr.cli import main
from tests.conftest import REPO, TOY_MODULE, one_error_line, read_json


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # rich sizes non-terminal output from COLUMNS; wide enough that no table cell is folded.
    monkeypatch.setenv("COLUMNS", "240")


BUDGET_FLAGS = ("--max-iterations", "--target-flops", "--time-budget")


@pytest.mark.parametrize("flag", BUDGET_FLAGS)
@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf", ""])
def test_bad_budget_values(run_toy, capsys, flag, value):
    code, run_dir = run_toy("bad", flag, value)
    assert code == 2
    assert flag in one_error_line(capsys)
    assert not run_dir.exists()


def test_fractional_iterations(run_toy, capsys):
    assert run_toy("bad", "--max-iterations", "2.5")[0] == 2
    assert "--max-iterations" in one_error_line(capsys)


def test_target_smaller_than_one_step(run_toy, capsys):
    code, run_dir = run_toy("tiny", "--target-flops", "10")
    assert code == 2
    assert "smaller than one step" in one_error_line(capsys)
    s = read_json(run_dir / "summary.json")  # the refused run still leaves its record
    assert s["status"] == "failed" and "smaller than one step" in s["error"]


@pytest.mark.parametrize("argv, expected", [
    (["run", "tyo"], ["'tyo'", "did you mean toy", "mgr list"]),
    (["run", "nothing-like-it"], ["unknown demo", "mgr list"]),
    (["run", "toy", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["run", "toy", "--width", "wide"], ["--width", "int", "'wide'"]),
    (["run", "toy", "--lr", "fast"], ["--lr", "float"]),
    (["run", "toy", "--variants", "cheap", "--hidden", "3.5"], ["--hidden"]),
    (["run", "toy", "--init", "uniform"], ["--init", "invalid choice", "'uniform'"]),
    (["run", "toy", "--device", "tpu"], ["--device", "invalid choice"]),
    (["run", "toy", "--warmup-steps", "-1"], ["--warmup-steps"]),
    (["run"], ["mgr run <demo>", "mgr list"]),
    (["run", "--help"], ["mgr run <demo>", "mgr list"]),
    ([], ["command"]),
    (["frobnicate"], ["invalid choice"]),
    (["show", "/nonexistent/run"], ["/nonexistent/run/summary.json", "does not exist"]),
    (["compare", "a", "b", "--loss-tolerance", "-1"], ["--loss-tolerance", ">= 0"]),
    (["run", "toy", "--width", "1.55e1"], ["--width", "int", "'1.55e1'"]),
])
def test_bad_input_is_one_error_line(toy, capsys, argv, expected):
    assert main(argv) == 2
    line = one_error_line(capsys)
    for text in expected:
        assert text in line, line


def test_compare_with_a_missing_run(run_toy, tmp_path, capsys):
    assert run_toy("real", "--max-iterations", "2", "--variants", "cheap")[0] == 0
    capsys.readouterr()
    real = tmp_path / "tests" / "toy" / "real"
    missing = tmp_path / "missing"
    for argv in (["compare", str(real), str(missing)], ["compare", str(missing), str(real)]):
        assert main(argv) == 2
        assert f"{missing}/summary.json does not exist" in one_error_line(capsys)


def test_list_prints_registered_demos(monkeypatch, capsys):
    monkeypatch.setattr(demos, "REGISTRY", {"toy": TOY_MODULE, "toy-again": TOY_MODULE})
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["toy", "toy-again"]
    assert all(line.endswith("toy regression for harness tests") for line in lines)


def test_run_help_lists_demo_options(toy, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "toy", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--width", "--lr", "--sleep-ms", "--init", "--variants", "--max-iterations", "--target-flops",
                 "--time-budget", "--run-id"):
        assert flag in out, flag
    assert "{zeros,normal}" in out and "(default: 16)" in out and "(default: baseline,cheap)" in out


def test_show_reprints_the_tables(run_toy, capsys):
    code, run_dir = run_toy("shown", "--max-iterations", "3")
    assert code == 0
    first = capsys.readouterr().out
    assert main(["show", str(run_dir)]) == 0
    again = capsys.readouterr().out
    assert again == first  # the same header and tables, from summary.json alone
    assert "Training (same budget for every variant)" in again and "Toy regression" in again
    for v in ("baseline", "cheap"):
        assert any(line.split()[:2] == [v, "3"] for line in again.splitlines())


def _summary(tmp_path, name, *, loss, tflops, median_ms, memory, accuracy):
    run_dir = tmp_path / name
    run_dir.mkdir()
    train = {"steps": 10, "final_loss": loss, "tflops_per_s": tflops, "peak_memory_gb": memory,
             "step_ms": {"median_ms": median_ms, "p10_ms": 1.0, "p90_ms": 99.0, "n": 9},
             "flops": {"narrow": {"flops": 123.0}}}
    (run_dir / "summary.json").write_text(json.dumps({
        "schema_version": "mgr.telemetry.v1", "status": "completed",
        "results": {"accuracy": accuracy, "train": {"narrow": train}, "tables": [], "notes": []}}))
    return str(run_dir)


def compare_rows(out):
    """metric -> (delta, verdict) from the rich table."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in re.split("[│|]", line)[1:-1]]
        if len(cells) == 5 and cells[0] not in ("metric", "---"):
            rows[cells[0]] = (cells[3], cells[4])
    return rows


BASE = dict(loss=2.0, tflops=4.0, median_ms=10.0, memory=1.0, accuracy=0.5)


def test_compare_relative_deltas(tmp_path, capsys):
    base = _summary(tmp_path, "base", **BASE)
    cand = _summary(tmp_path, "cand", loss=2.1, tflops=5.0, median_ms=8.0, memory=1.05, accuracy=0.4)
    assert main(["compare", base, cand]) == 0  # regressions are reported, but only fail when asked to
    out = capsys.readouterr().out
    rows = compare_rows(out)
    assert rows == {
        "accuracy": ("-20.00%", "regressed"),  # higher is better
        "train.narrow.final_loss": ("+5.00%", "regressed"),
        "train.narrow.peak_memory_gb": ("+5.00%", "ok"),
        "train.narrow.step_ms.median_ms": ("-20.00%", "improved"),
        "train.narrow.steps": ("+0.00%", ""),
        "train.narrow.tflops_per_s": ("+25.00%", "improved"),
    }
    assert "2 regression(s): accuracy, train.narrow.final_loss" in out


@pytest.mark.parametrize("change, code", [
    ({}, 0),
    ({"loss": 2.03}, 0),             # +1.5% loss, within the 2% tolerance
    ({"loss": 2.05}, 1),             # +2.5% loss
    ({"tflops": 3.9}, 0),            # -2.5% throughput, within 5%
    ({"tflops": 3.7}, 1),            # -7.5% throughput
    ({"median_ms": 10.6}, 1),        # +6% step time
    ({"memory": 1.09}, 0),           # +9% memory, within 10%
    ({"memory": 1.2}, 1),            # +20% memory
    ({"loss": 1.0, "tflops": 8.0}, 0),
])
def test_compare_fail_on_regression(tmp_path, capsys, change, code):
    base = _summary(tmp_path, "base", **BASE)
    cand = _summary(tmp_path, "cand", **{**BASE, **change})
    assert main(["compare", base, cand, "--fail-on-regression"]) == code
    assert ("regression(s)" in capsys.readouterr().out) == (code == 1)


def test_compare_tolerance_flags(tmp_path, capsys):
    base = _summary(tmp_path, "base", **BASE)
    cand = _summary(tmp_path, "cand", **{**BASE, "loss": 2.2})  # +10% loss
    assert main(["compare", base, cand, "--fail-on-regression", "--loss-tolerance", "0.2"]) == 0
    assert main(["compare", base, cand, "--fail-on-regression", "--loss-tolerance", "0.05"]) == 1


def test_missing_gpu_is_one_error_line(tmp_path):
    """Selecting a platform the machine lacks is checked in a fresh process: it changes JAX's global config."""
    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "mgr.cli", "run", "matrix-gauge", "--device", "gpu",
                           "--artifacts-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --device gpu: no GPU backend is available"]
    assert not any(tmp_path.iterdir())  # nothing written before the device is known


def test_whole_numbers_may_be_written_as_floats(run_toy):
    code, run_dir = run_toy("sci", "--max-iterations", "2", "--width", "1.6e1")
    assert code == 0
    assert read_json(run_dir / "config.json")["config"]["width"] == 16
