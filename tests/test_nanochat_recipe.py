"""The nanochat recipes: classic reproduces the model before the recipe options bitwise; current's parts (value
embeddings, smear, backout, lambdas, qk scale, windows, padded vocab, init, the per-group optimizer) pinned by shape,
init values, masks and known values; its FLOPs analytic vs measured."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgr.errors import UserError
from mgr.flops import compile_and_count
from nanochat import train as nt
from nanochat.attention import causal_attention
from nanochat.model import GPT, RECIPES, GPTConfig, estimate_flops, generate, loss_fn, rms_norm
from tests.conftest import one_error_line

V = 61  # pads to 64
T = 136  # > 129: the short window (the reference's 128 left + the query) is narrower than the sequence
# Narrow (D=64, 4 query heads of 16 sharing 2 kv heads) so the many compiles of this file stay cheap.
NARROW = dict(n_embd=64, n_head=4, n_kv_head=2)
CUR = dataclasses.replace(GPTConfig.from_depth(2, vocab_size=V, sequence_len=T, recipe="current"), **NARROW)
CUR4 = dataclasses.replace(GPTConfig.from_depth(4, vocab_size=V, sequence_len=T, recipe="current"), **NARROW)


def tokens(B, T, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


@functools.cache
def model(cfg=CUR, scan_layers=True):
    return GPT(cfg, rngs=nnx.Rngs(0), scan_layers=scan_layers)


def perturbed(cfg, scale=0.3):
    """The current model with every recipe scalar and gate moved off its init (c_proj non-zero too), so that no part
    is an identity and every check below can fail."""
    m = GPT(cfg, rngs=nnx.Rngs(0))
    g, params, rest = nnx.split(m, nnx.Param, ...)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: a + scale * jnp.asarray(rng.standard_normal(a.shape), a.dtype), params)
    return nnx.merge(g, params, rest)


# --- classic: today's model, bitwise -----------------------------------------------------------------------------

# Losses of 4 training steps (depth 2, T=16, B=2, vocab 61, seed 0, batches from default_rng(0)), recorded with
# commit 852f9a9, before the recipe options existed. float.hex: exact.
GOLDEN = {"adamw": ["0x1.0713520000000p+2", "0x1.07bd300000000p+2", "0x1.08eaf80000000p+2", "0x1.09ee9c0000000p+2"],
          "muon": ["0x1.0713520000000p+2", "0x1.07f9500000000p+2", "0x1.08e6080000000p+2", "0x1.08e3600000000p+2"]}


@pytest.mark.parametrize("opt", ["adamw", "muon"])
def test_classic_recipe_reproduces_the_old_losses_bitwise(opt):
    c = nt.Config(depth=2, sequence_len=16, batch_size=2, recipe="classic", optimizer_type=opt)
    cfg = nt.model_config(c, V)
    graphdef, params = nnx.split(nt.build_model(c, cfg, 0), nnx.Param)
    tx = nt.make_optimizer(c, params)
    state = nt.init_state(params, tx)
    state["total_steps"] = jnp.asarray(4, jnp.int32)
    step = jax.jit(nt.make_train_step(graphdef, tx, c))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(4):
        x = jnp.asarray(rng.integers(0, V, (2, 17)), jnp.int32)
        state, metrics = step(state, {"inputs_BT": x[:, :-1], "targets_BT": x[:, 1:]})
        losses.append(float(metrics["loss"]).hex())
    assert losses == GOLDEN[opt]


def test_old_checkpoint_model_dicts_read_as_classic():
    old = {"vocab_size": V, "sequence_len": 16, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 128,
           "rope_base": 10000.0, "logit_softcap": 15.0}
    assert GPTConfig(**old) == GPTConfig.from_depth(2, vocab_size=V, sequence_len=16, recipe="classic")
    assert nt.optimizer_type(nt.Config(recipe="classic")) == "adamw"
    assert nt.optimizer_type(nt.Config()) == "nanochat"


# --- current: shapes, init values ---------------------------------------------------------------------------------

def test_current_config_values():
    assert CUR.rope_base == 100000.0 and CUR.qk_scale == 1.2 and CUR.padded_vocab_size == 64
    assert CUR.windows == (129, None) and CUR.ve_layers == (1,) and CUR.backout_layer == 1
    # SSSL tiled, the last layer always long; value embeddings alternate, the last layer always has one.
    assert CUR4.windows == (129, 129, 129, None) and CUR4.ve_layers == (1, 3) and CUR4.backout_layer == 2
    d5 = GPTConfig.from_depth(5, vocab_size=V, sequence_len=2048, recipe="current")
    assert d5.windows == (513, 513, 513, None, None) and d5.ve_layers == (0, 2, 4)
    assert GPTConfig.from_depth(2, vocab_size=V, sequence_len=64, recipe="current").windows == (None, None)


def test_current_param_shapes_and_init_values():
    m = model(CUR4)
    L, D, G, K = 4, 64, CUR4.n_kv_head, CUR4.head_dim
    shapes = {"/".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    assert shapes["wte/embedding"] == (64, D) and shapes["lm_head/kernel"] == (D, 64)
    assert shapes["value_embeds"] == (2, 64, G * K) and shapes["ve_gates"] == (2, 12, G)
    assert shapes["smear_gate"] == (24, 1) and shapes["resid_lambdas"] == (L,) and shapes["x0_lambdas"] == (L,)
    np.testing.assert_allclose(m.resid_lambdas[...], [1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05], rtol=1e-6)
    np.testing.assert_allclose(m.x0_lambdas[...], [0.20, 0.15, 0.10, 0.05], rtol=1e-6)
    assert float(m.smear_lambda[0]) == 0.0 and float(m.backout_lambda[0]) == pytest.approx(0.2)
    for gate in (m.ve_gates[...], m.smear_gate[...]):
        assert 0.0 <= float(gate.min()) and float(gate.max()) <= 0.02
    s = 3 ** 0.5 * D ** -0.5
    for w in (m.blocks.attn.c_q.kernel[...], m.value_embeds[...]):
        assert float(jnp.abs(w).max()) <= s and np.std(w) == pytest.approx(D ** -0.5, rel=0.05)
    assert float(jnp.abs(m.blocks.mlp.c_fc.kernel[...]).max()) <= 0.4 * s
    assert np.std(m.wte.embedding[...]) == pytest.approx(0.8, rel=0.05)
    assert not np.any(m.blocks.attn.c_proj.kernel[...]) and not np.any(m.blocks.mlp.c_proj.kernel[...])


def test_gates_at_init_known_values():
    """smear_lambda = 0 at init: the embedding is exactly the normed token embedding. A value-embedding gate at
    zero weights is 3 * sigmoid(0) = 1.5: the block's attention equals attention over v + 1.5 ve, built by hand."""
    m = model(CUR)
    idx = tokens(2, CUR.sequence_len)
    x, _ = m._embed(idx, jnp.arange(idx.shape[1]))
    np.testing.assert_array_equal(x, rms_norm(m.wte(idx)))
    g, state = nnx.split(perturbed(CUR).blocks)
    attn = nnx.merge(g, jax.tree.map(lambda a: a[1], state)).attn
    B, T, G, K = 2, 8, CUR.n_kv_head, CUR.head_dim
    h = jax.random.normal(jax.random.key(2), (B, T, CUR.n_embd))
    ve = jax.random.normal(jax.random.key(3), (B, T, G, K))
    no_rotation = (jnp.ones((1, T, 1, K // 2)), jnp.zeros((1, T, 1, K // 2)))
    got, _ = attn(h, no_rotation, implementation="xla", ve=(ve, jnp.zeros((12, G))))
    q = 1.2 * rms_norm(attn.c_q(h).reshape(B, T, -1, K))
    k = 1.2 * rms_norm(attn.c_k(h).reshape(B, T, G, K))
    v = attn.c_v(h).reshape(B, T, G, K) + 1.5 * ve
    want = attn.c_proj(causal_attention(q, k, v).reshape(B, T, -1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_parts_at_identity_values_equal_the_classic_model():
    """resid 1, x0 0, smear 0, backout 0 and zero value embeddings, with qk scale 1, no windows and the classic rope:
    the current model computes exactly the classic forward from the same block weights."""
    cfg = dataclasses.replace(CUR4, qk_scale=1.0, window_pattern="L", rope_base=10000.0, pad_vocab_to=1)
    cur = perturbed(cfg)
    classic = GPT(dataclasses.replace(GPTConfig.from_depth(4, vocab_size=V, sequence_len=T), **NARROW),
                  rngs=nnx.Rngs(1))
    classic.wte.embedding[...] = cur.wte.embedding[...]
    classic.lm_head.kernel[...] = cur.lm_head.kernel[...]
    nnx.update(classic.blocks, nnx.state(cur.blocks))
    idx = tokens(2, cfg.sequence_len)
    differs = np.abs(np.asarray(cur(idx) - classic(idx))).max()
    assert differs > 1e-3  # the perturbed parts do something
    cur.resid_lambdas[...] = jnp.ones(4)
    cur.x0_lambdas[...] = jnp.zeros(4)
    cur.smear_lambda[...] = jnp.zeros(1)
    cur.backout_lambda[...] = jnp.zeros(1)
    cur.value_embeds[...] = jnp.zeros_like(cur.value_embeds[...])
    np.testing.assert_allclose(cur(idx), classic(idx), rtol=1e-5, atol=1e-5)


def test_every_recipe_part_gets_a_gradient():
    m = perturbed(CUR4, scale=0.1)
    graphdef, params = nnx.split(m, nnx.Param)
    idx = tokens(2, CUR4.sequence_len)
    grads = jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), idx[:, :-1], idx[:, 1:])[0]))(params)
    for name in ("value_embeds", "ve_gates", "resid_lambdas", "x0_lambdas", "smear_gate", "smear_lambda",
                 "backout_lambda"):
        g = np.asarray(grads[name][...])
        assert np.all(np.abs(g).reshape(g.shape[0], -1).max(axis=1) > 0), name


# --- windows ------------------------------------------------------------------------------------------------------

def reference_attention(q, k, v, window, offset=0):
    """Brute force: query t (position offset + t) attends to keys s with p - window < s <= p."""
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    out = np.zeros((B, T, H, K))
    for t in range(T):
        p = offset + t
        keys = [s for s in range(S) if s <= p and (window is None or s > p - window)]
        for h in range(H):
            g = h // (H // G)
            sc = np.einsum("bk,bsk->bs", q[:, t, h], k[:, keys, g]) / np.sqrt(K)
            w = np.exp(sc - sc.max(-1, keepdims=True))
            out[:, t, h] = np.einsum("bs,bsk->bk", w / w.sum(-1, keepdims=True), v[:, keys, g])
    return out


@pytest.mark.parametrize("window", [None, 1, 3, 12])
@pytest.mark.parametrize("implementation", ["xla", "jax"])
def test_window_mask_matches_brute_force(window, implementation):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 12, 4, 8))
    k, v = (jax.random.normal(key, (2, 12, 2, 8)) for key in ks[1:])
    got = causal_attention(q, k, v, implementation=implementation, window=window)
    np.testing.assert_allclose(got, reference_attention(*map(np.asarray, (q, k, v)), window), rtol=1e-4, atol=1e-5)
    if window == 1:  # each query sees only itself
        np.testing.assert_allclose(got, jnp.repeat(v, 2, axis=2), rtol=1e-5, atol=1e-6)


