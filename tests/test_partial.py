import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mgr.errors import UserError
from mgr.flops import count_flops
from mgr.methods.partial import block_relevance, freeze_prefix_rows, predicate_labels, suffix_labels, suffix_scan

L, D = 8, 4


def _params(key=0):
    rng = np.random.default_rng(key)
    shapes = {"emb": (5, D), "blocks": {"w": (L, D, D), "b": (L, D)}, "head": (D, 3), "gain": ()}
    return jax.tree.map(lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def _grads(params, key, i=0):
    # numpy, not jax.random: compiling threefry would dominate this file's run time.
    rng = np.random.default_rng([key, i])
    return jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), params)


def _adamw():
    return optax.adamw(1e-2, weight_decay=0.1)


def _steps(tx, params, state, n, key=1, grads=None):
    """n optimizer steps with fresh nonzero gradients on EVERY leaf (as if the model did not stop_gradient)."""
    grads = grads or [_grads(params, key, i) for i in range(n)]

    @jax.jit
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    for i in range(n):
        params, state = step(params, state, grads[i])
    return params, state


def test_suffix_labels_stacked_leaves():
    labels = suffix_labels(_params(), L, 3, below_blocks=(("emb",),))
    assert labels == {"emb": 5, "blocks": {"w": 5, "b": 5}, "head": 0, "gain": 0}
    full = suffix_labels(_params(), L, L, below_blocks=(("emb",),))
    assert full == {"emb": 0, "blocks": {"w": 0, "b": 0}, "head": 0, "gain": 0}


def test_suffix_labels_per_block_subtrees_of_an_nnx_model():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(D, D, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(5, D, rngs=rngs)
            self.blocks = nnx.List([Block(rngs) for _ in range(4)])

    _, state = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
    labels = suffix_labels(state, 4, 1, below_blocks=(("emb",),))
    assert labels["emb"]["embedding"].get_value() == 5
    assert [labels["blocks"][i]["lin"]["kernel"].get_value() for i in range(4)] == [D, D, D, 0]
    assert [labels["blocks"][i]["lin"]["bias"].get_value() for i in range(4)] == [D, D, D, 0]

    # The transformation runs on nnx.State trees as they are.
    tx = freeze_prefix_rows(_adamw(), labels)
    new_state, _ = _steps(tx, state, tx.init(state), 2)
    def kernel(tree, i):
        return tree["blocks"][i]["lin"]["kernel"].get_value()

    assert np.array_equal(kernel(new_state, 2), kernel(state, 2))
    assert not np.array_equal(kernel(new_state, 3), kernel(state, 3))


def test_bad_layouts_raise_user_error():
    with pytest.raises(UserError):
        suffix_labels(_params(), L, 0)
    with pytest.raises(UserError):
        suffix_labels(_params(), L, L + 1)
    with pytest.raises(UserError, match="not stacked"):
        suffix_labels(_params(), L + 1, 2)
    with pytest.raises(UserError, match="outside n_blocks"):
        suffix_labels({"blocks": [{"w": jnp.ones(2)} for _ in range(3)]}, 2, 1)
    with pytest.raises(UserError):
        block_relevance(_params(), _params(), L, block_axis_path=("nope",))


def test_frozen_rows_bitwise_unchanged_with_weight_decay_unlike_optax_masked():
    params = _params()
    labels = suffix_labels(params, L, 3, below_blocks=(("emb",),))
    tx = freeze_prefix_rows(_adamw(), labels)
    new, _ = _steps(tx, params, tx.init(params), 6)
    for name in ("w", "b"):
        assert np.array_equal(new["blocks"][name][:5], params["blocks"][name][:5])
        assert all(not np.array_equal(new["blocks"][name][r], params["blocks"][name][r]) for r in range(5, L))
    assert np.array_equal(new["emb"], params["emb"])
    assert not np.array_equal(new["head"], params["head"])

    # optax.masked passes the raw gradient through as the update of masked-out leaves: emb moves.
    mask = {"emb": False, "blocks": {"w": True, "b": True}, "head": True, "gain": True}
    masked = optax.masked(_adamw(), mask)
    moved, _ = _steps(masked, params, masked.init(params), 6)
    assert not np.array_equal(moved["emb"], params["emb"])


def test_negative_zero_and_scalar_leaves_stay_bitwise():
    params = {"blocks": jnp.array([[-0.0, 1.0], [2.0, -0.0]]), "gain": jnp.float32(-0.0), "bias": jnp.float32(2.0)}
    labels = predicate_labels(params, lambda path: path == ("bias",))
    assert labels == {"blocks": 2, "gain": 1, "bias": 0}
    labels["blocks"] = 1  # partly frozen stacked leaf
    tx = freeze_prefix_rows(_adamw(), labels)
    new, _ = _steps(tx, params, tx.init(params), 3)
    assert np.array_equal(np.signbit(new["blocks"][0]), [True, False])
    assert np.signbit(new["gain"]) and new["gain"] == 0
    assert new["bias"] != 2.0 and not np.array_equal(new["blocks"][1], params["blocks"][1])


def test_trainable_rows_follow_inner_optimizer_on_the_slice():
    """Reference: plain adamw run on a tree holding only the trainable rows/leaves."""
    params = _params()
    labels = suffix_labels(params, L, 3, below_blocks=(("emb",),))
    tx = freeze_prefix_rows(_adamw(), labels)
    new, _ = _steps(tx, params, tx.init(params), 4)

    def trainable(tree):
        return {"blocks": jax.tree.map(lambda x: x[5:], tree["blocks"]), "head": tree["head"], "gain": tree["gain"]}

    ref = trainable(params)
    ref, _ = _steps(_adamw(), ref, _adamw().init(ref), 4, grads=[trainable(_grads(params, 1, i)) for i in range(4)])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), trainable(new), ref)


