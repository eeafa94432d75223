"""mgr.flops against analytic counts: scans, nesting, remat, custom calls, convolutions and the formula helpers,
and the programs the loop-corrected jaxpr estimator (v1) got wrong (dead code, unroll remainders, conds, sharding)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mgr import flops
from mgr.flops import compile_and_count, count_flops, price_hlo

B, D, L = 4, 32, 8
LAYER = 2 * B * D * D  # one (B x D) @ (D x D) matmul
U = 2 * 8 * 64 * 64  # the unit: one (8 x 64) @ (64 x 64) matmul
DATA = Path(__file__).parent / "data"


def executes(r, matmul):
    """Exactly `matmul` matmul FLOPs, and the rest of `flops` is loop bookkeeping (counter adds and compares)."""
    assert isinstance(r.flops, int) and isinstance(r.matmul_flops, int)
    assert r.matmul_flops == matmul
    assert matmul <= r.flops <= matmul * 1.01 + 64, (r.flops, matmul)


@pytest.fixture(scope="module")
def stack():
    x_BD = jnp.linspace(-1.0, 1.0, B * D).reshape(B, D)
    w_LDD = 0.01 * jnp.ones((L, D, D))
    return w_LDD, x_BD


@pytest.fixture(scope="module")
def unit():
    x = jnp.linspace(-1.0, 1.0, 8 * 64).reshape(8, 64)
    return x, 0.01 * jnp.ones((8, 64, 64)), 0.01 * jnp.ones((4, 64, 64)), 0.01 * jnp.ones((7, 64, 64))


def scanned(w_LDD, x_BD, **kw):
    h_BD, _ = jax.lax.scan(lambda h, w: (h @ w, None), x_BD, w_LDD, **kw)
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


# --- the common cases ------------------------------------------------------------------------------------------

def test_scanned_forward_prices_every_trip(stack):
    r = count_flops(scanned, *stack)
    executes(r, L * LAYER)
    # XLA prices the while body once: the raw figure sees one layer of eight.
    assert LAYER <= r.xla_raw < 2 * LAYER
    assert r.unknown == ()
    assert r.loops == ({"computation": r.loops[0]["computation"], "while": r.loops[0]["while"], "trip_count": L,
                        "runs": 1},)


def test_scanned_grad_is_three_forwards(stack):
    executes(count_flops(grad_all(scanned), *stack), 3 * L * LAYER)


def test_unrolled_and_scanned_agree(stack):
    w_LDD, x_BD = stack
    for transform in (lambda f: f, grad_all):
        s = count_flops(transform(scanned), w_LDD, x_BD)
        u = count_flops(transform(unrolled), as_list(w_LDD), x_BD)
        assert s.matmul_flops == u.matmul_flops
        assert u.flops == u.xla_raw  # no loop: our pricing is XLA's, to the FLOP


@pytest.mark.parametrize("unroll", [True, 2, 3])
def test_scan_unroll_not_double_counted(stack, unroll):
    executes(count_flops(lambda w, x: scanned(w, x, unroll=unroll), *stack), L * LAYER)


def test_nested_scans_count_every_body(stack):
    def nested(w_LDD, x_BD):
        def outer(h, _):
            return scanned(w_LDD, h), None
        h_BD, _ = jax.lax.scan(outer, x_BD, None, length=3)
        return h_BD
    r = count_flops(nested, *stack)
    executes(r, 3 * L * LAYER)
    assert r.xla_raw < r.flops / 20  # XLA alone sees one inner body, not 24
    assert sorted((x["trip_count"], x["runs"]) for x in r.loops) == [(3, 1), (L, 3)]


def test_remat_recompute_is_counted(stack):
    def body(h, w):
        return jnp.tanh(h @ w), None  # tanh' needs its output, so the backward recomputes the whole body

    def plain(w_LDD, x_BD):
        return jax.lax.scan(body, x_BD, w_LDD)[0]

    def remat(w_LDD, x_BD):
        return jax.lax.scan(jax.checkpoint(body), x_BD, w_LDD)[0]

    g_plain = count_flops(grad_all(plain), *stack)
    g_remat = count_flops(grad_all(remat), *stack)
    assert g_remat.matmul_flops - g_plain.matmul_flops == L * LAYER
    assert g_remat.transcendentals - g_plain.transcendentals == L * B * D


def test_remat_policy_saving_dots_recomputes_no_matmul(stack):
    def body(h, w):
        return jnp.tanh(h @ w), None

    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    saved = count_flops(grad_all(lambda w, x: jax.lax.scan(jax.checkpoint(body, policy=policy), x, w)[0]), *stack)
    assert saved.matmul_flops == 3 * L * LAYER


def test_scan_in_vmap_in_grad(stack):
    w_LDD, x_BD = stack
    xs_NBD = jnp.stack([x_BD, 2 * x_BD, 3 * x_BD])
    f = jax.grad(lambda w, xs: jnp.sum(jax.vmap(lambda x: scanned(w, x))(xs) ** 2), argnums=(0, 1))
    executes(count_flops(f, w_LDD, xs_NBD), 3 * 3 * L * LAYER)


def test_custom_vjp_prices_the_rule_that_runs():
    @jax.custom_vjp
    def f(a, b):
        return a @ b

    def fwd(a, b):
        return a @ b, (a, b)

    def bwd(res, g):
        a, b = res
        return (g @ b.T) * 2.0, a.T @ g @ jnp.eye(b.shape[1])  # one extra (n x n) @ (n x n) on purpose
    f.defvjp(fwd, bwd)
    a = jnp.linspace(0, 1, 16 * 8).reshape(16, 8)
    b = jnp.linspace(0, 1, 8 * 12).reshape(8, 12)
    r = count_flops(jax.grad(lambda a, b: jnp.sum(jnp.sin(f(a, b))), argnums=(0, 1)), a, b)
    assert r.matmul_flops == 3 * 2 * 16 * 8 * 12 + 2 * 8 * 12 * 12


@pytest.mark.parametrize("dtype, preferred", [(jnp.bfloat16, None), (jnp.int8, jnp.int32)])
def test_low_precision_dots(dtype, preferred):
    a = jnp.ones((16, 32), dtype)
    b = jnp.ones((32, 8), dtype)
    r = count_flops(lambda a, b: jax.lax.dot(a, b, preferred_element_type=preferred), a, b)
    assert r.matmul_flops == 2 * 16 * 32 * 8
    assert r.flops == r.xla_raw  # plus any converts the backend inserts (CPU computes bf16 dots in f32)


def test_static_argnums_and_kwargs(stack):
    jitted = jax.jit(lambda w, x, n: scanned(w, x) * n, static_argnums=2)
    assert count_flops(jitted, *stack, 3).matmul_flops == L * LAYER
    assert count_flops(scanned, w_LDD=stack[0], x_BD=stack[1]).matmul_flops == L * LAYER


def test_plain_jitted_and_value_and_grad(stack):
    assert count_flops(scanned, *stack) == count_flops(jax.jit(scanned), *stack)
    vg = count_flops(jax.value_and_grad(sq_loss(scanned), argnums=(0, 1)), *stack)
    executes(vg, 3 * L * LAYER)


def test_dynamic_while_loop_is_flagged(stack):
    w_LDD, x_BD = stack

    def f(x_BD, n):
        return jax.lax.fori_loop(0, n, lambda i, h: h @ w_LDD[0], x_BD)
    r = count_flops(f, x_BD, 3)
    assert any(u.startswith("while:") and "no known trip count" in u for u in r.unknown), r.unknown
    assert r.matmul_flops == LAYER  # body once, and said so
    assert r.loops[0]["trip_count"] is None
    executes(count_flops(lambda x: jax.lax.fori_loop(0, 5, lambda i, h: h @ w_LDD[0], x), x_BD), 5 * LAYER)


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


@pytest.mark.parametrize("layout, groups, stride, padding", [
    (("NCHW", "OIHW", "NCHW"), 1, (1, 1), "VALID"),
    (("NCHW", "OIHW", "NCHW"), 2, (1, 1), "VALID"),
    (("NHWC", "HWIO", "NHWC"), 1, (2, 2), "SAME"),
])
def test_conv_flops(layout, groups, stride, padding):
    n, c, hw, o, k = 2, 4, 10, 6, 3
    lhs_spec, rhs_spec, _ = layout
    x = jnp.ones((n, c, hw, hw) if lhs_spec == "NCHW" else (n, hw, hw, c))
    w = jnp.ones((o, c // groups, k, k) if rhs_spec == "OIHW" else (k, k, c // groups, o))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=layout,
                                            feature_group_count=groups)
    r = count_flops(conv, x, w)
    # With all-ones operands each output element is its number of real (tap, input channel) pairs.
    assert r.matmul_flops == r.flops == 2 * int(conv(x, w).sum())
    if padding == "VALID":
        assert r.matmul_flops == 2 * jax.eval_shape(conv, x, w).size * (c // groups) * k * k


# --- what v1 got wrong: each failed on the jaxpr-corrected estimator --------------------------------------------

def test_dead_scan_is_not_priced(unit):
    x, a8, b4, _ = unit
    executes(count_flops(lambda a, b, x: (scanned(a, x), scanned(b, x))[1], a8, b4, x), 4 * U)  # v1: 11U


def test_unused_scan_outputs_are_not_priced(unit):
    x, a8, _, _ = unit
    executes(count_flops(lambda a, x: jax.lax.scan(lambda h, w: (h @ w, h @ w @ w), x, a)[0], a8, x), 8 * U)


def test_unroll_remainder_is_priced_once(unit):
    x, _, _, c7 = unit
    executes(count_flops(lambda c, x: scanned(c, x, unroll=2), c7, x), 7 * U)  # v1: 8U


def test_unroll_zero_is_fully_unrolled(unit):
    x, a8, b4, _ = unit
    executes(count_flops(lambda a, b, x: scanned(a, x, unroll=0) + scanned(b, x), a8, b4, x), 12 * U)  # v1: 19U


def test_cond_prices_one_branch_with_its_loops(unit):
    x, a8, _, _ = unit

    def f(p, a, x):
        six = lambda: x @ a[0] @ a[1] @ a[2] @ a[3] @ a[4] @ a[5]
        return jax.lax.cond(p, six, lambda: scanned(a, x))
    executes(count_flops(f, True, a8, x), 8 * U)  # v1: 13U, more than either branch


def test_static_cond_and_platform_dependent_price_the_branch_that_runs(unit):
    x, a8, _, _ = unit
    dear = lambda: scanned(a8, x)
    executes(count_flops(lambda x: jax.lax.cond(False, dear, lambda: x @ a8[0]), x), U)
    executes(count_flops(lambda x: jax.lax.platform_dependent(x, cpu=lambda x: x @ a8[0],
                                                              default=lambda x: scanned(a8, x)), x), U)


def test_linear_solve_prices_no_never_run_matvec():
    r = count_flops(jnp.linalg.solve, 2.0 * jnp.eye(64), jnp.ones((64, 64)))
    assert r.matmul_flops == 0  # v1: 131072 from custom_linear_solve's matvec jaxprs
    assert any("lapack" in u for u in r.unknown), r.unknown


def test_nnx_transforms_and_module_arguments():
    model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 4))
    loss = lambda m, x: jnp.sum(m(x) ** 2)
    forward, backward = 2 * 2 * 4 * 8, 2 * 2 * 4 * 8  # dW only: x is not differentiated
    assert count_flops(loss, model, x).matmul_flops == forward
    assert count_flops(nnx.jit(loss), model, x).matmul_flops == forward  # v1: AttributeError
    assert count_flops(nnx.grad(loss), model, x).matmul_flops == forward + backward
    assert count_flops(nnx.value_and_grad(loss), model, x).matmul_flops == forward + backward
    assert count_flops(nnx.jit(nnx.grad(loss)), model, x).matmul_flops == forward + backward


def test_counts_are_exact_integers():
    a, b = jnp.ones((257, 255)), jnp.ones((255, 259))
    r = count_flops(lambda a, b: a @ b, a, b)
    assert r.flops == r.matmul_flops == 2 * 257 * 255 * 259  # XLA's float32 figure is 2 short
    assert type(r.flops) is int and type(r.flops_per_device) is int and type(r.bytes_accessed) is int


def test_no_overflow_at_two_to_the_64():
    a = jax.ShapeDtypeStruct((2**20, 2**22), jnp.float32)
    b = jax.ShapeDtypeStruct((2**22, 2**21), jnp.float32)
    r = count_flops(lambda a, b: a @ b, a, b)
    assert r.flops == r.matmul_flops == 2**64  # XLA's int64 count wraps to 0 (v1 reported 0)
    assert json.loads(json.dumps(r.to_dict()))["flops"] == 2**64


def test_hidden_data_dependent_loops_are_flagged():
    r = count_flops(lambda k: jax.random.gamma(k, jnp.ones(8)), jax.random.key(0))
    assert any(u.startswith("while:") for u in r.unknown), r.unknown


def test_debug_print_costs_nothing():
    x = jnp.ones((8, 64))
    r = count_flops(lambda x: (jax.debug.print("{}", x[0, 0]), x @ x.T)[1], x)
    assert r.unknown == ()
    assert r.matmul_flops == 2 * 8 * 8 * 64


@pytest.mark.parametrize("stride, padding, dilation", [((1, 1), "SAME", (1, 1)), ((2, 2), "SAME", (1, 1)),
                                                       ((1, 1), "VALID", (2, 2))])
def test_backward_convolution_skips_padding_and_dilation_zeros(stride, padding, dilation):
    x = jnp.ones((2, 9, 9, 3))
    w = jnp.ones((3, 3, 3, 4))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, stride, padding, rhs_dilation=dilation,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    real = 2 * int(conv(x, w).sum())  # real multiply-adds of the forward, from all-ones operands
    # Each real (output, tap) pair is one multiply-add in the forward, in dX and in dW: nothing else is work.
    r = count_flops(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1)), x, w)
    assert r.matmul_flops == 3 * real  # v1: 1.15x and 2.17x too much


def test_complex_dot_is_eight_flops_per_multiply_add():
    a = jnp.ones((8, 64), jnp.complex64)
    assert count_flops(lambda a: a @ a.T, a).matmul_flops == 8 * 8 * 8 * 64


def test_constants_xla_folds_are_not_priced():
    c = jnp.linspace(0, 1, 64 * 64).reshape(64, 64)
    assert count_flops(lambda x: x @ (c @ c), jnp.ones((8, 64))).matmul_flops == U  # c @ c folds at compile time


def test_one_compile_and_a_cache(stack, monkeypatch):
    calls = []
    original = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    fn = lambda w, x: scanned(w, x) * 3.0  # a program no other test compiled
    record, exe = compile_and_count(fn, *stack)
    assert len(calls) == 1  # v1 compiled every scan body a second time
    assert record.compile_s > 0
    again, exe2 = compile_and_count(fn, *stack)
    assert len(calls) == 1 and exe2 is exe and again == record


_SHARDED = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from mgr.flops import count_flops
mesh = jax.make_mesh((2,), ("d",))
x = jax.device_put(jnp.ones((16, 64)), NamedSharding(mesh, P("d")))
w = jnp.ones((8, 64, 64))
scan = lambda w, x: jax.lax.scan(lambda h, w: (h @ w, None), x, w)[0]
sm = jax.shard_map(scan, mesh=mesh, in_specs=(P(), P("d")), out_specs=P("d"))
print(json.dumps([count_flops(f, w, x).to_dict() for f in (scan, sm)]))
"""


