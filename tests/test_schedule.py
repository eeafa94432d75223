import dataclasses

import numpy as np
import pytest

from mgr.errors import UserError
from mgr.methods.schedule import (DynamicSuffix, DynamicSuffixConfig, FullUpdate, StaticSuffix, allowed_levels,
                                  make_schedule, phase_bounds, plasticity_depth, quantize_up, relevance_depth)

L = 8
TOP = np.array([0, 0, 0, 0, 0, 0, 0, 1.0])  # all relevance in the top block: depth 1, quantised up to level 2
HALF = np.array([0, 0, 0, 0, 1, 1, 1, 1.0])  # top 4 blocks: depth 4 at threshold 1
# Freezing from step 0, no recovery phase, no adaptation: the pieces under test switched on one at a time.
BASE = DynamicSuffixConfig(levels=(2, 4, 6, 8), probe_every=10, freeze_start_frac=0.0, final_full_frac=0.0,
                           adaptive=False)


def _drive(schedule, n_steps, loss=lambda s: 1.0, relevance=lambda s: TOP):
    """decide then observe each step in order; relevance is offered on every step (only full ones may use it)."""
    decisions = []
    for step in range(n_steps):
        decisions.append(schedule.decide(step))
        schedule.observe(step, loss(step), relevance(step))
    return decisions


def test_relevance_depth_clamping_and_quantisation():
    ones = np.ones(L)
    assert relevance_depth(ones, 0.5) == 4
    assert relevance_depth(ones, 0.51) == 5
    assert relevance_depth(ones, 1.0) == 8
    assert relevance_depth(TOP, 0.9) == 1
    assert relevance_depth(np.array([5.0, 0, 0, 0, 0, 0, 0, 0]), 0.9) == 8
    assert relevance_depth(np.zeros(L), 0.9) == 8  # no information: train everything
    assert relevance_depth(np.array([1, 2, 3, 4, 5, 6, 7, 8.0]), 0.5) == 3  # 8+7+6=21 >= 18, 8+7=15 < 18

    levels = (2, 4, 6, 8)
    assert [levels[quantize_up(d, levels)] for d in range(1, 9)] == [2, 2, 4, 4, 6, 6, 8, 8]
    clamped = allowed_levels(dataclasses.replace(BASE, min_active=3, max_active=6), L)
    assert clamped == (4, 6)
    assert [clamped[quantize_up(d, clamped)] for d in (1, 4, 5, 7, 8)] == [4, 4, 6, 6, 6]
    assert allowed_levels(dataclasses.replace(BASE, levels=()), L) == (2, 4, 6, 8)
    assert allowed_levels(dataclasses.replace(BASE, levels=()), 6) == (2, 3, 5, 6)

    # The same rules through the scheduler: clamped to [3, 6] then quantised up among the allowed levels.
    for relevance, expected in ((TOP, 4), (np.ones(L), 6), (HALF, 4)):
        sched = DynamicSuffix(L, 100, dataclasses.replace(BASE, min_active=3, max_active=6, threshold=0.95))
        assert _drive(sched, 12, relevance=lambda s: relevance)[11] == (expected, False)


def test_no_freezing_before_freeze_start():
    config = dataclasses.replace(BASE, freeze_start_step=5, freeze_start_frac=0.2)
    sched = DynamicSuffix(L, 100, config)
    decisions = _drive(sched, 25)
    assert decisions[:20] == [(L, False)] * 20
    assert decisions[20] == (L, True) and decisions[21:25] == [(2, False)] * 4
    assert sched.freezing_since == 20
    assert phase_bounds(config, 10) == (5, 10)  # the step floor wins over a small fraction


def test_stability_gating_holds_freezing_off_while_the_loss_is_noisy():
    """Window 4: an alternating loss has identical window means (only the CV test fails); from step 30 the loss is
    flat, and the first decision whose last 2 windows (8 losses, steps 30..37) are all flat is step 38."""
    config = dataclasses.replace(BASE, stability_window=4, stability_rel_change=0.01, stability_cv=0.05)
    sched = DynamicSuffix(L, 100, config)
    decisions = _drive(sched, 42, loss=lambda s: 1.0 if s >= 30 or s % 2 == 0 else 1.5)
    assert decisions[:38] == [(L, False)] * 38
    assert decisions[38:42] == [(2, False), (2, False), (L, True), (2, False)]
    assert sched.freezing_since == 38


