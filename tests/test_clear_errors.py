"""Issue 10: `mgr show` / `mgr compare` given files that are not run summaries, and the throughput bench at a step
count that is all warm-up: one line or a clean report, never a traceback."""

import json

import pytest

from mgr.cli import main
from tests.conftest import one_error_line, read_json


def test_show_accepts_the_summary_json_path(run_toy, capsys):
    _, run_dir = run_toy("s", "--max-iterations", "2")
    first = capsys.readouterr().out
    assert main(["show", str(run_dir / "summary.json")]) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("content, says", [
    ("[1, 2]", "expected a JSON object, got list"),
    ("null", "expected a JSON object, got NoneType"),
    ('{"schema_version": "mgr.telemetry.v1", "results": [1]}', "'results' should be an object"),
    ('{"schema_version": "mgr.telemetry.v1", "status": 3, "results": {}}', "'status' should be a str"),
    ('{"schema_version": "mgr.telemetry.v1", "results": {"tables": [{"columns": "ab"}]}}', "results.tables"),
    ('{"a": 1}', "schema_version None"),
])
@pytest.mark.parametrize("command", ["show", "compare"])
def test_summaries_of_the_wrong_shape_are_one_line(tmp_path, capsys, content, says, command):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(content)
    argv = ["show", str(run)] if command == "show" else ["compare", str(run), str(run)]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "is not a run summary" in line and says in line


@pytest.mark.parametrize("command", ["show", "compare"])
def test_any_other_file_is_one_line(tmp_path, capsys, command):
    (tmp_path / "notes.txt").write_text("hello")
    argv = ["show", str(tmp_path / "notes.txt")] if command == "show" else \
        ["compare", str(tmp_path / "notes.txt"), str(tmp_path / "notes.txt")]
    assert main(argv) == 2
    assert "is a file, not a run directory" in one_error_line(capsys)


def test_a_summary_with_a_mistyped_field_deep_inside_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"schema_version": "mgr.telemetry.v1", "status": "completed",
                                                  "meta": {"device": "cpu", "git": 5}, "results": {}}))
    assert main(["show", str(run)]) == 2
    assert "wrong type" in one_error_line(capsys)


@pytest.mark.slow
def test_throughput_bench_with_only_warmup_steps_reports_cleanly(tmp_path, capsys):
    from bench import nanochat_throughput
    assert nanochat_throughput.main(["--depths", "1", "--steps", "1", "--sequence-len", "32", "--batch-size", "2",
                                     "--artifacts-dir", str(tmp_path), "--run-id", "one"]) == 0
    s = read_json(tmp_path / "bench" / "nanochat_throughput" / "one" / "summary.json")
    assert s["status"] == "completed"
    assert any("all warm-up" in n for n in s["results"]["notes"])
    assert "— (—–—)" in capsys.readouterr().out  # the step-time cell, with no timed step


def test_throughput_bench_warmup_beyond_its_steps_is_refused(tmp_path, capsys):
    from bench import nanochat_throughput
    assert nanochat_throughput.main(["--steps", "3", "--warmup-steps", "3", "--artifacts-dir", str(tmp_path)]) == 2
    assert "--warmup-steps 3 leaves none of the 3 steps (--steps)" in one_error_line(capsys)
    assert not (tmp_path / "bench").exists()
