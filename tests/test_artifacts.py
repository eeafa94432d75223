"""The run directory the launcher leaves behind, for completed, refused, diverged and interrupted runs."""

import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest

from mgr import artifacts
from mgr.artifacts import RunWriter, atomic_write_json
from mgr.errors import UserError
from tests import toy_demo
from tests.conftest import REPO, TOY_MODULE, one_error_line, read_json, read_metrics, step_lines

VARIANTS = ("baseline", "cheap")


def test_completed_run_directory(run_toy):
    code, run_dir = run_toy("full", "--max-iterations", "7", "--width", "12", "--seed", "3")
    assert code == 0
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "metrics.jsonl", "plots", "run.md",
                                                         "summary.json"]
    s = read_json(run_dir / "summary.json")
    assert s["schema_version"] == "mgr.telemetry.v1"
    assert s["status"] == "completed" and s["error"] is None

    meta = s["meta"]
    assert (meta["run_id"], meta["kind"], meta["topic"], meta["seed"]) == ("full", "tests", "toy", 3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", meta["generated_at"])
    assert set(meta["git"]) == {"commit", "branch", "dirty"}
    assert meta["git"]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", meta["git"]["commit"])
    assert meta["python"] == ".".join(map(str, sys.version_info[:3]))
    import flax
    import jax
    assert meta["versions"]["jax"] == jax.__version__ and meta["versions"]["flax"] == flax.__version__
    assert meta["argv"][:3] == ["mgr", "run", "toy"] and meta["argv"][-2:] == ["--seed", "3"]
    assert meta["command"].startswith("mgr run toy --artifacts-dir ")
    assert meta["device"]["platform"] == jax.devices()[0].platform

    budget = s["budget"]
    assert budget["max_iterations"] == 7 and budget["max_steps"] == 7
    assert budget["stopped_by"] == "max_iterations"
    assert set(budget["variants"]) == set(VARIANTS)
    config = toy_demo.Config(width=12)
    for v in VARIANTS:
        vb, train = budget["variants"][v], s["results"]["train"][v]
        record = train["flops"][v]
        # The budget is planned with the estimator's figure for the very step that ran, whose dots are exact.
        assert record["matmul_flops"] == toy_demo.matmul_flops_per_step(config, v)
        assert vb["flops_per_step_est"] == train["flops_per_step"] == record["flops"] >= record["matmul_flops"]
        assert vb["steps"] == train["steps"] == 7
        assert vb["planned_total_flops_est"] == vb["spent_flops"] == 7 * vb["flops_per_step_est"]
    assert budget["spent_flops"] == sum(budget["variants"][v]["spent_flops"] for v in VARIANTS)
    assert budget["planned_total_flops_est"] == budget["spent_flops"]
    assert budget["steps"] == 14
    assert set(s["results"]["final_loss"]) == set(VARIANTS)

    records = read_metrics(run_dir)
    for v in VARIANTS:
        assert [r["step"] for r in step_lines(records, v)] == list(range(7))
        assert [r["step"] for r in records if r["variant"] == v and "eval" in r] == [5, 7]  # eval_every=5 + end
        assert s["results"]["final_loss"][v] == step_lines(records, v)[-1]["loss"]
    assert len(records) == 2 * (7 + 2)

    cfg = read_json(run_dir / "config.json")
    assert cfg["demo"] == "toy" and cfg["seed"] == 3 and cfg["budget"]["max_iterations"] == 7
    assert cfg["config"] == {"width": 12, "hidden": 32, "batch": 8, "lr": 0.05, "sleep_ms": 0.0, "eval_every": 5,
                             "init": "zeros", "variants": list(VARIANTS), "init_from": "", "init_only": False}

    md = (run_dir / "run.md").read_text()
    assert "### Training (same budget for every variant)" in md
    assert "| variant | steps | stopped by | final loss |" in md
    for v in VARIANTS:
        assert re.search(rf"^\| {v} \| 7 \| max_iterations \| ", md, re.M)
    assert "### Toy regression" in md and "- **status**: completed" in md


def test_no_budget_uses_the_demo_default(run_toy):
    code, run_dir = run_toy("default", "--variants", "cheap")
    assert code == 0
    s = read_json(run_dir / "summary.json")
    assert s["budget"]["max_iterations"] == toy_demo.DEMO.default_max_iterations == 4
    assert s["results"]["train"]["cheap"]["steps"] == 4


def test_max_iterations_runs_exactly(run_toy):
    code, run_dir = run_toy("seven", "--max-iterations", "7", "--eval-every", "0", "--variants", "cheap")
    assert code == 0
    assert read_json(run_dir / "summary.json")["results"]["train"]["cheap"]["steps"] == 7
    assert len(step_lines(read_metrics(run_dir), "cheap")) == 7


def test_target_flops_gives_every_variant_equal_flops(run_toy):
    target = 1.5e5
    code, run_dir = run_toy("flops", "--target-flops", f"{target:g}")
    assert code == 0
    s = read_json(run_dir / "summary.json")
    train = s["results"]["train"]
    for v in VARIANTS:
        fps = train[v]["flops_per_step"]
        assert train[v]["steps"] == math.ceil(target / fps)
        assert train[v]["stopped_by"] == "target_flops"
        assert target <= train[v]["spent_flops"] < target + fps
        assert len(step_lines(read_metrics(run_dir), v)) == train[v]["steps"]
    # Half the matmul per step buys the cheap variant (about) twice the steps for the same FLOPs.
    assert train["cheap"]["flops_per_step"] < 0.6 * train["baseline"]["flops_per_step"]
    assert train["cheap"]["steps"] > 1.6 * train["baseline"]["steps"]
    assert abs(train["cheap"]["spent_flops"] - train["baseline"]["spent_flops"]) < train["baseline"]["flops_per_step"]
    assert s["budget"]["stopped_by"] == "target_flops" and s["budget"]["target_flops"] == target


def test_time_budget_stops_by_time(run_toy):
    code, run_dir = run_toy("time", "--time-budget", "0.5", "--sleep-ms", "5")
    assert code == 0
    s = read_json(run_dir / "summary.json")
    assert s["budget"]["stopped_by"] == "time_budget" and s["budget"]["max_steps"] is None
    for v in VARIANTS:
        t = s["results"]["train"][v]
        assert t["stopped_by"] == "time_budget"
        assert 0.5 <= t["wall_s"] < 2.0
        # 5 ms of sleep per step caps a 0.5 s budget at 100 steps.
        assert 10 <= t["steps"] <= 101


def test_existing_run_dir_is_refused_untouched(run_toy, capsys):
    code, run_dir = run_toy("same", "--max-iterations", "2", "--variants", "cheap")
    assert code == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    code, _ = run_toy("same", "--max-iterations", "3")
    assert code == 2
    assert "already exists" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_diverging_run_is_recorded(run_toy):
    code, run_dir = run_toy("diverge", "--lr", "1e4", "--max-iterations", "100", "--eval-every", "0")
    assert code == 1
    s = read_json(run_dir / "summary.json")
    assert s["status"] == "diverged" and "non-finite loss" in s["error"]
    assert s["budget"]["stopped_by"] == "diverged"
    assert list(s["budget"]["variants"]) == ["baseline"]  # the run stops at the first diverging variant
    losses = [r["loss"] for r in step_lines(read_metrics(run_dir), "baseline")]
    assert len(losses) >= 2
    assert losses[-1] is None  # non-finite floats are stored as null
    assert all(isinstance(x, float) and x < 1e39 for x in losses[:-1]) and losses[-2] > 1e6 * losses[0]
    assert s["results"]["train"]["baseline"]["steps"] >= len(losses)
    assert "- **status**: diverged" in (run_dir / "run.md").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_keeps_its_metrics(tmp_path, sig):
    run_dir = tmp_path / "tests" / "toy" / "int"
    argv = ["run", "toy", "--artifacts-dir", str(tmp_path), "--run-id", "int", "--max-iterations", "100000",
            "--sleep-ms", "10", "--eval-every", "0", "--variants", "cheap"]
    # A shell that started pytest in the background may have SIGINT ignored; a user at a terminal does not.
    code = (f"import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"sys.path.insert(0, {str(REPO)!r}); import demos; demos.REGISTRY['toy'] = {TOY_MODULE!r}; "
            f"from mgr.cli import main; sys.exit(main({argv!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the run never logged three steps"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    s = read_json(run_dir / "summary.json")
    assert s["status"] == "interrupted" and s["budget"]["stopped_by"] == "interrupted"
    steps = [r["step"] for r in step_lines(read_metrics(run_dir), "cheap")]
    assert len(steps) >= 3 and steps == list(range(len(steps)))
    # The loop reads metrics one step late: at most the step in flight is missing from the file.
    assert s["results"]["train"]["cheap"]["steps"] - len(steps) in (0, 1)
    assert s["results"]["train"]["cheap"]["stopped_by"] == "interrupted"


def _dir_names(path):
    return sorted(p.name for p in path.iterdir())


def test_atomic_write_json_leaves_no_temp_file(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": [1, 2.5], "nan": float("nan")})
    assert json.loads(target.read_text()) == {"a": [1, 2.5], "nan": None}
    assert _dir_names(tmp_path) == ["x.json"]


def test_failing_serialization_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"v": 1})
    old = target.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": {1, 2}})  # a set is not JSON
    assert target.read_bytes() == old and _dir_names(tmp_path) == ["x.json"]


def test_failing_rename_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"v": 1})
    old = target.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(artifacts.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert target.read_bytes() == old and _dir_names(tmp_path) == ["x.json"]


@pytest.mark.parametrize("kind, topic, run_id", [("k", "t", "a/b"), ("k", "t", ""), ("k", "..", "r"), ("", "t", "r")])
def test_run_writer_rejects_bad_names(tmp_path, kind, topic, run_id):
    with pytest.raises(UserError):
        RunWriter(tmp_path, kind, topic, run_id)
