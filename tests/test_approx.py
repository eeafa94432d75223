import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgr.methods import approx as A
from mgr import structured_inputs as S
from mgr.errors import UserError

D_IN, D_OUT = 48, 40
SMALL = S.InputSpec(tokens_train=400, tokens_val=64, tokens=64, outlier_channels=2, heavy_tail_df=5.0)


@pytest.fixture(scope="module")
def lin():
    return S.make_linear_problem(0, D_IN, D_OUT, SMALL)


def _np_tail_norm(m: np.ndarray, rank: int) -> float:
    s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2)))


def _np_whitened(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Lᵀ W in float64: ||X M||_F = ||Lᵀ M||_F for XᵀX = L Lᵀ."""
    x = x.astype(np.float64)
    return np.linalg.cholesky(x.T @ x).T @ w.astype(np.float64)


RANKS = (1, 2, 4, 8, 16, 32, 40)


# ------------------------------------------------------------------------------------------------ SVD


def test_svd_low_rank_matches_eckart_young_and_is_monotone(lin):
    errs = []
    for r in RANKS:
        lr = A.svd_low_rank(lin.w_IO, r)
        assert lr.a_IR.shape == (D_IN, r) and lr.b_RO.shape == (r, D_OUT)
        err = float(jnp.linalg.norm(lin.w_IO - A.low_rank_weight(lr)))
        np.testing.assert_allclose(err, _np_tail_norm(lin.w_IO, r), rtol=1e-3, atol=1e-5)
        errs.append(err)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:]))
    assert errs[-1] / np.linalg.norm(lin.w_IO) < 1e-5  # full rank reproduces W


def test_randomized_svd_close_to_exact_on_decaying_spectrum():
    w = S.decaying_weight(np.random.default_rng(1), 128, 96, S.InputSpec(weight_alpha=1.0))
    rank = 8
    _, s_exact, _ = A.truncated_svd(w, rank)
    _, s_rand, _ = A.truncated_svd(w, rank, method="randomized", key=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(s_rand), np.asarray(s_exact), rtol=2e-3)
    err = lambda p: float(jnp.linalg.norm(w - A.low_rank_weight(p)))
    e_exact = err(A.svd_low_rank(w, rank))
    e_rand = err(A.svd_low_rank(w, rank, method="randomized", key=jax.random.key(0)))
    assert e_exact <= e_rand <= 1.01 * e_exact


def test_bad_rank_and_method_raise(lin):
    with pytest.raises(UserError):
        A.svd_low_rank(lin.w_IO, 0)
    with pytest.raises(UserError):
        A.svd_low_rank(lin.w_IO, D_OUT + 1)
    with pytest.raises(UserError):
        A.svd_low_rank(lin.w_IO, 4, method="qr")
    with pytest.raises(UserError):
        A.svd_low_rank(lin.w_IO, 4, method="randomized")  # no key


# ---------------------------------------------------------------------------------------- data-aware


@pytest.mark.parametrize("shape", [(D_IN, D_OUT), (32, 56)])
def test_data_aware_optimal_monotone_and_beats_svd(shape):
    d_in, d_out = shape
    prob = S.make_linear_problem(3, d_in, d_out, SMALL)
    w, x = prob.w_IO, prob.x.train
    white = A.whitening(x)
    assert white.path == "cholesky"
    lw = _np_whitened(x, w)
    prev = np.inf
    for r in sorted({1, 2, 4, 8, 16, min(shape)}):
        da, path = A.data_aware_low_rank(w, x, r, white=white)
        dd, _ = A.data_aware_low_rank(w, x, r, white=white, diagonal=True)
        e_svd = A.activation_error(x, w, A.low_rank_weight(A.svd_low_rank(w, r)))
        e_da = A.activation_error(x, w, A.low_rank_weight(da))
        e_dd = A.activation_error(x, w, A.low_rank_weight(dd))
        assert path == "cholesky"
        # the optimum ||Lᵀ W - [Lᵀ W]_r||_F from a float64 reference
        np.testing.assert_allclose(e_da, _np_tail_norm(lw, r), rtol=2e-3, atol=1e-3 * np.linalg.norm(lw))
        slack = 1e-5 * np.linalg.norm(lw)  # float32 rounding once the errors reach ~0 at full rank
        assert e_da <= e_svd * (1 + 1e-4) + slack
        assert e_dd <= e_da * (1 + 1e-5) + slack
        assert e_da <= prev * (1 + 1e-5) + slack
        prev = e_da
    assert prev / np.linalg.norm(x @ w) < 1e-4  # full rank is exact on the calibration set


def test_diagonal_is_per_column_least_squares():
    prob = S.make_linear_problem(4, 24, 36, SMALL)  # d_out > d_in: diagonal covers the first 24 outputs
    w, x = prob.w_IO.astype(np.float64), prob.x.train.astype(np.float64)
    lr, _ = A.data_aware_low_rank(prob.w_IO, prob.x.train, 3, diagonal=True)
    assert lr.d_M.shape == (24,)
    resid = x @ (w - np.asarray(A.low_rank_weight(lr._replace(d_M=None)), np.float64))
    want = np.array([x[:, j] @ resid[:, j] / (x[:, j] @ x[:, j]) for j in range(24)])
    np.testing.assert_allclose(np.asarray(lr.d_M), want, rtol=1e-3, atol=1e-5)
    y = np.asarray(A.low_rank_apply(lr, jnp.asarray(prob.x.val)))
    np.testing.assert_allclose(y, prob.x.val @ np.asarray(A.low_rank_weight(lr)), rtol=1e-4, atol=1e-4)


def test_whitening_fallbacks_on_rank_deficient_activations(lin):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((300, 12)) @ rng.standard_normal((12, D_IN))).astype(np.float32)  # XᵀX rank 12
    w = lin.w_IO
    damped, path = A.data_aware_low_rank(w, x, 6)
    assert path == "damped" and all(np.isfinite(np.asarray(a)).all() for a in damped[:2])
    undamped, path = A.data_aware_low_rank(w, x, 6, damping=0.0)
    assert path == "eigh" and all(np.isfinite(np.asarray(a)).all() for a in undamped[:2])
    e_svd = A.activation_error(x, w, A.low_rank_weight(A.svd_low_rank(w, 6)))
    e_eigh = A.activation_error(x, w, A.low_rank_weight(undamped))
    # X has rank 12: the optimum is the tail of the 12 nonzero singular values of X W (= those of Lᵀ W)
    np.testing.assert_allclose(e_eigh, _np_tail_norm(x @ w, 6), rtol=1e-2)
    assert e_eigh < e_svd
    assert A.activation_error(x, w, A.low_rank_weight(A.data_aware_low_rank(w, x, 12, damping=0.0)[0])) \
        < 1e-3 * np.linalg.norm(x @ w)


def test_factors_are_balanced(lin):
    """||A[:, k]|| = ||B[k, :]|| for every component, including after the whitening's L^{-T}."""
    for lr in (A.svd_low_rank(lin.w_IO, 8), A.data_aware_low_rank(lin.w_IO, lin.x.train, 8)[0]):
        np.testing.assert_allclose(np.linalg.norm(np.asarray(lr.a_IR), axis=0),
                                   np.linalg.norm(np.asarray(lr.b_RO), axis=1), rtol=1e-4)
    _, s, _ = A.truncated_svd(lin.w_IO, 8)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(A.svd_low_rank(lin.w_IO, 8).b_RO), axis=1) ** 2,
                               np.asarray(s), rtol=1e-4)