def test_window_mask_with_query_offset():
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (1, 3, 2, 8))
    k, v = (jax.random.normal(key, (1, 10, 2, 8)) for key in ks[1:])
    got = causal_attention(q, k, v, q_offset=5, window=4)
    np.testing.assert_allclose(got, reference_attention(*map(np.asarray, (q, k, v)), 4, offset=5), rtol=1e-4,
                               atol=1e-5)


def test_bad_window_is_user_error():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(UserError, match="window must be >= 1"):
        causal_attention(q, q, q, window=0)
    with pytest.raises(UserError, match="window_pattern"):
        dataclasses.replace(CUR, window_pattern="SXL")


def test_windowed_layer_ignores_keys_beyond_its_window():
    """Changing token 0 cannot change layer 0's output at positions >= 129 (the short window); the full-context last
    layer then carries it, so the model's logits there do change."""
    m = perturbed(CUR)
    idx = tokens(1, CUR.sequence_len)
    idx2 = idx.at[0, 0].set((idx[0, 0] + 1) % V)
    h1, h2 = (m.mlp_input(i, 0) for i in (idx, idx2))
    # x0 mixes the smeared embedding of token 1 (not token 0's window), so positions >= 129 + 1 are untouched.
    np.testing.assert_array_equal(h1[:, 130:], h2[:, 130:])
    assert np.abs(np.asarray(h1[:, 1:129] - h2[:, 1:129])).max() > 0
    assert np.abs(np.asarray(m(idx)[:, 130:] - m(idx2)[:, 130:])).max() > 0