def test_stability_gating_holds_freezing_off_while_the_loss_still_trends():
    """A smooth decline (window CV ~0.02 < 0.05) still moves the windowed mean by > 0.1%: no freezing until it
    flattens at step 40; the first decision seeing 8 flat losses (steps 40..47) is step 48."""
    config = dataclasses.replace(BASE, stability_window=4, stability_rel_change=0.001, stability_cv=0.05)
    sched = DynamicSuffix(L, 200, config)
    decisions = _drive(sched, 60, loss=lambda s: 2.0 - 0.02 * min(s, 40))
    assert decisions[:48] == [(L, False)] * 48
    assert decisions[48] == (2, False) and sched.freezing_since == 48


def test_probes_happen_exactly_every_probe_every_steps():
    sched = DynamicSuffix(L, 50, dataclasses.replace(BASE, probe_every=7))
    decisions = _drive(sched, 50)
    probes = [s for s, (_, probe) in enumerate(decisions) if probe]
    assert probes == [0, 7, 14, 21, 28, 35, 42, 49]
    assert all(decisions[s] == ((L, True) if s in probes else (2, False)) for s in range(50))
    assert sched.n_probes == 8
    assert sched.mean_active_depth == pytest.approx((8 * L + 42 * 2) / 50)
    assert sched.timeline[:2] == [(0, L, True), (1, 2, False)]
    assert sched.summary()["steps_per_depth"] == {2: 42, L: 8}


def test_relevance_comes_only_from_full_depth_steps_and_is_smoothed():
    sched = DynamicSuffix(L, 100, dataclasses.replace(BASE, relevance_beta=0.75))
    sched.decide(0)
    sched.observe(0, 1.0, HALF)
    sched.decide(1)
    sched.observe(1, 1.0, 100 * np.ones(L))  # a suffix step: its frozen blocks have no gradient, ignored
    np.testing.assert_array_equal(sched.relevance_ema, HALF)
    sched.decide(10)
    sched.observe(10, 1.0, TOP)
    np.testing.assert_allclose(sched.relevance_ema, 0.75 * HALF + 0.25 * TOP)
    sched.decide(20)
    with pytest.raises(UserError):
        sched.observe(20, 1.0, np.ones(L - 1))


def test_adaptive_budget_raises_and_lowers_one_level_at_a_time():
    """Relevance puts the base depth at 4 (level index 1). loss_beta=0 makes the probe-loss EMA the probe loss.
    Reference (freeze_start) = 1.0; it is re-anchored to the current EMA after every move."""
    config = dataclasses.replace(BASE, adaptive=True, probe_every=5, freeze_start_step=10, threshold=1.0,
                                 loss_beta=0.0, upper_factor=1.1, lower_factor=0.9)
    probe_losses = {10: 1.0, 15: 1.2, 20: 1.2, 25: 1.0, 30: 0.85, 35: 0.7, 40: 0.78, 45: 0.9, 50: 1.5, 55: 2.0}
    sched = DynamicSuffix(L, 100, config)
    decisions = _drive(sched, 60, loss=lambda s: probe_losses.get(s, 1.0), relevance=lambda s: HALF)
    depth_after_probe = {p: decisions[p + 1][0] for p in probe_losses}
    assert decisions[:10] == [(L, False)] * 10 and sched.freezing_since == 10
    assert depth_after_probe == {
        10: 4,  # 1.0 vs ref 1.0: hold
        15: 6,  # 1.2 > 1.1: up
        20: 6,  # 1.2 vs ref 1.2: hold
        25: 4,  # 1.0 < 0.9*1.2: down
        30: 2,  # 0.85 < 0.9: down
        35: 2,  # 0.7 < 0.765: down, clamped at the lowest level (no wind-up); ref -> 0.7
        40: 4,  # 0.78 > 0.77: up
        45: 6,  # 0.9 > 0.858: up
        50: 8,  # 1.5: up
        55: 8,  # 2.0: up, clamped at the top
    }
    assert all(d == (L, True) for s, d in enumerate(decisions) if s >= 10 and s % 5 == 0)


