"""nanochat GPT: shapes, causality, scan == unrolled, GQA, soft-cap, freezing, MLP swap, bf16, generation, FLOPs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mgr.errors import UserError
from mgr.flops import compile_and_count
from nanochat.attention import causal_attention
from nanochat.mlp import ReluSquaredMLP, linear
from nanochat.model import GPT, GPTConfig, estimate_flops, generate, loss_fn, matmul_params, rms_norm

VOCAB = 64
CFG = GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=16, head_dim=32)  # D=128, 4 heads of 32
GQA_CFG = GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=16, head_dim=32, n_kv_head=2)
K_FROZEN = CFG.n_layer // 2

# Compiles dominate this file's run time, so models and compiled steps are cached and shared between tests.


@functools.cache
def make(cfg=CFG, *, scan_layers=True, mlp=ReluSquaredMLP, dtype="float32", attention="xla") -> GPT:
    """A GPT with dense random weights in place of the nanochat init (zero c_proj, tiny lm_head), under which
    attention and MLPs would contribute nothing and most checks below could not fail. Same weights for every
    scan_layers / dtype / attention choice."""
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0), mlp=mlp, dtype=dtype, scan_layers=scan_layers,
                                          attention=attention))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32) * a.shape[-2] ** -0.5), state)
    return nnx.merge(graphdef, state)


def tokens(B=2, T=16, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, VOCAB)


@nnx.jit
def forward(model, idx_BT, targets_BT, mask_BT):
    return model(idx_BT), *loss_fn(model, idx_BT, targets_BT, mask_BT=mask_BT)


def logits_of(model, idx_BT):
    return forward(model, idx_BT, idx_BT, jnp.ones_like(idx_BT, bool))[0]


@functools.cache
def train_step(cfg=CFG, scan_layers=True, n_frozen=0, mlp=ReluSquaredMLP):
    """(matmul FLOPs per token from mgr.flops, loss, grads) of the real train step, compiled once."""
    graphdef, params = nnx.split(make(cfg, scan_layers=scan_layers, mlp=mlp))
    step = jax.value_and_grad(lambda p, x, y: loss_fn(nnx.merge(graphdef, p), x, y, n_frozen=n_frozen)[0])
    idx = tokens(T=cfg.sequence_len + 1, seed=2)
    x, y = idx[:, :-1], idx[:, 1:]
    record, compiled = compile_and_count(step, params, x, y)
    loss, grads = compiled(params, x, y)
    return record.matmul_flops / x.size, loss, grads


def assert_trees_close(a, b, rtol, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


# --- config -----------------------------------------------------------------------------------------------------

def test_from_depth_dial():
    c = GPTConfig.from_depth(12, vocab_size=100, sequence_len=32)
    assert (c.n_embd, c.n_layer, c.n_head, c.n_kv_head, c.head_dim) == (768, 12, 12, 12, 64)
    c = GPTConfig.from_depth(20, vocab_size=100, sequence_len=32)
    assert (c.n_embd, c.n_head, c.head_dim) == (1280, 10, 128)
    c = GPTConfig.from_depth(17, vocab_size=100, sequence_len=32)  # 1088 is not a multiple of 128
    assert (c.n_embd, c.n_head, c.head_dim) == (1088, 17, 64)
    assert GQA_CFG.n_kv_head == 2 and GQA_CFG.n_head == 4


@pytest.mark.parametrize("kwargs", [dict(depth=0), dict(depth=2, head_dim=48), dict(depth=2, n_kv_head=3),
                                    dict(depth=2, head_dim=128, n_kv_head=4)])
def test_bad_config_is_user_error(kwargs):
    with pytest.raises(UserError):
        GPTConfig.from_depth(kwargs.pop("depth"), vocab_size=10, sequence_len=8, **kwargs)


def test_bad_model_options_are_user_errors():
    with pytest.raises(UserError):
        GPT(CFG, rngs=nnx.Rngs(0), attention="flash")
    with pytest.raises(UserError):
        GPT(CFG, rngs=nnx.Rngs(0), dtype="float16")
    if jax.default_backend() != "gpu":
        with pytest.raises(UserError):
            GPT(CFG, rngs=nnx.Rngs(0), attention="cudnn")
    with pytest.raises(UserError):
        make()(tokens(), n_frozen=CFG.n_layer + 1)
    with pytest.raises(UserError):
        generate(make(), tokens()[:, :3], 4, temperature=1.0)  # sampling without a key


# --- parameters and init ------------------------------------------------------------------------------------------

def test_params_are_exactly_the_matrices_norms_have_none():
    model = nnx.eval_shape(lambda: GPT(GQA_CFG, rngs=nnx.Rngs(0)))
    shapes = {"/".join(map(str, path)): v.shape for path, v in nnx.to_flat_state(nnx.state(model))}
    L, D, K, V = GQA_CFG.n_layer, GQA_CFG.n_embd, GQA_CFG.head_dim, VOCAB
    assert shapes == {
        "wte/embedding": (V, D), "lm_head/kernel": (D, V),
        "blocks/attn/c_q/kernel": (L, D, 4 * K), "blocks/attn/c_k/kernel": (L, D, 2 * K),
        "blocks/attn/c_v/kernel": (L, D, 2 * K), "blocks/attn/c_proj/kernel": (L, 4 * K, D),
        "blocks/mlp/c_fc/kernel": (L, D, 4 * D), "blocks/mlp/c_proj/kernel": (L, 4 * D, D)}
    n_matmul = sum(int(np.prod(s)) for name, s in shapes.items() if name != "wte/embedding")
    assert matmul_params(GQA_CFG) == n_matmul


def test_nanochat_init():
    cfg = GPTConfig.from_depth(2, vocab_size=512, sequence_len=16)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    D = cfg.n_embd
    assert not np.any(model.blocks.attn.c_proj.kernel[...]) and not np.any(model.blocks.mlp.c_proj.kernel[...])
    np.testing.assert_allclose(np.std(model.wte.embedding[...]), 1.0, rtol=0.05)
    np.testing.assert_allclose(np.std(model.lm_head.kernel[...]), 1e-3, rtol=0.05)
    np.testing.assert_allclose(np.std(model.blocks.attn.c_q.kernel[...]), D ** -0.5, rtol=0.05)
    # fan_out > fan_in: std = 1/sqrt(fan_in); the layers differ (one key per layer).
    fc = np.asarray(model.blocks.mlp.c_fc.kernel[...])
    np.testing.assert_allclose(np.std(fc), D ** -0.5, rtol=0.05)
    assert not np.allclose(fc[0], fc[1])


def test_rms_norm_unit_rms():
    x = np.random.default_rng(0).standard_normal((3, 5, 32), np.float32) * 7.0
    y = rms_norm(x)
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(y), -1)), 1.0, rtol=1e-5)


# --- forward --------------------------------------------------------------------------------------------------

def test_shapes_and_loss_matches_reference():
    idx = tokens()
    targets = idx.at[0, 3].set(-1)  # nanochat's ignore_index
    mask = jnp.ones_like(idx, bool).at[1, :5].set(False)
    logits, loss, nats = forward(make(), idx, targets, mask)
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == jnp.float32 and nats.shape == (2, 16)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
    counted = (targets >= 0) & mask
    assert int(counted.sum()) == 32 - 6
    np.testing.assert_allclose(nats, jnp.where(counted, ref, 0.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, ref[counted].mean(), rtol=1e-5)


def test_causal():
    idx, k = tokens(), 9
    changed = idx.at[:, k].set((idx[:, k] + 1) % VOCAB)
    a, b = logits_of(make(), idx), logits_of(make(), changed)
    np.testing.assert_array_equal(a[:, :k], b[:, :k])
    assert np.all(np.abs(a[:, k:] - b[:, k:]).max(-1) > 1e-4)


def test_logit_softcap_bounds_logits():
    model = nnx.clone(make())
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 100.0
    logits = logits_of(model, tokens())
    assert np.abs(logits).max() <= 15.0
    assert np.abs(logits).max() > 14.9  # the raw logits are far beyond the cap, so it is active


@pytest.mark.slow
def test_scan_equals_unrolled_forward_and_grads():
    idx = tokens()
    np.testing.assert_allclose(logits_of(make(), idx), logits_of(make(scan_layers=False), idx), rtol=1e-5, atol=1e-5)
    _, loss_scan, g_scan = train_step(scan_layers=True)
    _, loss_unrolled, g_unrolled = train_step(scan_layers=False)
    np.testing.assert_allclose(loss_scan, loss_unrolled, rtol=1e-6)
    assert_trees_close(g_scan, g_unrolled, rtol=1e-4, atol=1e-6)


def test_gqa_attention_matches_reference():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 16, 4, 32), np.float32)
    k, v = rng.standard_normal((2, 2, 16, 2, 32), np.float32)
    # Reference: every query head h uses kv head h // 2, as repeat_kv does in nanochat.
    s = np.einsum("bthk,bshk->bhts", q, np.repeat(k, 2, axis=2)) / np.sqrt(32)
    s = np.where(np.tril(np.ones((16, 16), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhts,bshk->bthk", p / p.sum(-1, keepdims=True), np.repeat(v, 2, axis=2))
    out = jax.jit(causal_attention)(q, k, v)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["jax", "chunked"])
def test_gqa_model_and_attention_implementations_agree(attention):
    idx = tokens()
    xla, other = logits_of(make(GQA_CFG), idx), logits_of(make(GQA_CFG, attention=attention), idx)
    assert xla.shape == (2, 16, VOCAB)
    np.testing.assert_allclose(xla, other, rtol=1e-4, atol=1e-4)


def test_bf16_forward_close_to_fp32():
    idx = tokens()
    ones = jnp.ones_like(idx, bool)
    (a, loss_a, _), (b, loss_b, _) = forward(make(), idx, idx, ones), forward(make(dtype="bfloat16"), idx, idx, ones)
    assert b.dtype == jnp.float32 and make(dtype="bfloat16").wte.embedding[...].dtype == jnp.float32
    assert 0 < np.abs(a - b).max() < 0.05 * np.abs(a).max()  # nonzero: bf16 really ran
    np.testing.assert_allclose(loss_b, loss_a, rtol=0.02)


# --- replaceable MLP ------------------------------------------------------------------------------------------

class LowRankMLP(nnx.Module):
    """relu²(x U V) W: the hidden projection factored through rank r (a stand-in for later structured MLPs)."""
    rank = 8

    def __init__(self, cfg, *, rngs):
        self.u = linear(cfg.n_embd, self.rank, rngs=rngs)
        self.v = linear(self.rank, 4 * cfg.n_embd, rngs=rngs)
        self.w = linear(4 * cfg.n_embd, cfg.n_embd, rngs=rngs)

    def __call__(self, x_BTD):
        return self.w(jnp.square(jax.nn.relu(self.v(self.u(x_BTD)))))


def test_mlp_swap_without_touching_model():
    model = make(mlp=LowRankMLP)
    L, D, r = CFG.n_layer, CFG.n_embd, LowRankMLP.rank
    assert model.blocks.mlp.u.kernel[...].shape == (L, D, r)
    assert not hasattr(model.blocks.mlp, "c_fc")
    # The factored MLP is what runs: the train step's matmul count is the dense one with 8D² per layer replaced.
    flops_per_token, loss, grads = train_step(scan_layers=False, mlp=LowRankMLP)
    assert flops_per_token == estimate_flops(CFG) - 6 * L * (8 * D * D - (D * r + r * 4 * D + 4 * D * D))
    assert np.isfinite(loss) and np.any(grads["blocks"]["mlp"]["u"]["kernel"][...])


# --- freezing -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [True, False])
def test_frozen_prefix_gets_zero_grads_suffix_unchanged(scan_layers):
    k = K_FROZEN
    _, loss_full, g_full = train_step(scan_layers=scan_layers)
    _, loss_frozen, g_frozen = train_step(scan_layers=scan_layers, n_frozen=k)
    np.testing.assert_allclose(loss_frozen, loss_full, rtol=1e-6)
    assert not np.any(g_frozen["wte"]["embedding"][...]) and np.any(g_full["wte"]["embedding"][...])
    for prefix in jax.tree.leaves(jax.tree.map(lambda a: a[:k], g_frozen["blocks"])):
        assert not np.any(prefix)
    suffix = lambda g: jax.tree.map(lambda a: a[k:], g["blocks"])
    assert_trees_close(suffix(g_frozen), suffix(g_full), rtol=1e-5, atol=1e-7)
    assert_trees_close(g_frozen["lm_head"], g_full["lm_head"], rtol=1e-5, atol=1e-7)


# --- FLOPs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [True, False])
def test_train_step_flops_match_estimate(scan_layers):
    flops_per_token, _, _ = train_step(scan_layers=scan_layers)
    assert flops_per_token == estimate_flops(CFG)  # exactly 6N + 12·L·H·Dh·T


@pytest.mark.parametrize("scan_layers", [True, False])
def test_frozen_prefix_saves_its_backward_flops(scan_layers):
    k = K_FROZEN
    D, H, G, K, T, V = CFG.n_embd, CFG.n_head, CFG.n_kv_head, CFG.head_dim, CFG.sequence_len, CFG.vocab_size
    forward_block = 2 * (matmul_params(CFG) - D * V) // CFG.n_layer + 4 * H * K * T
    # frozen prefix: forward only; trainable suffix and lm_head: forward + backward = 3x.
    expected = k * forward_block + (CFG.n_layer - k) * 3 * forward_block + 6 * D * V
    if not scan_layers or CFG.n_layer - k == 1:
        # Unrolled, the first trainable block also skips dL/dx of q, k, v (its input is a constant); inside a
        # scan the carry's cotangent is computed on every trip, unless the scan has one trip (XLA inlines it).
        expected -= 2 * D * (H + 2 * G) * K
    flops_per_token, _, _ = train_step(scan_layers=scan_layers, n_frozen=k)
    assert flops_per_token == expected


# --- generation -----------------------------------------------------------------------------------------------

def test_kv_cached_greedy_equals_full_recompute():
    prompt = tokens(2, 5)
    out = generate(make(GQA_CFG), prompt, 11, temperature=0.0)
    assert out.shape == (2, 16)
    np.testing.assert_array_equal(out[:, :5], prompt)
    # Causality makes one forward over the final sequence equal to recomputing it after every new token.
    greedy = jnp.argmax(logits_of(make(GQA_CFG), out), axis=-1)
    np.testing.assert_array_equal(out[:, 5:], greedy[:, 4:-1])


def test_sampling_is_keyed_and_shaped():
    model, prompt = make(GQA_CFG), tokens(2, 5)
    a = generate(model, prompt, 11, temperature=1.0, key=jax.random.key(0))
    b = generate(model, prompt, 11, temperature=1.0, key=jax.random.key(0))
    c = generate(model, prompt, 11, temperature=1.0, key=jax.random.key(1))
    assert a.shape == (2, 16) and np.all((a >= 0) & (a < VOCAB))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :5], prompt)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(generate(model, prompt, 0), prompt)
