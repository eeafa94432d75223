"""block-update-schedule: a tiny end-to-end CLI run (same budget per schedule, FLOPs charged per compiled depth,
analytic matmul counts), frozen rows untouched, the nanochat variant's FLOPs, and one-line errors for bad flags."""

import json

import jax
import numpy as np
import pytest

from demos import block_update_schedule as bus
from mgr.cli import main
from mgr.flops import compile_and_count, count_flops
from tests.conftest import one_error_line, read_json

L, STEPS, PROBE_EVERY = 4, 24, 4
TINY = ("--model", "resmlp", "--depth", str(L), "--width", "32", "--batch-size", "64", "--eval-tokens", "512",
        "--levels", "1,2,4", "--static-depth", "2", "--probe-every", str(PROBE_EVERY), "--eval-every", "8",
        "--freeze-start-frac", "0.1", "--final-full-frac", "0.1", "--timing-rounds", "2")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")


def _run(tmp_path, run_id, *flags):
    code = main(["run", "block-update-schedule", *TINY, *flags, "--artifacts-dir", str(tmp_path),
                 "--run-id", run_id])
    return code, tmp_path / "demos" / "block_update_schedule" / run_id


@pytest.fixture(scope="module")
def equal_steps(tmp_path_factory):
    code, run_dir = _run(tmp_path_factory.mktemp("bus"), "steps", "--max-iterations", str(STEPS))
    assert code == 0
    return run_dir, read_json(run_dir / "summary.json")


def _charged(summary, name):
    """Sum over the variants a schedule ran of (steps run x that compiled variant's measured FLOPs)."""
    train = summary["results"]["train"][name]
    return sum(n * train["flops"][key]["flops"] for key, n in train["variant_steps"].items())


def test_summary_fields_and_same_budget(equal_steps):
    run_dir, s = equal_steps
    assert s["status"] == "completed"
    schedules = s["results"]["schedules"]
    assert list(schedules) == list(bus.SCHEDULES)
    for name, e in schedules.items():
        for field in ("val_loss", "mean_ms_per_step", "speedup_ms_per_step", "speedup_wall", "speedup_timed_depths",
                      "flops_speedup", "gap_vs_full_pct", "spent_flops", "n_probes", "mean_active_depth"):
            assert e[field] is not None and np.isfinite(e[field]), (name, field)
        budget = s["budget"]["variants"][name]
        assert budget["steps"] == e["steps"] == STEPS and budget["stopped_by"] == "max_iterations"
    full = schedules["full_update"]
    assert full["speedup_ms_per_step"] == 1 and full["gap_vs_full_pct"] == 0 and full["mean_active_depth"] == L
    for name, e in schedules.items():
        assert e["flops_speedup"] == pytest.approx(full["spent_flops"] / e["spent_flops"])
    run_md = (run_dir / "run.md").read_text()
    assert "| schedule | steps | val loss | ms/step | speedup |" in run_md
    assert "FLOPs per step by active depth k" in run_md
    assert {"plots/active_depth.png", "plots/loss_vs_time.png"} <= set(s["results"]["plots"])


def test_time_to_full_updates_final_val_loss(equal_steps):
    run_dir, s = equal_steps
    schedules = s["results"]["schedules"]
    full = schedules["full_update"]["time_to_full_final"]
    points = s["results"]["train"]["full_update"]["eval_points"]
    # full_update reaches its own final loss at its last eval (or earlier, if an eval before was as low)
    assert full["reached"] and full["target"] == schedules["full_update"]["val_loss"] == points[-1]["value"]
    assert full["steps"] <= STEPS and schedules["full_update"]["speedup_to_full_final_train_s"] == 1
    for name, e in schedules.items():
        q = e["time_to_full_final"]
        assert q["reached"] == (min(p["value"] for p in s["results"]["train"][name]["eval_points"]) <= full["target"])
        if q["reached"]:
            assert e["speedup_to_full_final_train_s"] == pytest.approx(full["train_s"] / q["train_s"])
    assert "Time to full_update's final val loss" in (run_dir / "run.md").read_text()


