"""Issue 10, harness side: every counted step is in metrics.jsonl, a run dir always gets its summary, files are
readable by others, run ids do not collide, topics nest, --json-out, one rule for whole numbers."""

import os
import stat

import jax
import pytest

from mgr import artifacts, plots
from mgr.cli import main
from mgr.errors import UserError
from tests.conftest import one_error_line, read_json, read_metrics, step_lines


def test_interrupt_during_the_metrics_transfer_keeps_every_counted_step(run_toy, monkeypatch):
    real_get, calls = jax.device_get, []

    def interrupted_get(x):
        calls.append(1)
        if len(calls) == 2:  # the second window's blocking transfer: 8 finished steps are waiting in it
            raise KeyboardInterrupt
        return real_get(x)

    monkeypatch.setattr(jax, "device_get", interrupted_get)
    code, run_dir = run_toy("cut", "--max-iterations", "100", "--eval-every", "0", "--variants", "cheap")
    assert code == 130
    s = read_json(run_dir / "summary.json")
    steps = [r["step"] for r in step_lines(read_metrics(run_dir), "cheap")]
    assert s["status"] == "interrupted"
    assert s["results"]["train"]["cheap"]["steps"] == len(steps) > 8
    assert steps == list(range(len(steps)))


@pytest.mark.parametrize("seed", ["9223372036854775808", "4294967296", "-1", "1.5", "nan"])
def test_a_seed_jax_cannot_take_is_refused_before_the_run_dir(run_toy, capsys, seed):
    code, run_dir = run_toy("seed", "--seed", seed)
    assert code == 2
    assert "--seed" in one_error_line(capsys)
    assert not run_dir.exists()


def test_whole_numbers_have_one_rule(run_toy):
    code, run_dir = run_toy("floats", "--max-iterations", "4e0", "--warmup-steps", "1e0", "--seed", "1e3")
    assert code == 0
    s = read_json(run_dir / "summary.json")
    assert s["meta"]["seed"] == 1000 and s["budget"]["warmup_steps"] == 1


def test_warmup_that_leaves_no_timed_step_is_refused(run_toy, capsys):
    code, run_dir = run_toy("warm", "--max-iterations", "5", "--warmup-steps", "5")
    assert code == 2
    assert "--warmup-steps 5 leaves none of the 5 steps" in one_error_line(capsys)
    assert not run_dir.exists()


def test_an_error_before_the_demo_starts_still_leaves_a_summary(toy, tmp_path, monkeypatch):
    import mgr.launcher

    def broken_context(**kwargs):
        raise OSError("no device memory")

    monkeypatch.setattr(mgr.launcher, "RunContext", broken_context)
    with pytest.raises(OSError):
        main(["run", "toy", "--artifacts-dir", str(tmp_path), "--run-id", "early"])
    s = read_json(tmp_path / "tests" / "toy" / "early" / "summary.json")
    assert s["status"] == "failed" and "no device memory" in s["error"]


def test_written_files_follow_the_umask(run_toy):
    old = os.umask(0o022)
    try:
        _, run_dir = run_toy("modes")
    finally:
        os.umask(old)
    for name in ("summary.json", "run.md", "config.json", "metrics.jsonl"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o644, name


def test_default_run_ids_differ_within_a_second_and_sort_by_time():
    a, b = artifacts.default_run_id(), artifacts.default_run_id()
    import time
    time.sleep(0.002)
    c = artifacts.default_run_id()
    assert len(a) == len("20251218_120000_123") and a <= b < c


def test_nested_topic_and_json_out(toy, tmp_path):
    out = tmp_path / "results" / "deep" / "toy.json"
    code = main(["run", "toy", "--artifacts-dir", str(tmp_path), "--artifacts-kind", "bench", "--artifacts-topic",
                 "fixed_flops/toy", "--run-id", "r1", "--json-out", str(out)])
    assert code == 0
    summary = read_json(tmp_path / "bench" / "fixed_flops" / "toy" / "r1" / "summary.json")
    assert read_json(out) == summary and summary["status"] == "completed"


@pytest.mark.parametrize("topic", ["../escape", "/abs", "a//b", "a/./b", "a/", "a/../../b"])
def test_bad_topics_are_refused(toy, tmp_path, capsys, topic):
    code = main(["run", "toy", "--artifacts-dir", str(tmp_path), "--artifacts-topic", topic, "--run-id", "x"])
    assert code == 2
    assert "topic" in one_error_line(capsys)
    assert not any(p.name == "x" for p in tmp_path.rglob("*"))


def test_json_out_under_a_file_is_refused_up_front(toy, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code = main(["run", "toy", "--artifacts-dir", str(tmp_path), "--run-id", "j",
                 "--json-out", str(tmp_path / "file" / "out.json")])
    assert code == 2
    assert "--json-out" in one_error_line(capsys)
    assert not (tmp_path / "tests").exists()


def test_a_full_disk_while_plotting_is_one_line_naming_the_plot(tmp_path, monkeypatch):
    import errno

    def full(self, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", full)
    with pytest.raises(UserError, match=r"cannot write plot .*loss\.png: No space left on device"):
        plots.plot_curves(tmp_path / "loss.png", {"a": ([0, 1], [1, 0])}, xlabel="x", ylabel="y")


def test_a_user_error_inside_the_run_keeps_the_summary(run_toy, capsys):
    code, run_dir = run_toy("late", "--variants", "baseline,bogus")
    assert code == 2
    one_error_line(capsys)
    assert read_json(run_dir / "summary.json")["status"] == "failed"


def test_a_full_disk_while_logging_metrics_is_one_line_and_keeps_the_summary(run_toy, capsys, monkeypatch):
    import errno

    real = artifacts.to_jsonable

    def full_after_two_steps(value):  # the metrics line of step 2 hits a full disk
        if isinstance(value, dict) and "variant" in value and value.get("step", 0) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(value)

    monkeypatch.setattr(artifacts, "to_jsonable", full_after_two_steps)
    code, run_dir = run_toy("full", "--max-iterations", "4", "--variants", "cheap")
    assert code == 2
    assert "metrics.jsonl: No space left on device" in one_error_line(capsys)
    s = read_json(run_dir / "summary.json")
    assert s["status"] == "failed" and "No space left" in s["error"]