def test_state_is_shared_across_depths_and_frozen_moments_resume():
    params = _params()
    b1 = 0.9
    tx_by_k = {k: freeze_prefix_rows(_adamw(), suffix_labels(params, L, k, below_blocks=(("emb",),)))
               for k in (2, L)}
    state0 = tx_by_k[L].init(params)
    assert jax.tree.structure(tx_by_k[2].init(params)) == jax.tree.structure(state0)

    p1, s1 = _steps(tx_by_k[L], params, state0, 2, key=10)  # all trainable: moments nonzero everywhere
    mu1, nu1 = s1.inner[0].mu, s1.inner[0].nu
    p2, s2 = _steps(tx_by_k[2], p1, s1, 3, key=20)  # bottom 6 blocks frozen
    mu2, nu2 = s2.inner[0].mu, s2.inner[0].nu
    for tree_before, tree_after in ((mu1, mu2), (nu1, nu2)):
        assert np.array_equal(tree_after["blocks"]["w"][:6], tree_before["blocks"]["w"][:6])
        assert np.array_equal(tree_after["emb"], tree_before["emb"])
        assert not np.array_equal(tree_after["blocks"]["w"][6:], tree_before["blocks"]["w"][6:])
    assert int(s2.inner[0].count) == 5

    # Unfreeze: the first update continues the kept moments instead of restarting them from zero.
    g = _grads(params, 30)
    _, s3 = jax.jit(tx_by_k[L].update)(g, s2, p2)
    expected = b1 * mu2["blocks"]["w"][:6] + (1 - b1) * g["blocks"]["w"][:6]
    np.testing.assert_allclose(s3.inner[0].mu["blocks"]["w"][:6], expected, rtol=1e-6)
    assert not np.allclose(s3.inner[0].mu["blocks"]["w"][:6], (1 - b1) * g["blocks"]["w"][:6])


