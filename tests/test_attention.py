"""mgr.methods.attention and the attention-backends bench: every kernel that runs here matches an independent
numpy reference (outputs and dq/dk/dv, fp32), chunked is causal and O(T) in memory, FLOPs formulas agree with
mgr.flops, unavailable kernels say why, and the bench's rows, recommendation and bad-input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from demos.attention_backends import GPU_PRESET, Config
from mgr.cli import main
from mgr.errors import UserError
from mgr.flops import attention_flops, count_flops
from mgr.methods import attention as A
from tests.conftest import one_error_line, read_json

RUNS_HERE = ("naive", "xla", "chunked")
# fp32 tolerances (max abs error, inputs ~N(0, 1)): the kernels differ from the reference only by summation order.
OUT_TOL, GRAD_TOL = 2e-5, 1e-4
# (T, causal, window, G, block): odd T not divisible by the block, T=1, non-causal, GQA and MHA, windows
CASES = [(37, True, None, 2, 16), (1, True, None, 2, 16), (40, False, None, 4, 16), (50, True, 7, 1, 8)]


def inputs(T, G, *, B=2, H=4, K=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    dims = [(B, T, H, K), (B, T, G, K), (B, T, G, K), (B, T, H, K)]
    return [jax.random.normal(k, d, jnp.float32) for k, d in zip(keys, dims)]


def numpy_attention(q, k, v, causal, window):
    """Independent reference: K/V heads repeated, float64, explicit mask."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    R = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, R, axis=2), np.repeat(v, R, axis=2)
    s = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    t, j = np.arange(q.shape[1])[:, None], np.arange(k.shape[1])[None, :]
    ok = np.ones_like(s[0, 0], bool) & ((j <= t) if causal else True) & ((j > t - window) if window else True)
    s = np.where(ok, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bshk->bthk", p / p.sum(-1, keepdims=True), v)


def kernel(name, causal, window, block=A.DEFAULT_BLOCK):
    kw = {"block": block} if name == "chunked" else {}
    return lambda q, k, v: A.KERNELS[name](q, k, v, causal=causal, window=window, **kw)


def value_and_grads(f, q, k, v, do):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v) * do), argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("T, causal, window, G, block", CASES)
def test_naive_matches_numpy(T, causal, window, G, block):
    q, k, v, _ = inputs(T, G)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(kernel("naive", causal, window))(q, k, v)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, causal, window), atol=OUT_TOL)


@pytest.mark.parametrize("name", ["xla", "chunked"])
@pytest.mark.parametrize("T, causal, window, G, block", CASES)
def test_kernels_match_naive_outputs_and_gradients(name, T, causal, window, G, block):
    q, k, v, do = inputs(T, G)
    f = kernel(name, causal, window, block)
    with jax.default_matmul_precision("highest"):
        want_out = jax.jit(kernel("naive", causal, window))(q, k, v)
        _, want = value_and_grads(kernel("naive", causal, window), q, k, v, do)
        out = jax.jit(f)(q, k, v)
        _, got = value_and_grads(f, q, k, v, do)
    np.testing.assert_allclose(out, want_out, atol=OUT_TOL)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=GRAD_TOL)


def test_chunked_is_causal():
    """Changing the queries, keys and values from position t0 on changes no output before t0, within and across
    blocks (block 8, t0 = 13)."""
    q, k, v, _ = inputs(29, 2)
    q2, k2, v2 = (a.at[:, 13:].add(5.0) for a in (q, k, v))
    f = jax.jit(kernel("chunked", True, None, block=8))
    before, after = f(q, k, v), f(q2, k2, v2)
    np.testing.assert_array_equal(before[:, :13], after[:, :13])
    assert float(jnp.abs(before[:, 13:] - after[:, 13:]).min()) >= 0 and not np.allclose(before[:, 13:], after[:, 13:])


def test_chunked_memory_grows_linearly_not_quadratically():
    """XLA's compiled temp memory of fwd+bwd from T=128 to T=512 (4x): naive stores T x T scores (~16x),
    chunked keeps only O(T) accumulators and one block of scores (~4x)."""
    def temp(name, T):
        q, k, v, do = inputs(T, 1, B=1, H=2, K=16)
        f = kernel(name, True, None, block=32)
        fn = jax.jit(jax.value_and_grad(lambda q, k, v, do: jnp.sum(f(q, k, v) * do), argnums=(0, 1, 2)))
        return fn.lower(q, k, v, do).compile().memory_analysis().temp_size_in_bytes
    naive_ratio, chunked_ratio = temp("naive", 512) / temp("naive", 128), temp("chunked", 512) / temp("chunked", 128)
    assert naive_ratio > 10, naive_ratio
    assert chunked_ratio < 6, chunked_ratio