# --- padded vocabulary --------------------------------------------------------------------------------------------

def test_padded_vocab_is_invisible_to_loss_and_sampling():
    m = perturbed(CUR)
    idx = tokens(2, CUR.sequence_len)
    logits = m(idx)
    assert logits.shape == (2, CUR.sequence_len, V)
    loss = loss_fn(m, idx[:, :-1], idx[:, 1:])[0]
    # Huge logits on the padded rows: the loss (hence bpb) and the sampled tokens cannot see them.
    m.lm_head.kernel[...] = m.lm_head.kernel[...].at[:, V:].set(1e3)
    assert float(loss_fn(m, idx[:, :-1], idx[:, 1:])[0]) == float(loss)
    out = generate(m, idx[:, :4], 24, temperature=5.0, key=jax.random.key(0))
    assert int(out.max()) < V


# --- decoding with smear and windows ------------------------------------------------------------------------------

@pytest.mark.slow
def test_kv_cached_greedy_equals_full_recompute_current():
    """The cached path must smear the chunk's first token with the previous one and window its keys as training
    does: 130 tokens, past the 129-key window."""
    m = perturbed(CUR, scale=0.05)
    prompt = tokens(1, 5)
    out = generate(m, prompt, 130, temperature=0.0)
    logits = m(out[:, :-1])
    np.testing.assert_array_equal(np.argmax(logits[:, 4:], -1), out[:, 5:])


