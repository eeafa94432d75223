import jax.numpy as jnp
import numpy as np
import pytest

from mgr.methods import approx as A
from mgr import structured_inputs as S
from mgr.errors import UserError

V = pytest.importorskip("mgr.variant_bench", reason="needs mgr.flops, mgr.timing and mgr.results")

D, H = 64, 128
SPEC = S.InputSpec(tokens_train=256, tokens_val=128, tokens=256)


@pytest.fixture(scope="module")
def mlp_comparison():
    prob = S.make_mlp_problem(0, D, H, SPEC)
    p = A.MLP(jnp.asarray(prob.w1_DH), jnp.asarray(prob.w2_HD))
    small, kept = A.prune_mlp(p, 0.5)
    variants = [V.Variant("pruned 50%", A.mlp_apply, small, info={"keep": 0.5}),
                V.Variant("2:4", A.mlp_apply, A.sparsify_2_4(p), nominal_flops=A.nominal_2_4_flops,
                          info={"keep": 1.0})]
    cmp = V.compare(V.Variant("dense", A.mlp_apply, p), variants, prob.x.bench, prob.x.val, iters=3, warmup=1)
    return prob, p, small, cmp


def test_compare_fields_and_derived_figures(mlp_comparison):
    prob, p, small, cmp = mlp_comparison
    rows = cmp.rows()
    assert [r["name"] for r in rows] == ["dense", "pruned 50%", "2:4"]
    n = SPEC.tokens
    dense, pruned, sparse = rows
    assert dense["matmul_flops"] == 2 * n * 2 * D * H
    assert pruned["matmul_flops"] == 2 * n * 2 * D * (H // 2)
    for r in rows:
        for key in ("rel_err", "flops", "flops_ratio", "median_ms", "p10_ms", "p90_ms", "speedup", "delivered",
                    "tflops", "unknown", "nominal_flops", "keep" if r is not dense else "name"):
            assert key in r
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["speedup"] == pytest.approx(dense["median_ms"] / r["median_ms"])
        assert r["flops_ratio"] == pytest.approx(r["flops"] / dense["flops"])
        assert r["delivered"] == pytest.approx(r["speedup"] * r["flops_ratio"])
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
    assert dense["speedup"] == 1.0 and dense["rel_err"] < 1e-6
    assert pruned["flops_ratio"] == pytest.approx(0.5, rel=0.01)
    # errors are measured on the held-out split, against float32 dense
    want = A.relative_error(A.mlp_apply(small, jnp.asarray(prob.x.val)), A.mlp_apply(p, jnp.asarray(prob.x.val)))
    assert pruned["rel_err"] == pytest.approx(want, rel=1e-4)
    assert 0 < pruned["rel_err"] < 1
    # 2:4 executes dense: same executed FLOPs, half the matmul FLOPs nominally
    assert sparse["flops_ratio"] == pytest.approx(1.0, rel=1e-3)
    assert sparse["nominal_flops"] == pytest.approx(sparse["flops"] - sparse["matmul_flops"] / 2)
    assert sparse["nominal_flops_ratio"] == pytest.approx(sparse["nominal_flops"] / dense["flops"])
    assert sparse["nominal_delivered"] == pytest.approx(sparse["speedup"] * sparse["nominal_flops_ratio"])
    assert pruned["nominal_flops"] is None and pruned["nominal_delivered"] is None


def test_table_shape(mlp_comparison):
    *_, cmp = mlp_comparison
    t = cmp.table("mlp")
    assert "keep" in t.columns and "nominal delivered" in t.columns
    assert len(t.rows) == 3 and all(len(r) == len(t.columns) for r in t.rows)
    assert t.rows[0][t.columns.index("keep")] is None  # dense has no info value
    plain = V.Comparison(cmp.dtype, cmp.bench_tokens, cmp.eval_tokens, cmp.results[:2])
    assert "nominal delivered" not in plain.table("x").columns


def test_bfloat16_is_scored_against_float32_dense():
    prob = S.make_linear_problem(1, D, D, SPEC)
    lr = A.svd_low_rank(prob.w_IO, D)  # full rank: any error left is bfloat16 rounding
    cmp = V.compare(V.Variant("dense", A.dense_apply, A.Dense(prob.w_IO)),
                    [V.Variant("svd full", A.low_rank_apply, lr)], prob.x.bench, prob.x.val,
                    dtype="bfloat16", iters=2, warmup=1)
    dense, full = cmp.rows()
    assert cmp.dtype == "bfloat16"
    assert 1e-4 < dense["rel_err"] < 2e-2 and 1e-4 < full["rel_err"] < 3e-2
    assert full["matmul_flops"] == 2 * SPEC.tokens * 2 * D * D


def test_compare_rejects_bad_input():
    p = A.Dense(jnp.eye(4))
    x = jnp.ones((2, 4))
    with pytest.raises(UserError):
        V.compare(V.Variant("a", A.dense_apply, p), [V.Variant("a", A.dense_apply, p)], x, x)
    with pytest.raises(UserError):
        V.compare(V.Variant("a", A.dense_apply, p), [], x, x, dtype="float16")


def test_setup_cost_flags_unpriced_decompositions():
    w = jnp.asarray(S.decaying_weight(np.random.default_rng(0), 32, 24, S.InputSpec()))
    cost = V.setup_cost(lambda m: A.svd_low_rank(m, 4), w, iters=1)
    assert cost["flops_complete"] is False and cost["unknown"]  # the LAPACK/cuSOLVER SVD is a custom call
    assert cost["median_ms"] > 0
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    host = V.setup_cost(lambda: A.whitening(x), jit=False, iters=1)
    assert host["flops"] is None and host["median_ms"] > 0


def test_pareto_front_and_plot(tmp_path):
    speedup = [1.0, 2.0, 1.5, 3.0, 3.0]
    err = [0.0, 0.1, 0.2, 0.3, 0.15]
    # (1.5, 0.2) is beaten by (2, 0.1); (3, 0.3) by (3, 0.15), an exact tie in speedup
    assert V.pareto_front(speedup, err).tolist() == [True, True, False, False, True]
    rows = [{"name": str(i), "speedup": s, "rel_err": e} for i, (s, e) in enumerate(zip(speedup, err))]
    path = V.plot_pareto(rows, tmp_path / "pareto.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