def test_block_relevance_matches_numpy_for_stacked_and_per_block_layouts():
    params, grads = _params(), _grads(_params(), 3)
    g_w, g_b = (np.asarray(grads["blocks"][k], np.float64) for k in ("w", "b"))
    p_w, p_b = (np.asarray(params["blocks"][k], np.float64) for k in ("w", "b"))
    g_sq = np.sum(g_w**2, axis=(1, 2)) + np.sum(g_b**2, axis=1)
    p_sq = np.sum(p_w**2, axis=(1, 2)) + np.sum(p_b**2, axis=1)
    sal = np.sum(np.abs(g_w * p_w), axis=(1, 2)) + np.sum(np.abs(g_b * p_b), axis=1)
    ratio = jax.jit(lambda g, p: block_relevance(g, p, L))(grads, params)
    np.testing.assert_allclose(ratio, np.sqrt(g_sq) / np.sqrt(p_sq), rtol=1e-5)
    np.testing.assert_allclose(block_relevance(grads, params, L, kind="saliency"), sal, rtol=1e-5)

    def per_block(tree):
        return {"blocks": [jax.tree.map(lambda x: x[i], tree["blocks"]) for i in range(L)], "head": tree["head"]}

    np.testing.assert_allclose(block_relevance(per_block(grads), per_block(params), L), ratio, rtol=1e-5)
    with pytest.raises(UserError):
        block_relevance(grads, params, L, kind="norm")

    # update: the first-order loss decrease of each block's applied update, clipped at zero.
    updates = jax.tree.map(lambda g: -0.1 * g, grads)
    updates["blocks"]["w"][1] *= -1.0  # block 1 moved uphill in w
    want = 0.1 * g_sq
    want[1] = max(0.0, 0.1 * (np.sum(g_b[1] ** 2) - np.sum(g_w[1] ** 2)))
    np.testing.assert_allclose(block_relevance(grads, params, L, kind="update", updates=updates), want,
                               rtol=1e-5, atol=1e-9)
    # snr: cosine of the two half-batch gradients per block; equal halves give 1, opposite halves 0 (clipped).
    other = _grads(params, 4)
    o_w, o_b = (np.asarray(other["blocks"][k], np.float64) for k in ("w", "b"))
    dot = np.sum(g_w * o_w, axis=(1, 2)) + np.sum(g_b * o_b, axis=1)
    o_sq = np.sum(o_w**2, axis=(1, 2)) + np.sum(o_b**2, axis=1)
    np.testing.assert_allclose(block_relevance(grads, params, L, kind="snr", half_grads=(grads, other)),
                               np.maximum(dot / np.sqrt(g_sq * o_sq), 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(block_relevance(grads, params, L, kind="snr", half_grads=(grads, grads)), 1.0,
                               rtol=1e-5)
    negated = jax.tree.map(jnp.negative, grads)
    np.testing.assert_allclose(block_relevance(grads, params, L, kind="snr", half_grads=(grads, negated)), 0.0)
    for kind in ("update", "snr"):
        with pytest.raises(UserError, match=kind):
            block_relevance(grads, params, L, kind=kind)


def _mlp_loss(params, x_BD, n_active):
    h_BD = suffix_scan(lambda h, w_DD: h + jnp.tanh(h @ w_DD), x_BD + params["emb"], params["w"], n_active)
    return jnp.mean(h_BD * h_BD)


def _mlp(B=16, D_=32):
    rng = np.random.default_rng(0)
    params = {"emb": jnp.zeros((D_,)), "w": jnp.asarray(rng.standard_normal((L, D_, D_)) / np.sqrt(D_), jnp.float32)}
    return params, jnp.asarray(rng.standard_normal((B, D_)), jnp.float32)


def test_suffix_scan_keeps_the_forward_and_the_suffix_gradient():
    params, x_BD = _mlp()
    loss_and_grad = jax.jit(jax.value_and_grad(_mlp_loss), static_argnums=2)
    ref_loss, ref_grad = loss_and_grad(params, x_BD, L)
    for k in (1, 5):
        loss, grad = loss_and_grad(params, x_BD, k)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        assert not np.any(grad["w"][: L - k]) and not np.any(grad["emb"])
        np.testing.assert_allclose(grad["w"][L - k:], ref_grad["w"][L - k:], rtol=1e-5, atol=1e-7)


def test_suffix_step_flops_fall_with_depth_and_match_the_analytic_count():
    """Residual stack h <- h + tanh(h @ W_l), L=8, one [B,D]x[D,D] matmul per block = 1 unit = 2*B*D*D FLOPs.

    Step = value_and_grad + freeze_prefix_rows(adamw).update + apply. With k active blocks (k < L):
    forward 1 unit for every block (L), backward 2 units per active block (activation-grad + weight-grad, 2k),
    minus the activation-grad of the first active block whose input is stop_gradient'ed (-1): L + 2k - 1 units.
    With k = L the stack's input carries the trainable embedding, so block 0 needs its activation-grad: 3L units.
    The optimizer and loss add no matmuls.
    """
    params, x_BD = _mlp()
    B, D_ = x_BD.shape
    unit = 2 * B * D_ * D_
    flops, matmul = [], []
    for k in range(L, 0, -1):
        tx = freeze_prefix_rows(_adamw(), suffix_labels(params, L, k, block_axis_path=("w",),
                                                        below_blocks=(("emb",),)))

        def step(p, s, x, k=k, tx=tx):
            loss, g = jax.value_and_grad(_mlp_loss)(p, x, k)
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss

        record = count_flops(jax.jit(step), params, tx.init(params), x_BD)
        assert record.unknown == ()
        flops.append(record.flops)
        matmul.append(record.matmul_flops)
        expected_units = 3 * L if k == L else L + 2 * k - 1
        assert matmul[-1] == pytest.approx(expected_units * unit, rel=0.01), k
    assert all(a > b for a, b in zip(flops, flops[1:])), flops
    assert all(a > b for a, b in zip(matmul, matmul[1:])), matmul