def test_low_rank_mlp_per_layer_objectives():
    prob = S.make_mlp_problem(6, 32, 64, SMALL)
    p = A.MLP(jnp.asarray(prob.w1_DH), jnp.asarray(prob.w2_HD))
    x = prob.x.train
    plain, path = A.low_rank_mlp(p, 8)
    aware, paths = A.low_rank_mlp(p, 8, x_ND=x)
    assert path == "svd" and len(paths.split("/")) == 2
    hidden = np.maximum(x @ prob.w1_DH, 0) ** 2
    for layer, w, inputs in (("up", prob.w1_DH, x), ("down", prob.w2_HD, hidden)):
        e_plain = A.activation_error(inputs, w, A.low_rank_weight(getattr(plain, layer)))
        e_aware = A.activation_error(inputs, w, A.low_rank_weight(getattr(aware, layer)))
        assert e_aware < e_plain
    xv = jnp.asarray(prob.x.val)
    y = A.mlp_apply(p, xv)
    assert A.relative_error(A.low_rank_mlp_apply(aware, xv), y) < A.relative_error(A.low_rank_mlp_apply(plain, xv), y)
    full, _ = A.low_rank_mlp(p, 32)
    assert A.relative_error(A.low_rank_mlp_apply(full, xv), y) < 1e-4


def test_ranks_for():
    assert A.ranks_for((0.5, 1 / 3, 0.001, 0.5), 96) == [1, 32, 48]
    for bad in ((), (0.0,), (1.5,)):
        with pytest.raises(UserError):
            A.ranks_for(bad, 96)


def test_all_zero_activations_fall_back_to_plain_svd(lin):
    lr, path = A.data_aware_low_rank(lin.w_IO, np.zeros((10, D_IN), np.float32), 5)
    assert path == "eigh"
    np.testing.assert_allclose(np.asarray(A.low_rank_weight(lr)),
                               np.asarray(A.low_rank_weight(A.svd_low_rank(lin.w_IO, 5))), atol=1e-4)


