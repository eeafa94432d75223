"""Budgets: planned steps, first-reached stop reasons, per-variant charging, combined records, bad values."""

import math

import jax.numpy as jnp
import pytest

from mgr.artifacts import RunWriter
from mgr.budget import Budget, BudgetTracker, combine_records
from mgr.context import RunContext
from mgr.errors import UserError
from mgr.flops import count_flops


def run_until_stop(tracker, flops_per_step, seconds_per_step=0.0, limit=10_000):
    """Drive a tracker like the training loop does: check, then step and charge."""
    elapsed = 0.0
    while (reason := tracker.stop_reason(elapsed)) is None:
        tracker.charge(flops_per_step(tracker.steps) if callable(flops_per_step) else flops_per_step)
        elapsed += seconds_per_step
        assert tracker.steps < limit
    return reason


@pytest.mark.parametrize("target, fps, expected", [(100.0, 10.0, 10), (101.0, 10.0, 11), (5e9, 3e8, 17),
                                                   (10.0, 10.0, 1)])
def test_planned_steps_is_ceil(target, fps, expected):
    t = BudgetTracker(Budget(target_flops=target), fps)
    assert t.max_steps == expected == math.ceil(target / fps)
    assert t.record()["planned_total_flops_est"] == expected * fps
    assert run_until_stop(t, fps) == "target_flops"
    assert t.steps == expected
    assert t.spent_flops >= target > t.spent_flops - fps


@pytest.mark.parametrize("budget, seconds_per_step, steps, reason", [
    (Budget(max_iterations=7), 0.0, 7, "max_iterations"),
    (Budget(max_iterations=7, target_flops=50.0), 0.0, 5, "target_flops"),
    (Budget(max_iterations=3, target_flops=50.0), 0.0, 3, "max_iterations"),
    (Budget(max_iterations=100, time_budget=1.0), 0.25, 4, "time_budget"),
    (Budget(target_flops=1e6, time_budget=1.0), 0.3, 4, "time_budget"),
    (Budget(max_iterations=9, target_flops=1e6, time_budget=100.0), 1.0, 9, "max_iterations"),
    # Reached together: iterations are reported first, then FLOPs, then time.
    (Budget(max_iterations=5, target_flops=50.0), 0.0, 5, "max_iterations"),
    (Budget(target_flops=50.0, time_budget=5.0), 1.0, 5, "target_flops"),
])
def test_first_reached_stop_reason(budget, seconds_per_step, steps, reason):
    t = BudgetTracker(budget, 10.0)
    assert run_until_stop(t, 10.0, seconds_per_step) == reason
    assert t.steps == steps
    assert t.spent_flops == 10.0 * steps


def test_planned_steps_takes_the_smaller_of_iterations_and_flops():
    assert BudgetTracker(Budget(max_iterations=3, target_flops=100.0), 10.0).max_steps == 3
    assert BudgetTracker(Budget(max_iterations=30, target_flops=100.0), 10.0).max_steps == 10
    assert BudgetTracker(Budget(time_budget=1.0), 10.0).max_steps is None
    assert BudgetTracker(Budget(time_budget=1.0), 10.0).record()["planned_total_flops_est"] is None


def test_variable_per_step_flops_are_charged_as_spent():
    # Alternating 10 / 30 FLOPs: after 5 steps 10+30+10+30+10 = 90 < 100, the 6th reaches 120.
    t = BudgetTracker(Budget(target_flops=100.0), 10.0)
    assert run_until_stop(t, lambda s: 10.0 if s % 2 == 0 else 30.0) == "target_flops"
    assert (t.steps, t.spent_flops) == (6, 120.0)
    assert t.max_steps == 10  # planned from the first variant's estimate, not what was spent