def test_block_schedule_skips_blocks_above_the_diagonal_and_outside_the_window():
    assert len(A.block_schedule(512, 512, 128, causal=False, window=None)[2]) == 16
    assert len(A.block_schedule(512, 512, 128, causal=True, window=None)[2]) == 10  # 4 + 3 + 2 + 1
    # window 128: block i sees blocks i-1 and i (block 0 only itself)
    assert len(A.block_schedule(512, 512, 128, causal=True, window=128)[2]) == 7
    assert len(A.block_schedule(512, 512, 128, causal=True, window=1)[2]) == 4
    bq, bk, pairs = A.block_schedule(37, 37, 16, causal=True, window=None)
    assert (bq, bk, len(pairs)) == (16, 16, 6)  # 3 blocks (the last one padded): 1 + 2 + 3
    assert A.block_schedule(1, 1, 128, causal=True, window=None)[:2] == (1, 1)


@pytest.mark.parametrize("name, causal, window", [("chunked", True, None), ("chunked", False, None),
                                                  ("chunked", True, 24), ("naive", True, None), ("xla", True, 24)])
def test_executed_flops_formula_matches_the_estimator(name, causal, window):
    B, T, H, G, K = 2, 64, 4, 2, 8
    q, k, v, do = inputs(T, G, B=B, H=H, K=K)
    f = kernel(name, causal, window, block=16)
    fwd = count_flops(f, q, k, v).matmul_flops
    loss = jax.value_and_grad(lambda q, k, v, do: jnp.sum(f(q, k, v) * do), argnums=(0, 1, 2))
    both = count_flops(loss, q, k, v, do).matmul_flops
    assert fwd == A.executed_flops(name, B, T, T, H, K, causal=causal, window=window, block=16)
    assert both == A.executed_flops(name, B, T, T, H, K, causal=causal, window=window, grad=True, block=16)


def test_flops_conventions():
    B, T, H, K = 2, 64, 4, 8
    assert A.palm_flops(B, T, T, H, K) == attention_flops(B, T, H, K)
    assert A.palm_flops(B, T, T, H, K, grad=True) == 3 * attention_flops(B, T, H, K)
    assert A.palm_flops(B, T, T, H, K, window=16) == attention_flops(B, T, H, K) / 4
    dense = A.executed_flops("naive", B, T, T, H, K, causal=True)
    assert dense == attention_flops(B, T, H, K)  # a masked dense kernel executes the full square
    causal = A.executed_flops("chunked", B, T, T, H, K, causal=True, block=16)
    assert causal == dense * 10 / 16  # 4 blocks: 1 + 2 + 3 + 4 of 16
    assert A.executed_flops("chunked", B, T, T, H, K, causal=True, window=16, block=16) == dense * 7 / 16
    # fused kernels: analytic at 128-blocks, recomputing backward
    assert A.executed_flops("cudnn", 1, 512, 512, 1, 64, causal=True, grad=True) == 3.5 * 10 * 4 * 128 * 128 * 64
    assert A.flops_source("cudnn") == "analytic (custom call)" and A.flops_source("chunked") == "mgr.flops"


def test_unavailable_kernels_say_why():
    shape = dict(T=256, S=256, H=4, G=2, K=64, causal=True, window=None)
    for name in RUNS_HERE:
        assert A.unavailable_reason(name, dtype="float32", **shape) is None
    for name in A.FUSED:
        assert "needs a CUDA GPU (backend is cpu)" == A.unavailable_reason(name, dtype="bfloat16", **shape)
    gpu = dict(shape, backend="gpu")
    assert "bfloat16 or float16" in A.unavailable_reason("cudnn", dtype="float32", **gpu)
    assert A.unavailable_reason("cudnn", dtype="bfloat16", **gpu) is None
    assert "T=200 is not a multiple of 128" in A.unavailable_reason(
        "pallas-triton", dtype="bfloat16", **dict(gpu, T=200, S=200))
    assert "no sliding window" in A.unavailable_reason("pallas-triton", dtype="bfloat16", **dict(gpu, window=64))
    assert "window needs causal" in A.unavailable_reason("naive", dtype="float32", **dict(shape, causal=False,
                                                                                        window=8))
    assert "multiple of n_kv_head" in A.unavailable_reason("xla", dtype="float32", **dict(shape, G=3))
    assert "unknown implementation" in A.unavailable_reason("flash", dtype="float32", **shape)