@pytest.mark.slow
def test_scan_and_unrolled_agree_current():
    idx = tokens(2, CUR4.sequence_len)
    a, b = model(CUR4)(idx), model(CUR4, scan_layers=False)(idx)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- FLOPs and the optimizer --------------------------------------------------------------------------------------

def test_current_step_flops_match_analytic_masked_dense():
    """mgr.flops on the real train step: 6N + 12*H*K*T per layer, every layer at T (masked dense). The windowed
    estimate (the reference's) is lower by 12*H*K*(T - w) per short layer."""
    c = nt.Config(depth=2, sequence_len=T, batch_size=2, optimizer_type="adamw")  # no Muon matmuls in the count
    cfg = nt.model_config(c, V)
    graphdef, params = nnx.split(nt.build_model(c, cfg, 0), nnx.Param)
    tx = nt.make_optimizer(c, params)
    state = nt.init_state(params, tx)
    x = tokens(2, T + 1)
    batch = {"inputs_BT": x[:, :-1], "targets_BT": x[:, 1:]}
    record, _ = compile_and_count(nt.make_train_step(graphdef, tx, c), state, batch)
    H, K = cfg.n_head, cfg.head_dim
    # The smear gate reads positions 1.. only: one token's 6 * 24 FLOPs fewer than the per-token count.
    assert record.matmul_flops / (2 * T) == pytest.approx(estimate_flops(cfg, masked_dense=True), rel=1e-3)
    assert estimate_flops(cfg, masked_dense=True) - estimate_flops(cfg) == 12 * H * K * (T - 129)


def test_nanochat_optimizer_groups_and_lrs():
    c = nt.Config(depth=2)
    params = nnx.state(nnx.eval_shape(lambda: GPT(CUR, rngs=nnx.Rngs(0))), nnx.Param)
    groups = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p): nt._nanochat_group(p, x)
              for p, x in jax.tree_util.tree_leaves_with_path(params)}
    assert groups == {"wte/embedding/value": "embedding", "lm_head/kernel/value": "lm_head",
                      "value_embeds/value": "value_embeds", "ve_gates/value": "matrix",
                      "resid_lambdas/value": "resid", "x0_lambdas/value": "x0", "smear_gate/value": "smear",
                      "smear_lambda/value": "smear", "backout_lambda/value": "smear",
                      **{f"blocks/{m}/kernel/value": "matrix" for m in ("attn/c_q", "attn/c_k", "attn/c_v",
                                                                       "attn/c_proj", "mlp/c_fc", "mlp/c_proj")}}
    # One step from zero state with a unit gradient: AdamW's first update is lr * sign(g) (bias-corrected).
    tx = nt.make_optimizer(dataclasses.replace(c, grad_clip=0.0), params)
    ones = jax.tree.map(jnp.ones_like, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(ones, tx.init(zeros), zeros)
    scale = (64 / 768) ** -0.5
    for name, lr in (("lm_head", 0.004 * scale), ("value_embeds", 0.1 * scale), ("x0_lambdas", 0.5),
                     ("resid_lambdas", 0.005), ("smear_lambda", 0.2)):
        leaf = updates[name] if name in ("value_embeds", "x0_lambdas", "resid_lambdas", "smear_lambda") else \
            updates[name]["kernel"]
        np.testing.assert_allclose(leaf[...], -lr, rtol=1e-5)
    np.testing.assert_allclose(updates["wte"]["embedding"][...], -0.2 * scale, rtol=1e-5)


def test_current_run_trains_through_the_cli(tmp_path):
    code = nt.main(["--depth", "1", "--sequence-len", "32", "--batch-size", "4", "--eval-tokens", "256",
                    "--max-iterations", "3", "--artifacts-dir", str(tmp_path), "--run-id", "r"])
    assert code == 0


def test_bad_recipe_is_one_error_line(tmp_path, capsys):
    code = nt.main(["--recipe", "modern", "--artifacts-dir", str(tmp_path)])
    assert code == 2
    assert "recipe" in one_error_line(capsys)
    assert set(RECIPES) == {"classic", "current"}
