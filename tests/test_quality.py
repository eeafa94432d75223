"""Quality targets and the decomposition: crossing interpolation on scripted evals, the target stop in a real
loop, and the wall-time identity with a fast and a deliberately slow batch_fn."""

import math

import pytest

from mgr.quality import EvalPoint, decomposition, time_to_quality
from tests.conftest import read_json

POINTS = [EvalPoint(10, 100.0, 1.0, 2.0, 4.0), EvalPoint(20, 200.0, 2.0, 4.0, 2.0),
          EvalPoint(30, 300.0, 3.0, 6.0, 1.0), EvalPoint(40, 400.0, 4.0, 8.0, 0.5)]


def test_crossing_interpolates_linearly_in_log_loss():
    q = time_to_quality(POINTS, 1.5, "val_loss", eval_every=10)
    assert q["reached"] and q["first_eval"]["step"] == 30
    f = (math.log(2.0) - math.log(1.5)) / (math.log(2.0) - math.log(1.0))  # 0.415: between the evals at 20, 30
    assert q["steps"] == pytest.approx(20 + 10 * f)
    assert q["flops"] == pytest.approx(200 + 100 * f)
    assert q["train_s"] == pytest.approx(2 + f) and q["wall_s"] == pytest.approx(4 + 2 * f)


def test_target_met_exactly_and_at_the_first_eval():
    assert time_to_quality(POINTS, 2.0, "val_loss")["steps"] == pytest.approx(20)
    first = time_to_quality(POINTS, 5.0, "val_loss")
    assert first["steps"] == 10 and first["interpolated"] == first["first_eval"] | {"value": 4.0}


def test_never_reached_is_reported_not_dropped():
    q = time_to_quality(POINTS, 0.1, "val_loss")
    assert q["reached"] is False and q["steps"] is None and q["evals"] == 4
    assert time_to_quality(POINTS, None, "val_loss") is None


def test_decomposition_residual():
    d = decomposition(steps=10, spent_flops=1e9, step_samples_ms=(10.0,) * 8, wall_s=0.6,
                      overheads={"compile_s": 0.3, "data_s": 0.2})
    assert d["step_s"] == pytest.approx(0.1)  # 8 timed steps + 2 at the median
    assert d["effective_flops_per_second"] == pytest.approx(1e10)
    assert d["residual_s"] == pytest.approx(0.0, abs=1e-12)


def test_target_stops_at_the_first_eval_below_it(run_toy):
    code, run_dir = run_toy("target", "--max-iterations", "400", "--target-loss", "0.5", "--eval-every", "4",
                            "--variants", "baseline", "--lr", "0.1")
    assert code == 0
    train = read_json(run_dir / "summary.json")["results"]["train"]["baseline"]
    q, points = train["time_to_quality"], train["eval_points"]
    assert train["stopped_by"] == "target_loss" and q["reached"]
    assert points[-1]["value"] <= 0.5 < points[-2]["value"]  # stopped at the first eval at or below the target
    assert train["steps"] == points[-1]["step"] == q["first_eval"]["step"]
    assert points[-2]["step"] < q["steps"] < points[-1]["step"]


def test_no_stop_at_target_keeps_training(run_toy):
    code, run_dir = run_toy("through", "--max-iterations", "60", "--target-loss", "8", "--eval-every", "4",
                            "--variants", "baseline", "--lr", "0.1", "--no-stop-at-target")
    train = read_json(run_dir / "summary.json")["results"]["train"]["baseline"]
    assert code == 0 and train["stopped_by"] == "max_iterations" and train["steps"] == 60
    assert train["time_to_quality"]["reached"] and train["time_to_quality"]["steps"] < 60


def test_target_on_a_metric_the_demo_lacks_is_refused(toy, tmp_path, capsys, monkeypatch):
    import tests.toy_demo as toy_demo
    from mgr.cli import main
    monkeypatch.setattr(toy_demo, "DEMO", toy_demo.DEMO.__class__(**{**toy_demo.DEMO.__dict__,
                                                                       "quality_metric": "bpb"}))
    assert main(["run", "toy", "--artifacts-dir", str(tmp_path), "--target-loss", "1", "--max-iterations", "5"]) == 2
    assert "not 'bpb'" in capsys.readouterr().err


@pytest.mark.parametrize("sleep_ms", [0, 25])
def test_slow_data_moves_time_into_the_data_term(run_toy, sleep_ms):
    code, run_dir = run_toy(f"data{sleep_ms}", "--max-iterations", "40", "--variants", "baseline",
                            "--sleep-ms", str(sleep_ms), "--eval-every", "10")
    d = read_json(run_dir / "summary.json")["results"]["train"]["baseline"]["decomposition"]
    o = d["overhead"]
    assert code == 0 and set(o) == {"compile_s", "flops_pricing_s", "eval_s", "data_s", "hooks_s", "host_sync_s"}
    assert d["wall_s"] == pytest.approx(d["step_s"] + d["pipeline_overhead_s"] + d["residual_s"])
    if sleep_ms:
        assert o["data_s"] >= 40 * sleep_ms / 1e3  # each of the 40 batches the loop fetched waited its sleep
        assert d["step_s"] < 0.25 * o["data_s"]  # the sleep is not in the step time
        assert abs(d["residual_pct"]) < 10
    assert o["compile_s"] > 0 and o["eval_s"] > 0