def test_combine_records():
    a = BudgetTracker(Budget(max_iterations=4), 10.0)
    b = BudgetTracker(Budget(max_iterations=4), 5.0)
    for t, fps in ((a, 10.0), (b, 5.0)):
        t.stopped_by = run_until_stop(t, fps)
    one = combine_records({"a": a.record()})
    assert one == a.record()
    both = combine_records({"a": a.record(), "b": b.record()})
    assert both == {"max_steps": 4, "flops_per_step_est": None, "planned_total_flops_est": 60.0,
                    "spent_flops": 60.0, "steps": 8, "stopped_by": "max_iterations"}
    c = BudgetTracker(Budget(time_budget=1.0), 5.0)
    c.stopped_by = run_until_stop(c, 5.0, 0.5)
    mixed = combine_records({"a": a.record(), "c": c.record()})
    assert mixed["stopped_by"] == "mixed"
    assert mixed["planned_total_flops_est"] is None
    assert mixed["max_steps"] is None
    assert mixed["steps"] == 6


@pytest.mark.parametrize("kwargs", [
    {"max_iterations": 0}, {"max_iterations": -3}, {"max_iterations": 2.5}, {"max_iterations": math.inf},
    {"max_iterations": math.nan}, {"target_flops": 0.0}, {"target_flops": -1e9}, {"target_flops": math.inf},
    {"target_flops": math.nan}, {"time_budget": 0}, {"time_budget": -0.5}, {"time_budget": math.inf},
    {"time_budget": math.nan}, {"warmup_steps": -1}, {"target_flops": "1e9"},
])
def test_invalid_budget_raises_user_error(kwargs):
    with pytest.raises(UserError) as e:
        Budget(**kwargs)
    assert "\n" not in str(e.value)


def test_target_smaller_than_one_step():
    with pytest.raises(UserError, match="smaller than one step"):
        BudgetTracker(Budget(target_flops=99.0), 100.0)
    assert BudgetTracker(Budget(target_flops=100.0), 100.0).max_steps == 1


def test_or_default_only_fills_an_unbounded_budget():
    assert Budget().or_default(12).max_iterations == 12
    assert Budget(time_budget=2.0).or_default(12) == Budget(time_budget=2.0)


def test_train_charges_each_variant_its_own_measured_flops(tmp_path):
    """ctx.train with two compiled variants: each step is charged the FLOPs of the variant that ran."""
    d = 16
    x_BD = jnp.ones((4, d))

    def wide(w_DD, x):  # full matmul
        y = x @ w_DD
        return w_DD * 0.999, {"loss": jnp.mean(y)}

    def narrow(w_DD, x):  # a real half-width slice, half the matmul FLOPs
        y = x @ w_DD[:, : d // 2]
        return w_DD * 0.999, {"loss": jnp.mean(y)}

    w0 = jnp.ones((d, d))
    fps = {"wide": count_flops(wide, w0, x_BD).flops, "narrow": count_flops(narrow, w0, x_BD).flops}
    assert fps["narrow"] < fps["wide"]
    target = 10 * fps["wide"]
    ctx = RunContext(seed=0, budget=Budget(target_flops=target), writer=RunWriter(tmp_path, "k", "t", "r"))
    r = ctx.train("mixed", {"wide": wide, "narrow": narrow}, w0, lambda s: x_BD,
                  choose=lambda step, last: "wide" if step % 3 == 0 else "narrow")
    ctx.writer.close()
    n_wide, n_narrow = r.variant_steps["wide"], r.variant_steps["narrow"]
    assert n_wide + n_narrow == r.steps
    assert n_wide == math.ceil(r.steps / 3)
    assert r.spent_flops == pytest.approx(n_wide * fps["wide"] + n_narrow * fps["narrow"])
    assert r.stopped_by == "target_flops"
    assert r.spent_flops >= target > r.spent_flops - fps["wide"]
    assert r.steps > 10  # cheaper steps buy more of them than the 10 the first variant's estimate planned
    assert r.flops_per_step == fps["wide"]
    assert ctx.budget_records["mixed"]["max_steps"] == 10
    assert ctx.budget_records["mixed"]["spent_flops"] == r.spent_flops