@pytest.mark.slow
def test_pallas_triton_wrapper_in_interpret_mode():
    """The GPU wrapper (GQA repeat, sm_scale, argument order) checked through Pallas' interpreter on any backend."""
    q, k, v, do = inputs(32, 1, B=1, H=2, K=16)
    f = lambda q, k, v: A.pallas_triton(q, k, v, causal=True, interpret=True)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(f(q, k, v), A.naive(q, k, v), atol=OUT_TOL)
        got, want = value_and_grads(f, q, k, v, do)[1], value_and_grads(kernel("naive", True, None), q, k, v, do)[1]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=GRAD_TOL)


# --- the bench through `mgr run` -----------------------------------------------------------------------------------

TINY = ["--seq-lens", "24", "--heads", "2", "--kv-heads", "1", "--head-dims", "8", "--block", "8", "--iters", "2",
        "--warmup", "0"]


def test_bench_rows_recommendation_and_artifacts(tmp_path):
    code = main(["run", "attention-backends", "--artifacts-dir", str(tmp_path), "--run-id", "t", *TINY])
    assert code == 0
    run_dir = tmp_path / "benches" / "attention_backends" / "t"
    res = read_json(run_dir / "summary.json")["results"]
    rows = res["rows"]
    assert len(rows) == 2 * len(A.IMPLEMENTATIONS)  # pass x implementation
    for r in rows:
        if r["implementation"] in A.FUSED:
            assert not r["available"] and r["reason"] == "needs a CUDA GPU (backend is cpu)"
            continue
        assert r["available"] and r["n"] == 2 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["rel_err"] < res["tolerance"] == 1e-4
        assert r["executed_flops"] == r["mgr_flops_matmul"] == r["executed_flops_analytic"]
        assert r["tflops_palm"] == pytest.approx(r["palm_flops"] / r["median_ms"] / 1e9)
        assert r["temp_mib"] is not None and r["temp_mib"] >= 0
        if r["implementation"] == "chunked" and r["causal"]:  # 3 blocks of 8: 6 of 9 block pairs executed
            assert r["executed_flops"] == pytest.approx(r["palm_flops"] * 6 / 9 * (3.5 / 3 if r["pass"] == "fwd+bwd" else 1))
    recs = res["recommendations"]
    assert {(r["T"], r["causal"], r["pass"]) for r in recs} == {(24, True, "fwd"), (24, True, "fwd+bwd")}
    assert all(r["implementation"] in RUNS_HERE for r in recs)
    assert (run_dir / "plots" / "tflops_vs_T.png").read_bytes()[:4] == b"\x89PNG"
    md = (run_dir / "run.md").read_text()
    assert "attention fwd+bwd: speed" in md and "rows that could not run" in md
    assert "recommended at T=24 K=8 causal: fwd " in md


def test_gpu_preset_fills_the_grid_but_explicit_flags_win():
    cfg = Config(preset="gpu")
    assert cfg.seq_lens == GPU_PRESET["seq_lens"] and cfg.dtype == "bfloat16" and cfg.head_dims == (64, 128)
    assert Config(preset="gpu", seq_lens=(64,), dtype="float32").seq_lens == (64,)
    assert Config(preset="gpu", seq_lens=(64,), dtype="float16").dtype == "float16"
    with pytest.raises(UserError, match="--seq-lens"):
        Config(seq_lens=())


@pytest.mark.parametrize("flags, says", [
    (["--seq-lens", "0"], "--seq-lens must be non-empty and >= 1"),
    (["--heads", "3", "--kv-heads", "2"], "--heads a multiple of --kv-heads"),
    (["--masks", "diagonal"], "--masks must be a non-empty subset of causal, full"),
    (["--implementations", "flash"], "--implementations must be a non-empty subset"),
    (["--window", "0"], "--window needs causal masks only and >= 1"),
    (["--window", "4", "--masks", "causal,full"], "--window needs causal masks only"),
    (["--iters", "0"], "need --block >= 1, --iters >= 1"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
])
def test_bad_grid_values_are_one_error_line(tmp_path, capsys, flags, says):
    assert main(["run", "attention-backends", "--artifacts-dir", str(tmp_path), "--run-id", "bad", *flags]) == 2
    assert says in one_error_line(capsys)
    assert not (tmp_path / "benches").exists()  # refused before a run directory was made