@pytest.mark.parametrize("reference, expected", [("freeze_start", [4, 4, 4]), ("running_min", [4, 4, 6])])
def test_adaptive_reference_kinds(reference, expected):
    """Probe losses 1.0, 0.95, 1.06 with factors 0.9/1.1 and base depth 4. freeze_start keeps the anchor 1.0 while
    nothing moves, so 1.06 holds; running_min follows the lowest EMA (0.95), so 1.06 > 1.045 raises to 6."""
    config = dataclasses.replace(BASE, adaptive=True, probe_every=5, threshold=1.0, reference=reference,
                                 loss_beta=0.0, upper_factor=1.1, lower_factor=0.9)
    probe_losses = {0: 1.0, 5: 0.95, 10: 1.06}
    sched = DynamicSuffix(L, 100, config)
    decisions = _drive(sched, 12, loss=lambda s: probe_losses.get(s, 1.0), relevance=lambda s: HALF)
    assert [decisions[p + 1][0] for p in probe_losses] == expected


def test_final_recovery_fraction_runs_full():
    sched = DynamicSuffix(L, 50, dataclasses.replace(BASE, final_full_frac=0.2))
    decisions = _drive(sched, 50)
    assert decisions[39] == (2, False)
    assert decisions[40:] == [(L, False)] * 10
    assert sched.n_probes == 4  # 0, 10, 20, 30: no probes in the recovery phase


def test_full_and_static_schedules_are_trivial():
    full = FullUpdate(L)
    assert _drive(full, 5) == [(L, False)] * 5
    assert full.n_probes == 0 and full.mean_active_depth == L

    static = StaticSuffix(L, 3)
    assert _drive(static, 5) == [(3, False)] * 5
    phased = StaticSuffix(L, 3, freeze_start=2, full_from=4)
    assert _drive(phased, 6) == [(L, False)] * 2 + [(3, False)] * 2 + [(L, False)] * 2
    assert phased.mean_active_depth == pytest.approx((4 * L + 2 * 3) / 6)

    config = DynamicSuffixConfig(freeze_start_frac=0.1, final_full_frac=0.1)
    made = make_schedule("static_suffix", L, 100, static_depth=5, config=config)
    assert (made.freeze_start, made.full_from) == (10, 90)
    assert isinstance(make_schedule("full_update", L, None), FullUpdate)
    assert isinstance(make_schedule("dynamic_suffix", L, 100), DynamicSuffix)


def test_decide_is_idempotent_and_observe_needs_a_decision():
    sched = DynamicSuffix(L, 100, BASE)
    assert sched.decide(3) == sched.decide(3) and len(sched.timeline) == 1
    with pytest.raises(ValueError):
        sched.observe(4, 1.0)


@pytest.mark.parametrize("bad", [
    dict(levels=(0, 4)), dict(levels=(2, 9)), dict(min_active=5, max_active=4), dict(min_active=7, levels=(2, 4)),
    dict(threshold=0.0), dict(probe_every=0), dict(relevance="norm"), dict(reference="max"),
    dict(upper_factor=0.9), dict(lower_factor=1.1), dict(final_full_frac=1.5), dict(relevance_beta=1.0),
])
def test_bad_configs_raise_user_error(bad):
    with pytest.raises(UserError):
        DynamicSuffix(L, 100, dataclasses.replace(BASE, **bad))


def test_bad_schedule_requests_raise_user_error():
    with pytest.raises(UserError):
        make_schedule("sometimes", L, 100)
    with pytest.raises(UserError):
        make_schedule("static_suffix", L, 100)
    with pytest.raises(UserError):
        StaticSuffix(L, 0)
    with pytest.raises(UserError):
        DynamicSuffix(L, None, DynamicSuffixConfig())  # fractions need a total step count