def test_data_aware_rejects_bad_inputs(lin):
    with pytest.raises(UserError):
        A.data_aware_low_rank(lin.w_IO, lin.x.train[:, :10], 4)
    with pytest.raises(UserError):
        A.data_aware_low_rank(lin.w_IO, lin.x.train, 4, damping=-1.0)


# ---------------------------------------------------------------------------------- pruning and 2:4


@pytest.fixture(scope="module")
def mlp():
    prob = S.make_mlp_problem(2, 32, 96, SMALL)
    return prob, A.MLP(jnp.asarray(prob.w1_DH), jnp.asarray(prob.w2_HD))


@pytest.mark.parametrize("importance", A.IMPORTANCE)
def test_pruned_mlp_equals_masked_dense_mlp(mlp, importance):
    prob, p = mlp
    small, kept = A.prune_mlp(p, 0.3, importance=importance, x_ND=prob.x.train)
    assert small.w1_DH.shape == (32, 29) and small.w2_HD.shape == (29, 32) and len(kept) == 29
    scores = np.asarray(A.neuron_importance(p, method=importance, x_ND=prob.x.train))
    dropped = np.setdiff1d(np.arange(96), kept)
    assert scores[kept].min() >= scores[dropped].max()
    mask = np.zeros(96, np.float32)
    mask[kept] = 1.0
    masked = A.MLP(p.w1_DH * mask, p.w2_HD * mask[:, None])
    x = jnp.asarray(prob.x.val)
    np.testing.assert_allclose(np.asarray(A.mlp_apply(small, x)), np.asarray(A.mlp_apply(masked, x)),
                               rtol=1e-5, atol=1e-5)


def test_importance_definitions(mlp):
    prob, p = mlp
    w1, w2, x = prob.w1_DH.astype(np.float64), prob.w2_HD.astype(np.float64), prob.x.train.astype(np.float64)
    out_norm = np.linalg.norm(w2, axis=1)
    np.testing.assert_allclose(np.asarray(A.neuron_importance(p)), np.linalg.norm(w1, axis=0) * out_norm, rtol=1e-5)
    act = np.maximum(x @ w1, 0) ** 2
    np.testing.assert_allclose(np.asarray(A.neuron_importance(p, method="activation", x_ND=prob.x.train)),
                               act.mean(0) * out_norm, rtol=1e-4)
    with pytest.raises(UserError):
        A.neuron_importance(p, method="activation")
    with pytest.raises(UserError):
        A.prune_mlp(p, 0.0)


def test_mask_2_4_keeps_two_largest_per_group():
    w = np.random.default_rng(0).standard_normal((32, 12)).astype(np.float32)
    w[4:8, 0] = 1.0  # a tie group: still exactly two kept
    m = np.asarray(A.mask_2_4(jnp.asarray(w)))
    groups = m.reshape(8, 4, 12)
    assert (groups.sum(axis=1) == 2).all()
    mag = np.abs(w).reshape(8, 4, 12)
    kept_min = np.where(groups, mag, np.inf).min(axis=1)
    dropped_max = np.where(groups, -np.inf, mag).max(axis=1)
    assert (kept_min >= dropped_max).all()
    sp = A.sparsify_2_4(A.MLP(jnp.asarray(w), jnp.asarray(w.T)))
    assert (np.count_nonzero(np.asarray(sp.w1_DH).reshape(8, 4, 12), axis=1) == 2).all()
    assert (np.count_nonzero(np.asarray(sp.w2_HD).reshape(3, 4, 32), axis=1) == 2).all()
    with pytest.raises(UserError):
        A.mask_2_4(jnp.ones((6, 4)))


# ------------------------------------------------------------------------------------------ FLOPs


@pytest.fixture(scope="module")
def flops():
    return pytest.importorskip("mgr.flops", reason="mgr.flops (the shared estimator) is not available")


def test_low_rank_flops_match_analytic(flops):
    n, d_in, d_out, r = 64, 256, 192, 24
    w = S.decaying_weight(np.random.default_rng(0), d_in, d_out, S.InputSpec())
    x = jnp.ones((n, d_in))
    lr = A.svd_low_rank(w, r)
    for lr, extra in ((lr, 0), (lr._replace(d_M=jnp.ones(d_out)), 2 * n * d_out)):  # + the diagonal's mul/add
        rec = flops.count_flops(A.low_rank_apply, lr, x)
        want = 2 * n * (d_in * r + r * d_out)
        assert rec.matmul_flops == want
        assert abs(rec.flops - want - extra) <= 0.01 * want