def test_sharded_programs_report_per_device_and_global():
    out = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    for r in json.loads(out.stdout.splitlines()[-1]):  # jit with a sharded batch, then shard_map (v1 crashed)
        assert r["devices"] == 2
        assert r["matmul_flops"] == 8 * 2 * 16 * 64 * 64  # global: both halves of the batch
        assert r["flops"] == 2 * r["flops_per_device"]
        assert r["flops_per_device"] - r["matmul_flops"] // 2 < 64  # v1: 15U for 8U, units mixed


# --- GPU: cuBLAS / cuDNN custom calls, from a saved XLA GPU module ----------------------------------------------

def test_gpu_custom_calls_priced_from_operand_shapes():
    r = price_hlo((DATA / "gpu_step.hlo").read_text())
    gemm = 2 * 128 * 256 * 64  # __cublas$gemm f32[128,64] @ f32[64,256]
    lt = 2 * 4 * 128 * 32 * 64  # __cublas$lt$matmul, batch 4
    b, n, t, s, d = 2, 8, 256, 256, 64
    fmha_fwd = 2 * b * n * t * s * (d + d)  # QK^T and PV, causal counted at full T x S
    fmha_bwd = 2 * b * n * t * s * (3 * d + 2 * d)  # S recomputed, dV, dP, dQ, dK
    loop = 6 * 2 * 256**3  # a Triton GEMM fusion in a while body with known_trip_count 6
    conv = 2 * 2 * 3 * 16 * (8 + 7 + 7) ** 2  # 3x3 SAME on 8x8: 22 real taps per spatial dim
    assert r.matmul_flops == gemm + lt + fmha_fwd + fmha_bwd + loop + conv
    assert r.flops == r.matmul_flops + 6 + 7  # the loop's counter adds and compares
    assert r.unknown == ()
    targets = {a.split()[0] for a in r.analytic}
    assert targets == {"custom_call:__cublas$gemm", "custom_call:__cublas$lt$matmul", "custom_call:__cudnn$fmhaSoftmax",
                       "custom_call:__cudnn$fmhaSoftmaxBackward", "custom_call:__cudnn$convForward"}
    assert r.loops == ({"computation": "body", "while": "while.1", "trip_count": 6, "runs": 1},)


