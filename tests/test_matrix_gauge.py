"""Kernels, models and task of demos/matrix_gauge.py against dense references (scipy expm, finite differences)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
import scipy.stats

from demos import matrix_gauge as mg
from mgr.cli import main
from mgr.errors import UserError
from tests.conftest import one_error_line, read_json

OFFSETS = (1, 2, 4)
markov_mix = jax.jit(mg.markov_mix, static_argnums=(3, 4, 5))  # eager op-by-op dispatch is the slow part here


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def dense_generator(rates_O, offsets, T):
    """Q built entry by entry: rate r_o from i to i-o when that position exists, diagonal = -row sum."""
    Q = np.zeros((T, T))
    for i in range(T):
        for o, r in zip(offsets, rates_O):
            if i - o >= 0:
                Q[i, i - o] += r
        Q[i, i] = -Q[i].sum()
    return Q


def markov_problem(rng, T=9, G=2, C=3, rate_max=1.5, time_max=3.0):
    rates_GO = rate_max * rng.uniform(0.05, 1.0, (G, len(OFFSETS)))
    time_G = time_max * rng.uniform(0.2, 1.0, G)
    v_BTGC = rng.normal(size=(2, T, G, C))
    return v_BTGC, rates_GO, time_G, rate_max * len(OFFSETS)


def explicit_P(rates_GO, time_G, lam, depth, T):
    """P_g[i, j] = (P e_j)_i: the mixing applied to identity columns."""
    G = rates_GO.shape[0]
    cols = jnp.broadcast_to(jnp.eye(T, dtype=rates_GO.dtype)[:, :, None, None], (T, T, G, 1))
    out, tail_G = markov_mix(cols, rates_GO, time_G, OFFSETS, lam, depth)
    return np.transpose(np.asarray(out[..., 0]), (2, 1, 0)), np.asarray(tail_G)


def central_difference_check(f, args, rng, eps=1e-6, n_dirs=3):
    """Directional derivatives of scalar f along random directions: jax.grad vs central differences."""
    value_and_grad = jax.jit(jax.value_and_grad(f))  # one compile serves the gradient and the differences
    _, grads = value_and_grad(args)
    for _ in range(n_dirs):
        d = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), args)
        plus, _ = value_and_grad(jax.tree.map(lambda a, da: a + eps * da, args, d))
        minus, _ = value_and_grad(jax.tree.map(lambda a, da: a - eps * da, args, d))
        fd = (plus - minus) / (2 * eps)
        ad = sum(jnp.sum(g * da) for g, da in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
        assert abs(float(ad) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd))), (float(ad), float(fd))


# --------------------------------------------------------------------------------------------------- Markov mixing


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_uniformization_matches_dense_expm(x64, dtype, tol):
    rng = np.random.default_rng(0)
    v, rates, times, lam = markov_problem(rng)
    cfg = mg.Config(markov_offsets=OFFSETS, rate_max=1.5, time_max=3.0, tail_tol=1e-13)
    depth, _ = mg.truncation_depth(cfg)
    pv, tail = markov_mix(*(jnp.asarray(a, dtype) for a in (v, rates, times)), OFFSETS, lam, depth)
    assert pv.dtype == dtype
    for g in range(rates.shape[0]):
        P = scipy.linalg.expm(times[g] * dense_generator(rates[g], OFFSETS, v.shape[1]))
        ref = np.einsum("ij,bjc->bic", P, v[:, :, g, :])
        np.testing.assert_allclose(np.asarray(pv[:, :, g, :]), ref, atol=tol, rtol=0)
        mean = lam * times[g]
        weights = np.asarray(mg.poisson_weights(jnp.asarray([mean]), depth))[:, 0]
        np.testing.assert_allclose(float(tail[g]), scipy.stats.poisson.sf(depth, mean), rtol=1e-3 if dtype ==
                                   "float32" else 1e-8, atol=1e-30)
        np.testing.assert_allclose(1.0 - weights.sum(), scipy.stats.poisson.sf(depth, mean), atol=1e-14)


def test_truncation_depth_is_minimal_and_capped():
    cfg = mg.Config(markov_offsets=OFFSETS, rate_max=1.0, time_max=4.0, tail_tol=1e-6)
    depth, tail = mg.truncation_depth(cfg)
    mean = 3 * 4.0
    assert tail == pytest.approx(scipy.stats.poisson.sf(depth, mean), rel=1e-9)
    assert tail <= 1e-6 < scipy.stats.poisson.sf(depth - 1, mean)
    capped, capped_tail = mg.truncation_depth(dataclasses.replace(cfg, max_terms=10))
    assert capped == 10 and capped_tail == pytest.approx(scipy.stats.poisson.sf(10, mean), rel=1e-9)


def test_markov_P_is_stochastic_causal_and_exact_at_boundary(x64):
    rng = np.random.default_rng(1)
    T = 9
    _, rates, times, lam = markov_problem(rng, T=T, G=3)
    depth = 60
    P, tail = explicit_P(jnp.asarray(rates), jnp.asarray(times), lam, depth, T)
    assert tail.max() < 1e-12
    assert P.min() >= 0.0
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-12)  # includes rows 0..3 where some offsets fall outside
    assert np.abs(np.triu(P, 1)).max() == 0.0  # no mass flows from the future
    np.testing.assert_allclose(P[:, 0, :], np.eye(T)[0][None].repeat(3, 0), atol=1e-12)  # position 0 cannot move
    # row 1 only has the offset-1 rate: P[1, 0] = 1 - exp(-r_1 t)
    np.testing.assert_allclose(P[:, 1, 0], 1 - np.exp(-rates[:, 0] * times), atol=1e-12)


def test_markov_mix_gradient_matches_finite_differences(x64):
    rng = np.random.default_rng(2)
    v, rates, times, lam = markov_problem(rng, T=7)
    c = jnp.asarray(rng.normal(size=v.shape))

    def f(args):
        return jnp.sum(c * mg.markov_mix(args["v"], args["rates"], args["t"], OFFSETS, lam, 25)[0])

    central_difference_check(f, {"v": jnp.asarray(v), "rates": jnp.asarray(rates), "t": jnp.asarray(times)}, rng)


# --------------------------------------------------------------------------------------------------- transports


def test_transport_is_expm_of_block_skew_generator_and_orthogonal(x64):
    rng = np.random.default_rng(3)
    P = 4
    theta = rng.uniform(-7, 7, P)
    A = np.zeros((2 * P, 2 * P))
    for p, th in enumerate(theta):
        A[2 * p + 1, 2 * p], A[2 * p, 2 * p + 1] = th, -th
    R = np.asarray(mg.transport(jnp.eye(2 * P), jnp.asarray(theta))).T  # rows e_k -> columns R e_k
    np.testing.assert_allclose(R, scipy.linalg.expm(A), atol=1e-12)
    np.testing.assert_allclose(R.T @ R, np.eye(2 * P), atol=1e-12)


def test_relative_transport_is_rotation_by_angle_difference(x64):
    rng = np.random.default_rng(4)
    T, D = 6, 8
    x = jnp.asarray(rng.normal(size=(1, T, D)))
    freq, w = jnp.asarray(rng.normal(size=D // 2)), jnp.asarray(rng.normal(size=(D, D // 2)))
    theta = mg.transport_angles(x, freq, w)[0]
    np.testing.assert_allclose(theta, np.cumsum(np.asarray(freq + x[0] @ w), axis=0), atol=1e-12)
    R = jnp.swapaxes(jax.vmap(lambda th: mg.transport(jnp.eye(D), th))(theta), -1, -2)
    for i, j in [(5, 2), (3, 3), (1, 4)]:
        relative = R[i] @ R[j].T
        np.testing.assert_allclose(relative, mg.transport(jnp.eye(D), theta[i] - theta[j]).T, atol=1e-12)


# --------------------------------------------------------------------------------------------------- gate


def test_gate_is_spd_within_its_bound_and_matches_expm(x64):
    rng = np.random.default_rng(5)
    bound = 1.7
    for scale in (0.01, 1.0, 100.0):
        b = jnp.asarray(scale * rng.normal(size=(6, 6)))
        S = np.asarray(mg.gate_generator(b, bound))
        np.testing.assert_allclose(S, S.T, atol=0)
        assert np.linalg.norm(S, 2) <= np.linalg.norm(S) < bound
        gate = np.asarray(jax.jit(mg.spd_gate, static_argnums=1)(b, bound))
        np.testing.assert_allclose(gate, scipy.linalg.expm(S), atol=1e-12, rtol=1e-12)
        eig = np.linalg.eigvalsh(gate)
        assert math.exp(-bound) < eig.min() and eig.max() < math.exp(bound) and eig.min() > 0


# --------------------------------------------------------------------------------------------------- models


def small_config(**kw):
    return mg.Config(**{"seq_len": 10, "vocab": 5, "d_model": 8, "n_heads": 2, "n_groups": 2, "mlp_hidden": 16,
                        "task_offsets": (1, 3), "batch_size": 3, "time_max": 1.0, "max_terms": 12, **kw})


def test_gauge_block_gradient_matches_finite_differences(x64):
    rng = np.random.default_rng(6)
    cfg = small_config()
    p = mg.init_gauge(jax.random.key(0), cfg)
    p["gate_b_DD"] = jnp.asarray(rng.normal(size=p["gate_b_DD"].shape))
    x = jnp.asarray(rng.normal(size=(2, cfg.seq_len, cfg.d_model)))
    c = jnp.asarray(rng.normal(size=x.shape))

    def f(args):
        return jnp.sum(c * mg.gauge_block(args["p"], args["x"], cfg))

    central_difference_check(f, {"p": p, "x": x}, rng)


@pytest.mark.parametrize("mixer", mg.MIXERS)
def test_models_are_causal(mixer):
    cfg = small_config()
    params = mg.init(jax.random.key(1), cfg, mixer)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab, (2, cfg.seq_len)))
    apply = jax.jit(lambda t: mg.apply(params, t, cfg, mixer))
    base = apply(tokens)
    for s in (0, 4, cfg.seq_len - 1):
        changed = apply(tokens.at[:, s].set((tokens[:, s] + 1) % cfg.vocab))
        diff_T = np.abs(np.asarray(changed - base)).max(axis=(0, 2))
        assert diff_T[:s].max(initial=0.0) == 0.0
        assert diff_T[s] > 1e-4  # the perturbation does reach its own position


def test_bfloat16_gauge_model_tracks_float32():
    cfg = small_config()
    params = mg.init(jax.random.key(4), cfg, "gauge")
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, cfg.vocab, (2, cfg.seq_len)))
    ref = jax.jit(lambda p: mg.apply(p, tokens, cfg, "gauge"))(params)
    low = jax.jit(lambda p: mg.apply(p, tokens, dataclasses.replace(cfg, dtype="bfloat16"), "gauge"))(params)
    assert low.dtype == jnp.float32
    assert float(jnp.abs(low - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_task_targets_and_loss_positions():
    cfg = small_config(task_offsets=(1, 3), vocab=5)
    tokens = np.random.default_rng(8).integers(0, 5, (2, cfg.seq_len))
    expected = [[(tokens[b, t - 1] + tokens[b, t - 3]) % 5 for t in range(3, cfg.seq_len)] for b in range(2)]
    np.testing.assert_array_equal(mg.task_targets(jnp.asarray(tokens), cfg), expected)
    a, b = mg.tokens_for(cfg, (0, 1), 0, 5), mg.tokens_for(cfg, (0, 1), 0, 5)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, cfg.batch_size, cfg.seq_len) and not np.array_equal(a[0], a[1])
    assert not np.array_equal(mg.tokens_for(cfg, (0,), 1, 5), a[:1])  # eval stream differs from training


@pytest.mark.slow
def test_seed_sweep_pairs_each_seed_with_its_params_and_batch():
    cfg = small_config()
    opt = optax.adam(cfg.lr)
    seeds = (3, 4)
    state = mg.init_state(cfg, "gauge", seeds, opt)
    w_SDD = np.asarray(state["params"]["mix"]["w_v_DD"])
    assert not np.allclose(w_SDD[0], w_SDD[1])  # each seed draws its own params
    batch = jnp.asarray(mg.tokens_for(cfg, seeds, 0, 0))
    swept, metrics = jax.jit(jax.vmap(mg.make_step(cfg, "gauge", opt)))(state, batch)
    assert metrics["loss"].shape == (2,)
    loss = jax.jit(lambda p, t: mg.loss_and_accuracy(p, t, cfg, "gauge")[0])
    for s in range(2):
        params = jax.tree.map(lambda a: np.asarray(a)[s], state["params"])
        np.testing.assert_allclose(metrics["loss"][s], loss(params, batch[s]), rtol=1e-5)
    assert float(jnp.abs(swept["params"]["mix"]["w_v_DD"] - state["params"]["mix"]["w_v_DD"]).min()) > 0


def test_certificates_of_initial_gauge_model():
    cfg = small_config()
    params = mg.init(jax.random.key(2), cfg, "gauge")
    params["mix"]["gate_b_DD"] = jax.random.normal(jax.random.key(3), (cfg.d_model, cfg.d_model))
    cert = jax.jit(lambda p: mg.certificates(p, cfg, jnp.arange(cfg.seq_len) % cfg.vocab))(params)
    depth, bound = mg.truncation_depth(cfg)
    assert cert["transport_orth_err"] < 1e-5
    assert cert["markov_row_sum_err"] < 1e-5 and cert["markov_min_entry"] >= 0 and cert["markov_upper_max"] == 0
    assert 0 < cert["markov_tail_mass"] <= bound
    assert math.exp(-cfg.gate_bound) < cert["gate_min_eig"] < 1 < cert["gate_max_eig"] < math.exp(cfg.gate_bound)


@pytest.mark.parametrize("bad", [dict(d_model=7), dict(task_offsets=(0, 2)), dict(markov_offsets=(1, 24)),
                                 dict(rate_max=0.0), dict(tail_tol=1.0), dict(seeds=(1, 1)), dict(n_groups=3),
                                 dict(dtype="float16")])
def test_bad_config_is_a_user_error(bad):
    with pytest.raises(UserError):
        mg.validate(mg.Config(**bad))


@pytest.mark.slow
def test_both_mixers_solve_the_task():
    cfg = mg.Config()
    opt = optax.adam(cfg.lr)
    for mixer in mg.MIXERS:
        state = jax.tree.map(lambda a: a[0], mg.init_state(cfg, mixer, (0,), opt))
        step = jax.jit(mg.make_step(cfg, mixer, opt))
        for i in range(2000):
            state, _ = step(state, jnp.asarray(mg.tokens_for(cfg, (0,), 0, i)[0]))
        result = jax.jit(mg.make_evaluate(cfg, mixer, (0,), sweep=False))(state)
        assert result["eval_acc"] > 0.95, (mixer, result)


@pytest.mark.parametrize("flags, message", [
    (("--d-model", "7"), "d_model=7"), (("--seeds", "1,1"), "distinct"),
    (("--seeds", "3,4294967296"), "seeds must lie"),
    (("--n-heads", "0"), "--n-heads must be >= 1, got 0"), (("--n-groups", "0"), "--n-groups must be >= 1, got 0"),
    (("--d-model", "0"), "--d-model must be >= 1, got 0"), (("--d-model", "-2"), "--d-model must be >= 1, got -2"),
    (("--rate-max", "nan"), "must be finite"), (("--lr", "inf"), "must be finite"),
])
def test_bad_flags_are_one_error_line(tmp_path, capsys, flags, message):
    code = main(["run", "matrix-gauge", *flags, "--max-iterations", "1", "--artifacts-dir", str(tmp_path)])
    assert code == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "demos").exists()  # checked before the run directory is made


@pytest.mark.slow
def test_a_budget_spent_before_the_first_step_reports_cleanly_and_says_it_is_a_smoke_test(tmp_path, capsys):
    code = main(["run", "matrix-gauge", "--time-budget", "1e-9", "--eval-every", "0", "--seq-len", "8",
                 "--d-model", "8", "--mlp-hidden", "8", "--eval-batches", "1", "--artifacts-dir", str(tmp_path),
                 "--run-id", "zero"])
    assert code == 0
    s = read_json(tmp_path / "demos" / "matrix_gauge" / "zero" / "summary.json")
    assert s["status"] == "completed" and s["budget"]["steps"] == 0
    assert s["results"]["notes"][0].startswith("not learned yet: after 0 steps the best eval accuracy is")
    out = capsys.readouterr().out
    assert "0 steps is a smoke test" in out and "within 2000 steps" in out