def test_pruned_mlp_flops_match_analytic(flops):
    n, d, h = 64, 128, 512  # relu² adds ~1/(2d) on top of the matmuls: inside the 1%
    prob = S.make_mlp_problem(0, d, h, S.InputSpec(tokens_train=8, tokens_val=1, tokens=1))
    small, kept = A.prune_mlp(A.MLP(jnp.asarray(prob.w1_DH), jnp.asarray(prob.w2_HD)), 0.25)
    rec = flops.count_flops(A.mlp_apply, small, jnp.ones((n, d)))
    want = 2 * n * 2 * d * len(kept)
    assert len(kept) == 128 and rec.matmul_flops == want
    assert abs(rec.flops - want) <= 0.01 * want
    masked = A.sparsify_2_4(small)
    rec24 = flops.count_flops(A.mlp_apply, masked, jnp.ones((n, d)))
    assert rec24.matmul_flops == want  # executes dense
    assert A.nominal_2_4_flops(rec24) == pytest.approx(rec24.flops - want / 2)


# ----------------------------------------------------------------------------------- structured inputs


def test_structured_weights_and_activations_have_the_requested_spectra():
    spec = S.InputSpec(weight_alpha=1.5, act_beta=1.0, tokens_train=4000, tokens_val=10, tokens=10)
    prob = S.make_linear_problem(7, 64, 48, spec)
    s = np.linalg.svd(prob.w_IO.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s / s[0], (np.arange(48) + 1.0) ** -1.5, rtol=1e-4)
    assert np.sum(s**2) == pytest.approx(48, rel=1e-4)
    cov_eig = np.linalg.eigvalsh(np.cov(prob.x.train.T))[::-1]
    want = (np.arange(64) + 1.0) ** -1.0
    want *= 64 / want.sum()
    np.testing.assert_allclose(cov_eig[:4], want[:4], rtol=0.15)  # sampling noise on 4000 tokens
    assert [a.shape for a in prob.x] == [(4000, 64), (10, 64), (10, 64)]
    again = S.make_linear_problem(7, 64, 48, spec)
    np.testing.assert_array_equal(again.x.val, prob.x.val)
    assert not np.array_equal(S.make_linear_problem(8, 64, 48, spec).w_IO, prob.w_IO)


def test_outlier_channels_and_bad_specs():
    x = S.correlated_activations(np.random.default_rng(0), 2000, 32, S.InputSpec(outlier_channels=3, outlier_scale=20))
    std = x.std(axis=0)
    assert (std > 8 * np.median(std)).sum() == 3
    for bad in (S.InputSpec(sv_decay="linear"), S.InputSpec(heavy_tail_df=2.0), S.InputSpec(outlier_channels=99),
                S.InputSpec(tokens_val=0)):
        with pytest.raises(UserError):
            S.make_linear_problem(0, 32, 16, bad)


def test_layer_arrays_roundtrip_and_errors(tmp_path):
    spec = S.InputSpec(tokens_train=20, tokens_val=5, tokens=5)
    rng = np.random.default_rng(0)
    w1, w2, x = rng.standard_normal((8, 16)), rng.standard_normal((16, 8)), rng.standard_normal((30, 8))
    np.savez(tmp_path / "layer.npz", w1=w1, w2=w2, x=x)
    prob = S.mlp_problem_from_arrays(*S.load_layer_arrays(tmp_path / "layer.npz"), spec)
    np.testing.assert_allclose(prob.w1_DH, w1.astype(np.float32))
    assert sorted(map(tuple, np.concatenate(prob.x))) == sorted(map(tuple, x.astype(np.float32)))
    # the --from-checkpoint hook: the file replaces the generated layer, whatever the sizes asked for
    spec_ckpt = S.InputSpec(tokens_train=20, tokens_val=5, tokens=5, from_checkpoint=str(tmp_path / "layer.npz"))
    np.testing.assert_allclose(S.make_mlp_problem(0, 999, 999, spec_ckpt).w2_HD, w2.astype(np.float32))
    np.testing.assert_allclose(S.make_linear_problem(0, 999, 999, spec_ckpt).w_IO, w1.astype(np.float32))
    with pytest.raises(UserError):
        S.make_mlp_problem(0, 8, 16, S.InputSpec(from_checkpoint=str(tmp_path / "missing.npz")))
    with pytest.raises(UserError):
        S.load_layer_arrays(tmp_path / "missing.npz")
    with pytest.raises(UserError):
        S.load_layer_arrays(tmp_path)  # a directory without a nanochat checkpoint
    np.savez(tmp_path / "partial.npz", w1=w1)
    with pytest.raises(UserError):
        S.load_layer_arrays(tmp_path / "partial.npz")
    with pytest.raises(UserError):
        S.mlp_problem_from_arrays(w1, w1, x, spec)
    with pytest.raises(UserError):
        S.mlp_problem_from_arrays(w1, w2, x[:10], spec)  # fewer rows than train+val+bench
