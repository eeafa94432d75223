"""End to end through `mgr run` at tiny sizes: the four approximation benches' tables, FLOPs against analytic counts,
errors at full rank / keep 1.0, the Pareto plot and run.md, and bad options refused with one `error:` line."""

import pytest

from mgr.cli import main
from mgr.flops import matmul_flops
from tests.conftest import one_error_line, read_json

D, E = 32, 2  # dmodel, expansion: hidden H = 64
H = D * E
TINY = ["--dmodel", str(D), "--tokens", "64", "--tokens-val", "48", "--tokens-train", "128", "--iters", "2",
        "--warmup", "1"]
PNG = b"\x89PNG\r\n\x1a\n"


def run_bench(tmp_path, demo, run_id, *flags):
    code = main(["run", demo, "--artifacts-dir", str(tmp_path), "--run-id", run_id, *TINY, *flags])
    run_dir = next((tmp_path / "benches").glob(f"*/{run_id}"))
    return code, run_dir, read_json(run_dir / "summary.json")


def by_name(comparison):
    return {r["name"]: r for r in comparison["rows"]}


def check_rows_and_artifacts(run_dir, summary, comparisons, table_titles):
    assert summary["status"] == "completed"
    for cmp in comparisons:
        assert cmp["bench_tokens"] == 64 and cmp["eval_tokens"] == 48
        dense = cmp["rows"][0]
        assert dense["name"] == "dense" and dense["speedup"] == 1.0 and dense["rel_err"] < 1e-6
        for r in cmp["rows"]:
            assert r["n"] == 2 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            assert r["flops_ratio"] == pytest.approx(r["flops"] / dense["flops"])
            assert r["speedup"] == pytest.approx(dense["median_ms"] / r["median_ms"])
            assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
    assert (run_dir / "plots" / "pareto.png").read_bytes()[:8] == PNG
    assert summary["results"]["plots"] == ["plots/pareto.png"]
    md = (run_dir / "run.md").read_text()
    for title in table_titles:
        assert f"### {title}" in md
    assert "| variant |" in md and "| median ms | p10 ms | p90 ms |" in md and "![plots/pareto.png]" in md


def test_matrix_approx_projection_and_mlp(tmp_path):
    code, run_dir, s = run_bench(tmp_path, "matrix-approx", "r1", "--expansion", str(E), "--rank-fracs", "0.25,1")
    assert code == 0
    res = s["results"]
    check_rows_and_artifacts(run_dir, s, [res["projection"], res["mlp"]],
                             [f"projection {D}x{D}: dense vs truncated SVD",
                              f"relu² MLP block {D}x{H}x{D}: dense vs both matrices at rank r"])
    n = 64
    lin, mlp = by_name(res["projection"]), by_name(res["mlp"])
    assert lin["dense"]["matmul_flops"] == matmul_flops(n, D, D)
    assert mlp["dense"]["matmul_flops"] == matmul_flops(n, D, H) + matmul_flops(n, H, D)
    for r in (8, 32):
        # thin-then-wide: 2n·r·(d_in + d_out) per matrix, and XLA's count of the executed program agrees
        want = matmul_flops(n, D, r) + matmul_flops(n, r, D)
        assert lin[f"exact r={r}"]["matmul_flops"] == want
        assert lin[f"exact r={r}"]["flops"] == pytest.approx(want, rel=0.01)
        want = 2 * (matmul_flops(n, D, r) + matmul_flops(n, r, H))
        assert mlp[f"exact r={r}"]["matmul_flops"] == want
        assert mlp[f"exact r={r}"]["flops"] == pytest.approx(want + 2 * n * H, rel=0.01)  # + relu and square
    assert lin["exact r=32"]["rel_err"] < 1e-4 and lin["exact r=32"]["weight err"] < 1e-5
    assert mlp["exact r=32"]["rel_err"] < 1e-4 and mlp["exact r=32"]["W1 err"] < 1e-5
    assert 1e-3 < lin["exact r=8"]["rel_err"] < 1 and 1e-3 < mlp["exact r=8"]["rel_err"] < 1
    # the exact SVD's one-off cost, once per matrix, flagged as not priced by XLA (LAPACK custom call)
    setup = res["setup"]
    assert sorted(setup) == [f"MLP W1+W2 {D}x{H}, exact (any rank)", f"projection {D}x{D}, exact (any rank)"]
    assert all(c["median_ms"] > 0 and c["flops_complete"] is False for c in setup.values())
    assert res["breakeven_rank"] == {"projection": D / 2, "mlp": D * H / (D + H)}