def test_long_tuples_keep_every_element():
    # XLA prints /*index=5*/ inside tuples of six or more; the operand after it is still a real operand.
    text = (DATA / "gpu_step.hlo").read_text().replace("dot(bf16[256,256]{1,0} %parameter_0",
                                                       "dot(bf16[256,256]{1,0} /*index=0*/%parameter_0")
    text = text.replace("(s32[], bf16[256,256]{1,0}, bf16[6,256,256]{2,1,0})",
                        "(s32[], bf16[256,256]{1,0}, /*index=2*/bf16[6,256,256]{2,1,0})")
    assert price_hlo(text) == price_hlo((DATA / "gpu_step.hlo").read_text())


def test_unpriced_custom_call_and_opcode_are_listed():
    text = (DATA / "gpu_step.hlo").read_text()
    text = text.replace('"__cudnn$convForward"', '"__gpu$xla.gpu.triton"').replace(" add(", " mulhi(")
    r = price_hlo(text)
    assert "custom_call:__gpu$xla.gpu.triton" in r.unknown
    assert "opcode:mulhi (not priced)" in r.unknown


# --- the record and the analytic helpers --------------------------------------------------------------------------

def test_record_to_dict():
    r = flops.FlopsRecord(1, 2, 3, 4, 5, ("custom_call:x",), devices=1, flops_per_device=1,
                          loops=({"computation": "b", "while": "w", "trip_count": 2, "runs": 1},), compile_s=0.5)
    assert r.to_dict() == {"flops": 1, "xla_raw": 2, "matmul_flops": 3, "transcendentals": 4, "bytes_accessed": 5,
                           "unknown": ["custom_call:x"], "devices": 1, "flops_per_device": 1,
                           "loops": [{"computation": "b", "while": "w", "trip_count": 2, "runs": 1}],
                           "analytic": [], "compile_s": 0.5}


def test_elementwise_reduce_and_transcendentals_match_xla():
    x = jnp.linspace(-1, 1, 16 * 32).reshape(16, 32)
    for f in (lambda x: jax.nn.softmax(x, axis=-1), jnp.cumsum, jnp.sort,
              jax.grad(lambda x: jnp.sum((x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1)))):
        r, compiled = compile_and_count(f, x)
        xla = compiled.cost_analysis()
        xla = xla[0] if isinstance(xla, list) else xla
        assert r.flops == r.xla_raw == int(xla["flops"])
        assert r.transcendentals == int(xla.get("transcendentals", 0))


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
