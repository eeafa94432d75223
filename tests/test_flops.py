"""mgr.flops against analytic counts: scans, nesting, remat, custom calls, convolutions and the formula helpers."""

import jax
import jax.numpy as jnp
import pytest

from mgr import flops
from mgr.flops import count_flops

B, D, L = 4, 32, 8
LAYER = 2 * B * D * D  # one (B x D) @ (D x D) matmul


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def stack():
    x_BD = jnp.linspace(-1.0, 1.0, B * D).reshape(B, D)
    w_LDD = 0.01 * jnp.ones((L, D, D))
    return w_LDD, x_BD


def scanned(w_LDD, x_BD):
    h_BD, _ = jax.lax.scan(lambda h, w: (h @ w, None), x_BD, w_LDD)
    return h_BD


def unrolled(w_list, x_BD):
    h_BD = x_BD
    for w_DD in w_list:
        h_BD = h_BD @ w_DD
    return h_BD


def sq_loss(f):
    # A nonlinear loss keeps the last layer's forward alive in the gradient (a linear one lets XLA drop it).
    return lambda w, x: jnp.sum(f(w, x) ** 2)


def grad_all(f):
    # Differentiating the input too makes every layer do dW and dX: backward = exactly 2x forward.
    return jax.grad(sq_loss(f), argnums=(0, 1))


def as_list(w_LDD):
    return tuple(w_LDD[i] for i in range(L))


def test_scanned_forward_is_loop_corrected(stack):
    r = count_flops(scanned, *stack)
    assert r.matmul_flops == L * LAYER
    assert rel(r.flops, L * LAYER) < 0.01
    # XLA prices the while body once: the raw figure sees one layer of eight.
    assert rel(r.xla_raw, LAYER) < 0.01
    assert rel(r.xla_raw, r.flops / L) < 0.01
    assert r.unknown == ()


def test_scanned_grad_is_three_forwards(stack):
    r = count_flops(grad_all(scanned), *stack)
    assert r.matmul_flops == 3 * L * LAYER
    assert rel(r.flops, 3 * L * LAYER) < 0.01
    assert rel(r.xla_raw, 3 * LAYER) < 0.01


def test_unrolled_and_scanned_agree(stack):
    w_LDD, x_BD = stack
    for transform in (lambda f: f, grad_all):
        s = count_flops(transform(scanned), w_LDD, x_BD)
        u = count_flops(transform(unrolled), as_list(w_LDD), x_BD)
        assert s.matmul_flops == u.matmul_flops
        assert rel(s.flops, u.flops) < 0.01
        assert u.flops == u.xla_raw  # nothing to correct without a loop


@pytest.mark.parametrize("unroll", [True, 2])
def test_scan_unroll_not_double_counted(stack, unroll):
    def f(w_LDD, x_BD):
        h_BD, _ = jax.lax.scan(lambda h, w: (h @ w, None), x_BD, w_LDD, unroll=unroll)
        return h_BD
    r = count_flops(f, *stack)
    assert r.matmul_flops == L * LAYER
    assert rel(r.flops, L * LAYER) < 0.01


def test_nested_scans_count_every_body(stack):
    def nested(w_LDD, x_BD):
        def outer(h, _):
            return scanned(w_LDD, h), None
        h_BD, _ = jax.lax.scan(outer, x_BD, None, length=3)
        return h_BD
    r = count_flops(nested, *stack)
    assert r.matmul_flops == 3 * L * LAYER
    assert rel(r.flops, 3 * L * LAYER) < 0.01
    assert r.xla_raw < r.flops / 20  # XLA alone sees one inner body, not 24


def test_remat_recompute_is_counted(stack):
    def body(h, w):
        return jnp.tanh(h @ w), None  # tanh' needs its output, so the backward recomputes the whole body

    def plain(w_LDD, x_BD):
        return jax.lax.scan(body, x_BD, w_LDD)[0]

    def remat(w_LDD, x_BD):
        return jax.lax.scan(jax.checkpoint(body), x_BD, w_LDD)[0]

    forward = count_flops(plain, *stack)
    g_plain = count_flops(grad_all(plain), *stack)
    g_remat = count_flops(grad_all(remat), *stack)
    assert g_remat.matmul_flops - g_plain.matmul_flops == L * LAYER
    assert rel(g_remat.flops - g_plain.flops, forward.flops) < 0.01
    assert g_remat.transcendentals - g_plain.transcendentals == forward.transcendentals == L * B * D


def test_custom_calls_are_listed_not_priced():
    a_NN = 2.0 * jnp.eye(8)
    chol = count_flops(jnp.linalg.cholesky, a_NN)
    assert any(u.startswith("custom_call:") for u in chol.unknown), chol.unknown
    callback = count_flops(
        lambda a: jax.pure_callback(lambda v: v, jax.ShapeDtypeStruct(a.shape, a.dtype), a), a_NN)
    assert any(u.startswith("custom_call:") for u in callback.unknown), callback.unknown
    plain = count_flops(lambda a, b: a @ b, a_NN, a_NN)
    assert plain.unknown == ()
    assert plain.flops == plain.matmul_flops == 2 * 8**3