def test_plasticity_depth_freezes_the_longest_decayed_bottom_run():
    peak = np.ones(L)
    assert plasticity_depth(np.ones(L), peak, 0.5) == 8  # nothing decayed: train everything
    assert plasticity_depth(np.array([0.1, 0.2, 0.4, 0.9, 1, 1, 1, 1]), peak, 0.5) == 5
    # Block 1 still learns: only block 0 below it can be frozen (a suffix schedule freezes a prefix).
    assert plasticity_depth(np.array([0.1, 0.8, 0.1, 0.1, 1, 1, 1, 1]), peak, 0.5) == 7
    assert plasticity_depth(np.full(L, 0.01), peak, 0.5) == 1  # all decayed: the top block stays
    # Relative to each block's own peak, whatever the absolute scales (nanochat's bottom blocks are the largest).
    scales = np.array([36, 9, 8, 6, 5, 4, 3, 2.0])
    assert plasticity_depth(scales * [0.2, 0.3, 0.3, 0.6, 1, 1, 1, 1], scales, 0.5) == 5
    assert relevance_depth(scales * [0.2, 0.3, 0.3, 0.6, 1, 1, 1, 1], 0.9) == 8  # the cumulative rule cannot


def test_plasticity_rule_probes_from_the_start_and_follows_decay():
    """Bottom-up decay: blocks 0..3 fall to 20% of their peak by step 40, the top keeps learning. Freezing may
    start at step 20; the plasticity rule probes every 10 steps from step 0 to see each block's peak."""
    config = dataclasses.replace(BASE, rule="plasticity", decay_threshold=0.5, relevance_beta=0.0,
                                 freeze_start_step=20)
    decay = np.array([1, 1, 1, 1, 0, 0, 0, 0.0])

    def relevance(step):
        return 1.0 - 0.8 * decay * min(step / 40, 1.0)

    sched = DynamicSuffix(L, 100, config)
    decisions = _drive(sched, 62, relevance=relevance)
    assert [decisions[s] for s in (0, 10)] == [(L, True), (L, True)]
    assert decisions[1:10] == [(L, False)] * 9
    assert decisions[21] == (L, False)  # step-20 probe: blocks at 0.6 of their peak, still learning
    assert decisions[31] == (4, False)  # step-30 probe: blocks 0..3 at 0.4 < 0.5 of their peak: frozen
    assert decisions[61] == (4, False)
    assert sched.relevance_peak.tolist() == [1.0] * L


def test_progressive_freezes_bottom_up_monotonically_through_the_levels():
    config = dataclasses.replace(BASE, freeze_start_frac=0.2, final_full_frac=0.2, progressive_power=1.0)
    sched = make_schedule("progressive", L, 100, config=config)
    depths = [sched.decide(s)[0] for s in range(100)]
    assert depths[:20] == [L] * 20 and depths[80:] == [L] * 20
    frozen_phase = depths[20:80]
    assert all(a >= b for a, b in zip(frozen_phase, frozen_phase[1:]))  # monotone: never thawed
    # Block l freezes at 20 + 60 * (l+1)/8: 2 frozen from step 35 (depth 6), 4 from 50, 6 from 65, 7 from 72.5.
    assert [depths[s] for s in (27, 34, 35, 49, 50, 64, 65, 73, 79)] == [8, 8, 6, 6, 4, 4, 2, 2, 2]
    assert not any(p for _, _, p in sched.timeline)
    cubic = make_schedule("progressive", L, 100, config=dataclasses.replace(config, progressive_power=3.0))
    # ((l+1)/8)^3 of 60 steps after 20: blocks 0, 1 by step 21, 0..4 by 40 (depth 3 -> level 4), 0..5 by 60.
    assert [cubic.decide(s)[0] for s in (21, 40, 60)] == [6, 4, 2]
    with pytest.raises(UserError, match="progressive_power"):
        make_schedule("progressive", L, 100, config=dataclasses.replace(config, progressive_power=0.0))
    with pytest.raises(UserError, match="total step count"):
        make_schedule("progressive", L, None, config=dataclasses.replace(config, freeze_start_frac=0,
                                                                           final_full_frac=0))


@pytest.mark.parametrize("field_name, value, match", [
    ("rule", "bogus", "rule must be"), ("decay_threshold", 1.0, "decay_threshold"),
    ("relevance", "norm", "relevance must be")])
def test_rule_knobs_are_validated(field_name, value, match):
    with pytest.raises(UserError, match=match):
        DynamicSuffix(L, 100, dataclasses.replace(BASE, **{field_name: value}))
