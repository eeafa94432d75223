"""LoRA (frozen base, mergeable adapters, exact ~4N step FLOPs), the SVD estimator and the gathered sparse FFN
(equal to the dense FFN on its channels, FLOPs linear in kept channels), the sparse-lora demo end to end (warm-up
dense, tables), --config TOML files, and one-line errors for bad values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from demos import sparse_lora as sl
from mgr.cli import main
from mgr.flops import count_flops
from mgr.methods import lora
from mgr.methods import sparse_ffn as sf
from nanochat.model import GPT, GPTConfig
from tests.conftest import one_error_line, read_json

B, T = 2, 16


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")


def tiny_model(depth=2, targets=tuple(sl.TARGETS), rank=4, randomize=True):
    cfg = GPTConfig.from_depth(depth, vocab_size=64, sequence_len=T)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    # nanochat zero-initialises output projections: give every weight a value so gradients are generic
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and not var[...].any():
            var[...] = jax.random.normal(jax.random.key(len(path)), var.shape) * 0.05
    lora.add_adapters(model.blocks, [sl.TARGETS[t] for t in targets], rank=rank, alpha=2.0 * rank,
                      rngs=nnx.Rngs(1))
    if randomize:
        for path, var in nnx.iter_graph(model):
            if isinstance(var, lora.Adapter):
                var[...] = jax.random.normal(jax.random.key(7 + len(path)), var.shape) * 0.1
    return cfg, model


def batch(cfg, seed=0):
    x = jax.random.randint(jax.random.key(seed), (B, T + 1), 0, cfg.vocab_size)
    return {"inputs_BT": x[:, :-1], "targets_BT": x[:, 1:]}


def lora_state(model, est=None):
    graphdef, adapters, frozen = nnx.split(model, lora.Adapter, ...)
    tx = optax.adam(1e-2)
    return graphdef, tx, {"train": adapters, "frozen": frozen, "est": est or {}, "opt": tx.init(adapters),
                          "step": jnp.zeros((), jnp.int32)}


# --- LoRA ---------------------------------------------------------------------------------------------------------

def test_lora_step_leaves_the_base_bitwise_unchanged_and_trains_adapters():
    cfg, model = tiny_model(randomize=False)
    graphdef, tx, state = lora_state(model)
    before = jax.tree.map(np.asarray, state["frozen"])
    step = jax.jit(sl.make_step(graphdef, tx, (None,) * cfg.n_layer, "svd", 0))
    new = state
    for i in range(3):
        new, metrics = step(new, batch(cfg, i))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new["frozen"])):
        assert np.array_equal(a, np.asarray(b))
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state["train"]), jax.tree.leaves(new["train"]))]
    assert all(moved)  # B starts at zero, so A moves from step 2 on and every factor has moved after 3 steps
    # only adapters are optimised: the optimizer state holds adapter-shaped leaves only
    n_adapter = sum(x.size for x in jax.tree.leaves(state["train"]))
    assert sum(x.size for x in jax.tree.leaves(state["opt"]) if x.ndim) == 2 * n_adapter


def test_fresh_adapters_start_as_the_base_and_merged_adapters_equal_unmerged():
    cfg, fresh = tiny_model(randomize=False)
    x = batch(cfg)["inputs_BT"]
    base = lora.merge_adapters(nnx.clone(fresh))  # B = 0: merging adds exactly nothing, this is the base model
    assert not any(isinstance(m, lora.LoRALinear) for _, m in nnx.iter_modules(base))
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(base(x)))
    _, model = tiny_model()
    unmerged = model(x)
    merged = lora.merge_adapters(nnx.clone(model))
    assert float(jnp.abs(unmerged - base(x)).max()) > 1e-3  # the adapters do change the function
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(unmerged), rtol=1e-5, atol=1e-5)


def test_forward_equals_the_model_forward():
    """The demo's block-by-block forward is the GPT's own forward when every layer is dense."""
    cfg, model = tiny_model()
    x = batch(cfg)["inputs_BT"]
    ours = sl.Forward(model, (None,) * cfg.n_layer, "svd", {}, jax.random.key(0))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(model(x)), rtol=1e-5, atol=1e-5)


def _step_flops(model, cfg, plan, est=None, rank=4, targets=tuple(sl.TARGETS), full=False):
    if full:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = optax.adam(1e-2)
        state = {"train": params, "frozen": rest, "est": {}, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    else:
        graphdef, tx, state = lora_state(model, est)
    record = count_flops(sl.make_step(graphdef, tx, plan, "svd", 0), state, batch(cfg))
    analytic = sl.step_flops(cfg, plan, full=full, targets=() if full else targets, rank=rank,
                             svd_rank=est["u"].shape[-1] if est else 0)
    return record, analytic


@pytest.mark.parametrize("targets", [tuple(sl.TARGETS), ("fc", "proj")])
def test_lora_step_flops_are_4n_plus_adapters_exactly(targets):
    cfg, model = tiny_model(targets=targets)
    record, analytic = _step_flops(model, cfg, (None,) * cfg.n_layer, targets=targets)
    assert record.matmul_flops == pytest.approx(analytic["total"] * B * T, rel=1e-12)
    assert record.flops == pytest.approx(record.matmul_flops, rel=0.1)  # XLA adds the elementwise work
    if targets == tuple(sl.TARGETS):
        # The ~4N statement, exactly: every base matmul at 4 FLOPs per weight per token (forward + input
        # gradient), less layer 0's q/k/v input gradients (their input is frozen), plus the adapters' own
        # 6r(d_in + d_out) (2r·d_in less for layer 0's q/k/v) and the attention scores (forward 4THK, backward 8THK).
        D, L, V, r = cfg.n_embd, cfg.n_layer, cfg.vocab_size, 4
        n = L * 12 * D * D + D * V
        adapters = L * 6 * r * (4 * 2 * D + 2 * 5 * D) - 3 * 2 * r * D
        scores = L * 12 * cfg.n_head * cfg.head_dim * T
        assert analytic["total"] == 4 * n - 3 * 2 * D * D + adapters + scores
        assert analytic["lora"] == adapters


def test_full_finetuning_is_6n():
    cfg, model = tiny_model(targets=("q",), randomize=False)
    plain = GPT(cfg, rngs=nnx.Rngs(0))
    record, analytic = _step_flops(plain, cfg, (None,) * cfg.n_layer, full=True)
    D, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    assert analytic["total"] == 6 * (L * 12 * D * D + D * V) + 12 * L * cfg.n_head * cfg.head_dim * T
    assert record.matmul_flops == analytic["total"] * B * T


# --- the estimator and the sparse FFN -----------------------------------------------------------------------------

def _mlp(cfg, model, layer=0):
    graphdef, state = nnx.split(model.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state)).mlp


def test_sparse_ffn_equals_dense_restricted_to_its_channels_values_and_gradients():
    cfg, model = tiny_model()
    mlp = _mlp(cfg, model)
    F = 4 * cfg.n_embd
    x = jax.random.normal(jax.random.key(3), (B, T, cfg.n_embd))
    np.testing.assert_allclose(np.asarray(sf.sparse_mlp(x, mlp.c_fc, mlp.c_proj, jnp.arange(F))),
                               np.asarray(mlp(x)), rtol=1e-5, atol=1e-5)
    idx = jnp.sort(jax.random.permutation(jax.random.key(4), F)[: F // 4])
    keep_F = jnp.zeros(F).at[idx].set(1.0)

    def reference(fc_a, fc_b, proj_a, proj_b, x):
        # the dense FFN with the other channels removed (the test's reference, not the method: it multiplies by 0/1)
        h = sf.relu_squared(x @ mlp.c_fc.base.kernel[...] + mlp.c_fc.scale * (x @ fc_a) @ fc_b) * keep_F
        return h @ mlp.c_proj.base.kernel[...] + mlp.c_proj.scale * (h @ proj_a) @ proj_b

    def sparse(fc_a, fc_b, proj_a, proj_b, x):
        m = nnx.clone(mlp)
        m.c_fc.lora_a[...], m.c_fc.lora_b[...], m.c_proj.lora_a[...], m.c_proj.lora_b[...] = fc_a, fc_b, proj_a, proj_b
        return sf.sparse_mlp(x, m.c_fc, m.c_proj, idx)

    args = (mlp.c_fc.lora_a[...], mlp.c_fc.lora_b[...], mlp.c_proj.lora_a[...], mlp.c_proj.lora_b[...], x)
    np.testing.assert_allclose(np.asarray(sparse(*args)), np.asarray(reference(*args)), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    g_sparse = jax.grad(loss(sparse), argnums=(0, 1, 2, 3, 4))(*args)
    g_ref = jax.grad(loss(reference), argnums=(0, 1, 2, 3, 4))(*args)
    for a, b in zip(g_sparse, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_sparse_ffn_flops_fall_linearly_with_kept_channels():
    cfg, model = tiny_model()
    mlp = _mlp(cfg, model)
    x = jax.random.normal(jax.random.key(3), (B * T, cfg.n_embd))
    counts = {}
    for k in (32, 64, 128, 256):
        idx = jnp.arange(k)
        counts[k] = count_flops(lambda x, idx: sf.sparse_mlp(x, mlp.c_fc, mlp.c_proj, idx), x, idx).matmul_flops
    D, r, N = cfg.n_embd, 4, B * T
    for k, flops in counts.items():
        assert flops == 2 * N * (2 * D * k) + 2 * N * r * (2 * D + 2 * k)
    assert counts[256] - counts[128] == 4 * (counts[64] - counts[32])  # linear in k


def test_full_rank_estimator_selects_the_true_top_channels():
    cfg, model = tiny_model()
    mlp = _mlp(cfg, model)
    w = mlp.c_fc.base.kernel[...]
    D, F = w.shape
    u, sv = sf.svd_factors(w, D)
    x = jax.random.normal(jax.random.key(5), (B, T, D))
    true = sf.channel_scores(sf.relu_squared(x @ w))
    np.testing.assert_allclose(np.asarray(sf.predicted_scores(x, u, sv)), np.asarray(true), rtol=1e-3, atol=1e-4)
    for k in (8, 64, 200):
        assert np.array_equal(np.asarray(sf.top_channels(sf.predicted_scores(x, u, sv), k)),
                              np.asarray(sf.top_channels(true, k)))
        assert float(sf.recall(sf.top_channels(sf.predicted_scores(x, u, sv), k), true)) == 1.0
    low = sf.top_channels(sf.predicted_scores(x, *sf.svd_factors(w, 4)), 64)
    assert float(sf.recall(low, true)) < 1.0
    # the estimator is priced at 2r(D + F) per token and has no backward
    rec = count_flops(jax.grad(lambda x: sf.predicted_scores(x, *sf.svd_factors(w, 8)).sum()), x)
    assert rec.matmul_flops == 0  # stop_gradient: the estimator is dead code in the gradient
    rec = count_flops(lambda x: sf.predicted_scores(x, u[:, :8], sv[:8]), x)
    assert rec.matmul_flops == B * T * sf.estimator_flops(D, F, 8)


def test_sparse_lora_step_flops_match_the_analytic_split():
    cfg, model = tiny_model()
    est = sl.estimator_state(model, 8)
    F = 4 * cfg.n_embd
    for plan in [(F // 2, F // 4), (None, F // 4)]:
        record, analytic = _step_flops(model, cfg, plan, est=est)
        assert record.matmul_flops == pytest.approx(analytic["total"] * B * T, rel=1e-12)
        assert analytic["estimator"] == sum(k is not None for k in plan) * sf.estimator_flops(cfg.n_embd, F, 8)


# --- the demo, --config and errors ------------------------------------------------------------------------------

TINY = ("--depth", "1", "--sequence-len", "32", "--batch-size", "4", "--pretrain-steps", "4", "--eval-tokens",
        "256", "--ffn-sparsity", "0.5", "--svd-rank", "8", "--sweep-sparsities", "0.5", "--sweep-ranks", "8",
        "--timing-rounds", "2", "--max-iterations", "10", "--sparse-warmup-ratio", "0.3")


def _run(tmp_path, run_id, *flags):
    code = main(["run", "sparse-lora", *TINY, *flags, "--artifacts-dir", str(tmp_path), "--run-id", run_id])
    return code, tmp_path / "demos" / "sparse_lora" / run_id


@pytest.mark.slow
def test_demo_end_to_end_and_warmup_runs_dense(tmp_path):
    code, run_dir = _run(tmp_path, "tiny")
    assert code == 0
    s = read_json(run_dir / "summary.json")
    variants = s["results"]["variants"]
    assert list(variants) == ["full_ft", "lora", "sparse_lora@0.5", "random@0.5"]
    train = s["results"]["train"]
    # warm-up: ceil(0.3 * 10) = 3 dense steps, then sparse
    assert train["sparse_lora@0.5"]["variant_steps"] == {"dense": 3, "sparse": 7}
    assert train["lora"]["variant_steps"] == {"dense": 10}
    for name, e in variants.items():
        assert e["matmul_flops_per_token_measured"] == pytest.approx(e["flops_per_token_analytic"]["total"])
        assert np.isfinite(e["val_loss"]) and e["speedup_vs_lora"] > 0
    assert variants["lora"]["trainable_params"] < variants["full_ft"]["trainable_params"]
    assert 0 <= variants["sparse_lora@0.5"]["recall"] <= 1
    assert s["results"]["sweep"][0]["sparsity"] == 0.5
    assert (run_dir / "plots" / "break_even.png").exists()


def test_warmup_phase_is_dense_then_sparse():
    assert [sl.phase(3)(i, None) for i in range(6)] == ["dense"] * 3 + ["sparse"] * 3
    assert [sl.phase(None)(i, None) for i in range(4)] == ["dense"] * 4
    assert [sl.phase(0)(i, None) for i in range(2)] == ["sparse"] * 2


@pytest.mark.slow
def test_warmup_choice_is_dense_then_sparse(tmp_path, monkeypatch):
    """The warm-up steps are the dense step's: checked on the choose function the demo hands ctx.train."""
    seen = {}

    class Stop(Exception):
        pass

    from mgr import context
    real_train = context.RunContext.train

    def fake_train(self, name, fns, state, batch_fn, *, choose=None, **kw):
        if name == "pretrain":
            return real_train(self, name, fns, state, batch_fn, choose=choose, **kw)
        seen[name] = ([choose(i, None) for i in range(10)], sorted(fns))
        if len(seen) == 3:
            raise Stop
        return type("R", (), {"steps": 10, "state": state})()

    monkeypatch.setattr(context.RunContext, "train", fake_train)
    with pytest.raises(Stop):
        main(["run", "sparse-lora", *TINY, "--artifacts-dir", str(tmp_path), "--run-id", "w"])
    assert seen["full_ft"][0] == ["dense"] * 10 and seen["lora"][0] == ["dense"] * 10
    assert seen["sparse_lora@0.5"] == (["dense"] * 3 + ["sparse"] * 7, ["dense", "sparse"])