def test_dynamic_while_loop_is_flagged(stack):
    w_LDD, x_BD = stack

    def f(x_BD, n):
        return jax.lax.fori_loop(0, n, lambda i, h: h @ w_LDD[0], x_BD)
    r = count_flops(f, x_BD, 3)
    assert any(u.startswith("while_loop") for u in r.unknown)
    assert r.matmul_flops == LAYER  # body once, and said so


def test_plain_jitted_and_value_and_grad(stack):
    plain = count_flops(scanned, *stack)
    jitted = count_flops(jax.jit(scanned), *stack)
    assert plain == jitted
    vg = count_flops(jax.value_and_grad(sq_loss(scanned), argnums=(0, 1)), *stack)
    assert vg.matmul_flops == 3 * L * LAYER
    assert rel(vg.flops, 3 * L * LAYER) < 0.01
    assert count_flops(scanned, w_LDD=stack[0], x_BD=stack[1]).matmul_flops == L * LAYER  # kwargs pass through


class _FakeCompiled:
    def __init__(self, analysis):
        self.analysis = analysis

    def cost_analysis(self):
        return self.analysis


@pytest.mark.parametrize("analysis, expected", [
    ({"flops": 10.0, "transcendentals": 2.0, "bytes accessed": 5.0}, (10.0, 2.0, 5.0)),
    ([{"flops": 10.0, "bytes accessed": 1.0}, {"flops": 3.0, "transcendentals": 4.0}], (13.0, 4.0, 1.0)),
    ([{"flops": 7.0}, None, {}], (7.0, 0.0, 0.0)),
    (None, (0.0, 0.0, 0.0)),
    ({"flops": -1.0, "transcendentals": -1.0, "bytes accessed": 8.0}, (0.0, 0.0, 8.0)),
])
def test_xla_cost_shapes(analysis, expected):
    c = flops._xla_cost(_FakeCompiled(analysis))
    assert (c.flops, c.transcendentals, c.bytes_accessed) == expected


def test_record_to_dict():
    r = flops.FlopsRecord(1.0, 2.0, 3.0, 4.0, 5.0, ("custom_call:x",))
    assert r.to_dict() == {"flops": 1.0, "xla_raw": 2.0, "matmul_flops": 3.0, "transcendentals": 4.0,
                           "bytes_accessed": 5.0, "unknown": ["custom_call:x"]}


def test_analytic_helpers():
    assert flops.matmul_flops(2, 3, 4) == 48
    assert flops.matmul_flops(2, 3, 4, batch=5) == 240
    assert flops.mlp_flops(10, 4, 8) == 2 * 10 * 4 * 8 * 2
    assert flops.mlp_flops(10, 4, 8, d_out=2) == 2 * 10 * 4 * 8 + 2 * 10 * 8 * 2
    assert flops.attention_flops(2, 8, 3, 4) == 4 * 2 * 8 * 8 * 3 * 4
    assert flops.transformer_train_flops_per_token(1000, 2, 3, 4, 8) == 6 * 1000 + 12 * 2 * 3 * 4 * 8
    assert flops.transformer_train_flops_per_token(1000, 0, 3, 4, 8) == 6000


def test_analytic_helpers_match_the_estimator():
    b, t, h, dh, f = 2, 8, 3, 4, 24
    q_BTHD = jnp.ones((b, t, h, dh))

    def attention(q, k, v):
        p_BHTS = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k), axis=-1)
        return jnp.einsum("bhts,bshd->bthd", p_BHTS, v)
    assert count_flops(attention, q_BTHD, q_BTHD, q_BTHD).matmul_flops == flops.attention_flops(b, t, h, dh)

    x_TD, w1_DF, w2_FD = jnp.ones((b * t, h * dh)), jnp.ones((h * dh, f)), jnp.ones((f, h * dh))
    mlp = count_flops(lambda x, a, c: jax.nn.relu(x @ a) @ c, x_TD, w1_DF, w2_FD)
    assert mlp.matmul_flops == flops.mlp_flops(b * t, h * dh, f)


@pytest.mark.parametrize("layout, groups, stride, padding", [
    (("NCHW", "OIHW", "NCHW"), 1, (1, 1), "VALID"),
    (("NCHW", "OIHW", "NCHW"), 2, (1, 1), "VALID"),
    (("NHWC", "HWIO", "NHWC"), 1, (2, 2), "SAME"),
])
def test_conv_flops_from_jaxpr(layout, groups, stride, padding):
    n, c, hw, o, k = 2, 4, 10, 6, 3
    lhs_spec, rhs_spec, _ = layout
    x = jnp.ones((n, c, hw, hw) if lhs_spec == "NCHW" else (n, hw, hw, c))
    w = jnp.ones((o, c // groups, k, k) if rhs_spec == "OIHW" else (k, k, c // groups, o))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=layout,
                                            feature_group_count=groups)
    out = jax.eval_shape(conv, x, w).size
    r = count_flops(conv, x, w)
    assert r.matmul_flops == 2 * out * (c // groups) * k * k
    if padding == "VALID":
        assert r.flops == r.matmul_flops  # XLA agrees when no padded zeros are involved