def test_data_aware_beats_svd_on_calibration(tmp_path):
    code, run_dir, s = run_bench(tmp_path, "data-aware-low-rank", "r1", "--rank-fracs", "0.125,0.25")
    assert code == 0
    cmp = s["results"]["comparison"]
    check_rows_and_artifacts(run_dir, s, [cmp], [f"projection {D}x{D}: dense vs SVD vs data-aware low rank"])
    rows, n = by_name(cmp), 64
    for r in (4, 8):
        svd, aware, diag = rows[f"svd r={r}"], rows[f"data-aware r={r}"], rows[f"data-aware+diag r={r}"]
        assert aware["calib err"] < svd["calib err"]  # it minimises exactly this
        assert diag["calib err"] <= aware["calib err"] * (1 + 1e-5)  # the diagonal's optimum cannot be worse
        assert aware["rel_err"] < svd["rel_err"]  # and on these activations it generalises to held-out tokens
        thin = matmul_flops(n, D, r) + matmul_flops(n, r, D)
        assert svd["matmul_flops"] == aware["matmul_flops"] == diag["matmul_flops"] == thin
        assert aware["flops"] == pytest.approx(thin, rel=0.01)
        assert diag["flops"] == pytest.approx(thin + 2 * n * D, rel=0.01)  # x[:, :d]·diag, then added
    assert set(s["results"]["setup"]) == {"whitening (Cholesky chain, host-side)", "SVD of W (any rank)",
                                          "SVD of whitened W (any rank, given whitening)"}


def test_structured_sparsity_pruning_and_honest_2_4(tmp_path):
    code, run_dir, s = run_bench(tmp_path, "structured-sparsity-mlp", "r1", "--expansion", str(E),
                                 "--keep-fracs", "1,0.5", "--importance", "weight,activation")
    assert code == 0
    cmp = s["results"]["comparison"]
    check_rows_and_artifacts(run_dir, s, [cmp], [f"dense relu² MLP {D}x{H} vs pruned / 2:4"])
    rows, n = by_name(cmp), 64
    dense = rows["dense"]
    for imp in ("weight", "activation"):
        assert rows[f"{imp} keep=1"]["rel_err"] < 1e-6
        half = rows[f"{imp} keep=0.5"]
        k = H // 2
        assert half["neurons"] == k and half["matmul_flops"] == matmul_flops(n, D, k) + matmul_flops(n, k, D)
        assert half["flops"] == pytest.approx(half["matmul_flops"] + 2 * n * k, rel=0.01)
        assert half["flops_ratio"] == pytest.approx(0.5, rel=0.01)
        assert 0 < half["rel_err"] < 1 and half["nominal_flops"] is None
    # 2:4 executes dense: the executed count is dense's, the nominal one halves only the matmul part
    two_four = rows["2:4"]
    assert two_four["flops"] == dense["flops"] and two_four["matmul_flops"] == dense["matmul_flops"]
    assert two_four["nominal_flops"] == dense["flops"] - dense["matmul_flops"] / 2
    assert two_four["rel_err"] > 1e-3
    pruned_24 = rows["weight keep=0.5 +2:4"]
    assert pruned_24["flops"] == rows["weight keep=0.5"]["flops"]
    assert pruned_24["nominal_flops"] == pytest.approx(pruned_24["flops"] - pruned_24["matmul_flops"] / 2)
    md = (run_dir / "run.md").read_text()
    assert "nominal FLOPs" in md and "no 2:4 kernel in JAX" in md


def test_low_rank_recovery_both_benchmarks_under_a_budget(tmp_path):
    code, run_dir, s = run_bench(tmp_path, "low-rank-recovery", "r1", "--expansion", str(E), "--benchmark", "both",
                                 "--rank-fracs", "0.25,1", "--steps", "50", "--max-iterations", "3",
                                 "--batch-size", "32", "--eval-every", "2")
    assert code == 0
    res = s["results"]
    check_rows_and_artifacts(run_dir, s, [res["linear"]["comparison"], res["mlp"]["comparison"]],
                             [f"projection {D}x{D}: dense vs low rank, before/after distillation",
                              f"relu² MLP {D}x{H}x{D}: dense vs low rank, before/after distillation",
                              "distillation (same budget for every run)"])
    train = res["train"]
    assert len(train) == 2 * 2 * 2  # benchmarks x ranks x inits
    assert all(t["steps"] == 3 and t["stopped_by"] == "max_iterations" for t in train.values())  # the flag wins
    for which in ("linear", "mlp"):
        rows = by_name(res[which]["comparison"])
        for init in ("svd", "data-aware"):
            assert rows[f"{init} r=32"]["rel_err"] < 1e-4  # full rank reproduces the dense layer
            # fine-tuning changes values, not shapes: the same executed FLOPs as the initialisation
            assert rows[f"{init} r=8 +ft"]["flops"] == rows[f"{init} r=8"]["flops"]
            assert rows[f"{init} r=8 +ft"]["rel_err"] != rows[f"{init} r=8"]["rel_err"]
        # held-out error curve: every --eval-every steps and at the end; its last point is the +ft row's error
        curves = res[which]["val_rel_err_curves"]
        assert len(curves) == 2 * 2 and all([s for s, _ in c] == [2, 3] for c in curves.values())
        for name, c in curves.items():
            init, rank = name.split()[-2:]
            assert c[-1][1]["val_rel_err"] == pytest.approx(rows[f"{init} {rank} +ft"]["rel_err"], rel=1e-3, abs=1e-6)
    n = 64
    assert by_name(res["linear"]["comparison"])["svd r=8"]["matmul_flops"] == 2 * matmul_flops(n, D, 8)
    assert by_name(res["mlp"]["comparison"])["svd r=8"]["matmul_flops"] == 2 * (
        matmul_flops(n, D, 8) + matmul_flops(n, 8, H))