@pytest.mark.parametrize("flags, message", [
    (("--ffn-sparsity", "1.0"), "--ffn-sparsity must lie in [0, 1)"),
    (("--ffn-sparsity", "-0.1"), "--ffn-sparsity must lie in [0, 1)"),
    (("--layer-sparsity", "layer.0=1.5"), "--layer-sparsity layer.0 must lie in [0, 1)"),
    (("--layer-sparsity", "layer.7=0.5"), "unknown layer 'layer.7'"),
    (("--layer-sparsity", "attn=0.5"), "unknown layer 'attn'"),
    (("--svd-rank", "0"), "--svd-rank must be >= 1"),
    (("--svd-rank", "65"), "svd_rank must be in [1, 64]"),
    (("--sweep-ranks", "4,100"), "svd_rank must be in [1, 64]"),
    (("--lora-targets", "q,x"), "--lora-targets must be a non-empty subset"),
    (("--sparse-warmup-ratio", "1"), "--sparse-warmup-ratio must lie in [0, 1)"),
])
def test_bad_values_get_one_line_and_exit_2(tmp_path, capsys, flags, message):
    code, _ = _run(tmp_path, "bad", *flags)
    assert code == 2
    assert message in one_error_line(capsys)


def test_config_file_sets_defaults_and_flags_override(tmp_path, monkeypatch):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('svd_rank = 4\nffn-sparsity = [0.25, 0.5]\nrandom_control = false\nseed = 3\n'
                        '[layer_sparsity]\n"layer.0" = 0.8\n')
    captured = {}

    def fake_launch(demo, config, args, budget, command):
        captured.update(config=config, seed=args.seed)
        return 0

    monkeypatch.setattr("mgr.cli.launch_from_args", fake_launch)
    assert main(["run", "sparse-lora", "--config", str(cfg_file), "--svd-rank", "6"]) == 0
    c = captured["config"]
    assert (c.svd_rank, c.ffn_sparsity, c.random_control, c.layer_sparsity, captured["seed"]) == \
        (6, (0.25, 0.5), False, {"layer.0": 0.8}, 3)
    assert main(["run", "sparse-lora", "--layer-sparsity", "layer.0=0.5,layer.1=0", "--config", str(cfg_file)]) == 0
    assert captured["config"].layer_sparsity == {"layer.0": 0.5, "layer.1": 0.0}


@pytest.mark.parametrize("text, message", [
    ("svd_rankk = 4\n", "unknown option 'svd_rankk'"),
    ("svd_rank = 'x'\n", "svd_rank: expects int, got 'x'"),
    ("random_control = 1\n", "random_control must be true or false"),
    ("dtype = 'float16'\n", "dtype must be one of auto, float32, bfloat16"),
    ("svd_rank = \n", "not valid TOML"),
])
def test_bad_config_files_get_one_line(tmp_path, capsys, text, message):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(text)
    assert main(["run", "sparse-lora", "--config", str(cfg_file)]) == 2
    assert message in one_error_line(capsys)
    assert main(["run", "sparse-lora", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in one_error_line(capsys)