@pytest.mark.slow
def test_seeds_pair_speedups_and_gaps(tmp_path):
    code, run_dir = _run(tmp_path, "seeds", "--max-iterations", "8", "--seeds", "0,1", "--schedules",
                         "full_update,static_suffix", "--timing-rounds", "0")
    assert code == 0
    r = read_json(run_dir / "summary.json")["results"]
    assert r["seeds"] == [0, 1] and set(r["per_seed"]) == {"0", "1"}
    gaps = [r["per_seed"][k]["schedules"]["static_suffix"]["gap_vs_full_pct"] for k in ("0", "1")]
    stat = r["over_seeds"]["schedules.static_suffix.gap_vs_full_pct"]
    assert stat["n"] == 2 and stat["mean"] == pytest.approx(np.mean(gaps))
    assert stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1]
    assert r["paired"]["static_suffix"]["baseline"] == "full_update"
    assert {p.split("_", 1)[0] for p in r["plots"]} == {"plots/seed0", "plots/seed1"}
    seeds_logged = {json.loads(line).get("seed") for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert seeds_logged == {0, 1}


def test_flops_spent_are_the_sum_of_each_steps_compiled_variant(equal_steps):
    _, s = equal_steps
    schedules = s["results"]["schedules"]
    for name, e in schedules.items():
        assert e["spent_flops"] == pytest.approx(_charged(s, name), rel=1e-12)
        assert s["budget"]["variants"][name]["spent_flops"] == pytest.approx(e["spent_flops"], rel=1e-12)
    # Equal steps: freezing spent fewer FLOPs than updating every block.
    assert schedules["dynamic_suffix"]["spent_flops"] < schedules["full_update"]["spent_flops"]
    assert schedules["static_suffix"]["spent_flops"] < schedules["full_update"]["spent_flops"]


def test_phases_probes_and_depth_counts(equal_steps):
    _, s = equal_steps
    schedules = s["results"]["schedules"]
    # freeze_start = round(0.1 * 24) = 2, recovery from 24 - 2 = 22; static trains 2 blocks in between.
    static = schedules["static_suffix"]
    assert static["steps_per_depth"] == {"2": 20, "4": 4}
    assert static["mean_active_depth"] == pytest.approx((20 * 2 + 4 * L) / STEPS)
    dynamic = schedules["dynamic_suffix"]
    probes = [p for p in range(2, 22) if p % PROBE_EVERY == 0]
    assert dynamic["n_probes"] == dynamic["variant_steps"]["probe"] == len(probes)
    # A probe is a full-depth step; the schedule's per-depth counts and the loop's variant counts agree.
    counted = {k: n for k, n in dynamic["variant_steps"].items() if k != "probe"}
    counted[str(L)] = counted.get(str(L), 0) + len(probes)
    assert counted == dynamic["steps_per_depth"]
    assert dynamic["mean_active_depth"] < L


def test_same_init_and_data_and_relevance_only_on_probes(equal_steps):
    run_dir, _ = equal_steps
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {name: {r["step"]: r for r in records if r["variant"] == name and "loss" in r} for name in bus.SCHEDULES}
    # Steps 0 and 1 are full-depth warm-up in every schedule: same init, same batches, same executable.
    for step in (0, 1):
        assert len({steps[name][step]["loss"] for name in bus.SCHEDULES}) == 1
    with_relevance = sorted(step for step, r in steps["dynamic_suffix"].items() if "block_relevance" in r)
    assert with_relevance == [p for p in range(2, 22) if p % PROBE_EVERY == 0]
    assert all(len(steps["dynamic_suffix"][p]["block_relevance"]) == L for p in with_relevance)


def test_per_depth_flops_match_the_analytic_count(equal_steps):
    _, s = equal_steps
    per_depth = s["results"]["per_depth"]
    assert set(per_depth) == {"1", "2", "4", "probe"}
    B, D, F, C = 64, 32, 64, bus.RESMLP_CLASSES
    # A block's forward is 2 matmuls of 2BDF; frozen: forward only; active: forward + dW + dX; the first active
    # block of a partial step skips dX; the head (2BDC) is always trained.
    fwd = 4 * B * D * F
    expected = {1: 3 * fwd + 1 * (3 * fwd - fwd / 2) + 6 * B * D * C,
                2: 2 * fwd + (3 * fwd - fwd / 2) + 3 * fwd + 6 * B * D * C,
                4: 4 * 3 * fwd + 6 * B * D * C}
    for key, e in per_depth.items():
        k = L if key == "probe" else int(key)
        assert e["matmul_flops_analytic"] == expected[k]
        if e["steps_run"]:
            assert e["matmul_flops_measured"] == expected[k]
        assert e["best_ms"] > 0
    assert per_depth["1"]["ratio_to_full"] < per_depth["2"]["ratio_to_full"] < 1
    assert per_depth["1"]["ratio_to_full"] == pytest.approx(expected[1] / expected[L], rel=0.1)


def test_equal_flops_budget_gives_freezing_more_steps(tmp_path):
    full_step = 3 * 4 * 64 * 32 * 64 * L  # roughly one full step; the budget is many of them
    code, run_dir = _run(tmp_path, "flops", "--target-flops", str(20 * full_step),
                         "--schedules", "full_update,static_suffix", "--eval-every", "0", "--timing-rounds", "0")
    assert code == 0
    s = read_json(run_dir / "summary.json")
    spent = {n: v["spent_flops"] for n, v in s["budget"]["variants"].items()}
    flops = s["results"]["per_depth"]
    for name, v in s["budget"]["variants"].items():
        assert v["stopped_by"] == "target_flops"
        assert 20 * full_step <= spent[name] < 20 * full_step + flops[str(L)]["flops"]
    assert s["budget"]["variants"]["static_suffix"]["steps"] > s["budget"]["variants"]["full_update"]["steps"]


@pytest.mark.slow
def test_frozen_rows_and_their_optimizer_state_stay_bitwise():
    config = bus.check_config(bus.Config(model="resmlp", depth=L, width=16, batch_size=32, eval_tokens=64))
    task = bus.resmlp_task(config, bus.nanochat_config(config), seed=0, train_rows=256)
    full, one = jax.jit(task.make_step(L, None)), jax.jit(task.make_step(1, None))
    warm, _ = full(task.state, task.batch_fn(0))  # every row gets Adam moments
    after, _ = one(warm, task.batch_fn(1))
    p0, p1 = warm["params"], after["params"]
    for name in ("w1", "w2"):
        assert np.array_equal(p1["blocks"][name][:L - 1], p0["blocks"][name][:L - 1])
        assert not np.array_equal(p1["blocks"][name][L - 1], p0["blocks"][name][L - 1])
    assert not np.array_equal(p1["w_out"], p0["w_out"])
    stacked = [(a, b) for a, b in zip(jax.tree.leaves(warm["opt"]), jax.tree.leaves(after["opt"]))
               if np.ndim(a) == 3 and a.shape[0] == L]
    assert len(stacked) == 4  # mu and nu of w1 and w2
    for a, b in stacked:
        assert np.any(a[: L - 1] != 0) and np.array_equal(b[: L - 1], a[: L - 1])
        assert not np.array_equal(b[L - 1], a[L - 1])


def test_nanochat_steps_per_depth_match_the_analytic_count():
    config = bus.check_config(bus.Config(model="nanochat", depth=2, sequence_len=16, batch_size=2,
                                         eval_tokens=32))
    task = bus.nanochat_task(config, bus.nanochat_config(config), seed=0)
    batch = task.batch_fn(0)
    assert count_flops(task.make_step(1, None), task.state, batch).matmul_flops == task.matmul_flops(1)
    # The probe is the full step plus relevance, which costs no matmul.
    record, probe = compile_and_count(jax.jit(task.make_step(2, "grad_ratio")), task.state, batch)
    tokens, n_layer, n_head, head_dim, seq = 2 * 16, 2, 2, 64, 16  # depth 2: width 128, heads of 64
    assert record.matmul_flops == task.matmul_flops(2) == \
        tokens * (6 * nanochat_params(task) + 12 * n_layer * n_head * head_dim * seq)
    _, metrics = probe(task.state, batch)
    assert metrics["block_relevance"].shape == (2,) and np.all(np.asarray(metrics["block_relevance"]) > 0)


def nanochat_params(task):
    """Matmul parameters: every block matrix and the head (not the embedding)."""
    params = task.state["params"]
    return sum(x.size for x in jax.tree.leaves(params["blocks"])) + params["lm_head"]["kernel"].size


@pytest.mark.parametrize("flags, message", [
    (("--static-depth", "9"), "--static-depth"),
    (("--schedules", "full_update,bogus"), "--schedules"),
    (("--levels", "3,7"), "levels"),
    (("--time-budget", "1", "--schedules", "dynamic_suffix"), "time-only"),
])
def test_bad_flags_are_one_error_line(tmp_path, capsys, flags, message):
    code, _ = _run(tmp_path, "bad", *flags)
    assert code == 2
    assert message in one_error_line(capsys)