def test_low_rank_recovery_steps_is_the_default_budget(tmp_path):
    code, _, s = run_bench(tmp_path, "low-rank-recovery", "r1", "--benchmark", "linear", "--rank-fracs", "0.25",
                           "--inits", "svd", "--steps", "2", "--eval-every", "0", "--batch-size", "16")
    assert code == 0
    assert set(s["results"]) >= {"linear"} and "mlp" not in s["results"]
    assert [t["steps"] for t in s["results"]["train"].values()] == [2]
    assert s["budget"]["max_iterations"] == 2


@pytest.mark.parametrize("demo, flags, says", [
    ("matrix-approx", ["--rank-fracs", "0"], "rank fractions must be"),
    ("matrix-approx", ["--rank-fracs", "0.5,1.5"], "rank fractions must be"),
    ("matrix-approx", ["--methods", "qr"], "methods must be"),
    ("matrix-approx", ["--tokens", "0"], "must be >= 1"),
    ("matrix-approx", ["--dtype", "float16"], "invalid choice: 'float16'"),
    ("data-aware-low-rank", ["--rank-fracs", "-0.5"], "rank fractions must be"),
    ("structured-sparsity-mlp", ["--keep-fracs", "0"], "keep fraction must be in (0, 1]"),
    ("structured-sparsity-mlp", ["--importance", "magnitude"], "importance must be"),
    ("structured-sparsity-mlp", ["--keep-fracs", "0.3"], "2:4 needs"),  # 38 of 128 neurons
    ("low-rank-recovery", ["--benchmark", "conv"], "invalid choice: 'conv'"),
    ("low-rank-recovery", ["--steps", "0"], "--steps must be >= 1"),
    ("low-rank-recovery", ["--inits", "random"], "inits must be"),
    ("low-rank-recovery", ["--batch-size", "0"], "batch_size and expansion must be >= 1"),
    ("data-aware-low-rank", ["--damping", "-1"], "--damping must be a finite number >= 0"),
    ("data-aware-low-rank", ["--damping", "inf"], "--damping must be a finite number >= 0"),
    ("matrix-approx", ["--from-checkpoint", "missing.npz"], "checkpoint not found"),
    ("matrix-approx", ["--weight-alpha", "nan"], "--weight-alpha must be a finite number >= 0, got nan"),
    ("low-rank-recovery", ["--lr", "nan"], "lr a finite number > 0"),
    ("matrix-approx", ["--iters", "0"], "--iters must be >= 1"),
])
def test_bad_options_are_one_error_line(tmp_path, capsys, demo, flags, says):
    assert main(["run", demo, "--artifacts-dir", str(tmp_path), "--run-id", "bad", *TINY, *flags]) == 2
    assert says in one_error_line(capsys)
    if says != "2:4 needs":  # needs the layer's size, known once the run has built it
        assert not (tmp_path / "benches").exists()


def test_a_truncated_layer_file_is_one_error_line_before_the_run(tmp_path, capsys):
    import numpy as np
    np.savez(tmp_path / "layer.npz", w1=np.ones((8, 32), np.float32), w2=np.ones((32, 8), np.float32),
             x=np.ones((64, 8), np.float32))
    data = (tmp_path / "layer.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    assert main(["run", "data-aware-low-rank", "--artifacts-dir", str(tmp_path), "--from-checkpoint",
                 str(tmp_path / "cut.npz")]) == 2
    assert "unreadable layer file" in one_error_line(capsys)
    assert not (tmp_path / "benches").exists()


@pytest.mark.slow
def test_earlier_bench_command_lines_run_unchanged(tmp_path, capsys):
    out = tmp_path / "results" / "matrix_approx_20251218_120000.json"
    argv = ["run", "matrix-approx", "--device", "auto", "--dtype", "float32", "--tokens", "64", "--dmodel", "16",
            "--rank-fracs", "1.0,0.5,0.25", "--iters", "2", "--warmup", "1", "--json-out", str(out),
            "--artifacts-dir", str(tmp_path), "--tokens-train", "64", "--tokens-val", "32", "--tokens-bench", "32",
            "--sv-decay", "exp"]
    assert main(argv) == 0
    s = read_json(out)
    assert s["status"] == "completed" and s["results"]["projection"]["bench_tokens"] == 32
