"""nanochat-style GPT in Flax NNX.

Architecture (karpathy/nanochat gpt.py): token embedding -> parameter-free RMSNorm -> n_layer pre-norm residual
blocks (causal self-attention with rotary embeddings, QK-norm after rotary, GQA; relu^2 MLP, 4x wide) -> RMSNorm ->
untied lm_head -> logit soft-cap 15*tanh(z/15). No biases; no learnable norm parameters.

Layout: the blocks are created once per layer with `nnx.vmap`, so every block variable carries a leading layer axis
[L, ...]. The forward splits that stacked state and runs a pure per-block function either as one `jax.lax.scan`
(`scan_layers=True`: compile time independent of depth) or as a Python loop over layer slices (same numbers).

Precision: parameters are fp32 master weights; the forward casts them (and the activations) to `dtype`, and returns
logits in fp32. Attention scores/softmax and norms are computed in fp32 whatever `dtype` is.

Freezing: `model(idx, n_frozen=k)` stops the gradient of the activation entering block k, so the embedding and blocks
[0, k) get exactly zero gradient and no backward work; prefix and suffix run as two scans over static slices.
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from mgr.errors import UserError
from mgr.flops import transformer_train_flops_per_token
from nanochat.attention import causal_attention, check_implementation
from nanochat.mlp import ReluSquaredMLP, linear

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    sequence_len: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    rope_base: float = 10000.0
    logit_softcap: float = 15.0

    def __post_init__(self):
        for name in ("vocab_size", "sequence_len", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            raise UserError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, *, vocab_size: int, sequence_len: int, head_dim: int | None = None,
                   n_kv_head: int | None = None, **overrides) -> "GPTConfig":
        """nanochat's one dial: width = 64 * depth, n_layer = depth, n_head = width // head_dim.

        head_dim=None picks 64, or 128 once the model is wide (width >= 1024, i.e. depth >= 16) and width divides
        by 128 (nanochat uses 128 throughout; 64 keeps enough heads in small models). n_kv_head defaults to n_head.
        """
        if depth < 1:
            raise UserError(f"depth must be >= 1, got {depth}")
        width = 64 * depth
        if head_dim is None:
            head_dim = 128 if width >= 1024 and width % 128 == 0 else 64
        if head_dim < 1 or width % head_dim:
            raise UserError(f"head_dim={head_dim} does not divide width {width} (depth {depth})")
        n_head = width // head_dim
        return cls(vocab_size=vocab_size, sequence_len=sequence_len, n_layer=depth, n_head=n_head,
                   n_kv_head=n_head if n_kv_head is None else n_kv_head, n_embd=width, **overrides)


def matmul_params(cfg: GPTConfig, mlp_density: float = 1.0) -> int:
    """Parameters that enter a matmul: all block matrices plus lm_head (not the embedding); the MLP's two matrices
    keep the fraction ``mlp_density`` of their weights (1 = the default dense MLP; a banded one is less)."""
    D, K = cfg.n_embd, cfg.head_dim
    attn = D * (cfg.n_head + 2 * cfg.n_kv_head) * K + cfg.n_head * K * D
    mlp = round(2 * D * 4 * D * mlp_density)
    return cfg.n_layer * (attn + mlp) + D * cfg.vocab_size


def estimate_flops(cfg: GPTConfig, mlp_density: float = 1.0) -> float:
    """Training FLOPs per token (nanochat/PaLM): 6 * matmul params + 12 * n_layer * n_head * head_dim * T.

    Valid for the relu^2 MLP, dense or with a fraction ``mlp_density`` of its weights executed (banded); other
    swapped-in MLPs are priced with mgr.flops on the real step.
    """
    return transformer_train_flops_per_token(matmul_params(cfg, mlp_density), cfg.n_layer, cfg.n_head,
                                             cfg.head_dim, cfg.sequence_len)


def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Parameter-free RMSNorm over the last axis, computed in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rotary_cos_sin(positions_T: jax.Array, head_dim: int, base: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [1, T, 1, head_dim/2] for the given absolute positions (computed on the fly: tiny)."""
    inv_freq_F = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_TF = positions_T.astype(jnp.float32)[:, None] * inv_freq_F[None, :]
    return jnp.cos(angle_TF)[None, :, None, :].astype(dtype), jnp.sin(angle_TF)[None, :, None, :].astype(dtype)


def apply_rotary(x_BTHK: jax.Array, cos_sin: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate the pairs (x[i], x[i + K/2]) (nanochat's half-split layout, not interleaved)."""
    cos, sin = cos_sin
    x1, x2 = jnp.split(x_BTHK, 2, axis=-1)
    return jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        D, K = cfg.n_embd, cfg.head_dim
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, K
        self.c_q = linear(D, cfg.n_head * K, rngs=rngs)
        self.c_k = linear(D, cfg.n_kv_head * K, rngs=rngs)
        self.c_v = linear(D, cfg.n_kv_head * K, rngs=rngs)
        self.c_proj = linear(cfg.n_head * K, D, rngs=rngs, zero=True)

    def __call__(self, x_BTD, cos_sin, *, implementation: str, kv=None, pos=None):
        """kv=None: plain causal attention. kv=(k_BSGK, v_BSGK) cache buffers: this chunk's keys/values are written at
        position `pos` and the queries attend over the whole buffer (positions beyond are masked causally)."""
        B, T, _ = x_BTD.shape
        q_BTHK = self.c_q(x_BTD).reshape(B, T, self.n_head, self.head_dim)
        k_BTGK = self.c_k(x_BTD).reshape(B, T, self.n_kv_head, self.head_dim)
        v_BTGK = self.c_v(x_BTD).reshape(B, T, self.n_kv_head, self.head_dim)
        q_BTHK = rms_norm(apply_rotary(q_BTHK, cos_sin))
        k_BTGK = rms_norm(apply_rotary(k_BTGK, cos_sin))
        if kv is None:
            o_BTHK = causal_attention(q_BTHK, k_BTGK, v_BTGK, implementation=implementation)
        else:
            kv = tuple(jax.lax.dynamic_update_slice_in_dim(buf_BSGK, new_BTGK.astype(buf_BSGK.dtype), pos, axis=1)
                       for buf_BSGK, new_BTGK in zip(kv, (k_BTGK, v_BTGK)))
            o_BTHK = causal_attention(q_BTHK, *kv, implementation=implementation, q_offset=pos)
        return self.c_proj(o_BTHK.reshape(B, T, -1)), kv


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, mlp, *, rngs: nnx.Rngs):
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.mlp = mlp(cfg, rngs=rngs)

    def __call__(self, x_BTD, cos_sin, *, implementation: str, kv=None, pos=None):
        a_BTD, kv = self.attn(rms_norm(x_BTD), cos_sin, implementation=implementation, kv=kv, pos=pos)
        x_BTD = x_BTD + a_BTD
        # The cast keeps the scan carry's dtype fixed even if a swapped-in MLP returns a wider dtype.
        return x_BTD + self.mlp(rms_norm(x_BTD)).astype(x_BTD.dtype), kv


def _layers(tree, start: int, stop: int):
    return jax.tree.map(lambda a: a[start:stop], tree)


class GPT(nnx.Module):
    """`GPT(cfg, rngs=nnx.Rngs(seed))`; `model(idx_BT, n_frozen=0) -> logits_BTV` (fp32, soft-capped).

    mlp: MLP factory (see nanochat/mlp.py). dtype: compute dtype, "float32" or "bfloat16". scan_layers: run the
    blocks as a lax.scan (True) or unrolled. attention: one of nanochat.attention.IMPLEMENTATIONS ("auto" is resolved
    before a model is built: nanochat.attention.choose).
    dtype, scan_layers and attention are plain attributes: they may be reassigned on an existing model.
    """

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, mlp=ReluSquaredMLP, dtype="float32",
                 scan_layers: bool = True, attention: str = "xla"):
        if jnp.dtype(dtype).name not in COMPUTE_DTYPES:
            raise UserError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {jnp.dtype(dtype).name}")
        check_implementation(attention)
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.scan_layers = scan_layers
        self.attention = attention
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)

        @nnx.vmap(in_axes=0, out_axes=0)
        def make_blocks(key):
            return Block(cfg, mlp, rngs=nnx.Rngs(key))

        self.blocks = make_blocks(jax.random.split(rngs.params(), cfg.n_layer))
        # Small rather than zero (nanochat's original choice) so every parameter gets a gradient on step one.
        self.lm_head = linear(cfg.n_embd, cfg.vocab_size, rngs=rngs, std=1e-3)

    def __call__(self, idx_BT: jax.Array, *, n_frozen: int = 0) -> jax.Array:
        L = self.cfg.n_layer
        if not 0 <= n_frozen <= L:
            raise UserError(f"n_frozen must be in [0, {L}], got {n_frozen}")
        x_BTD, cos_sin = self._embed(idx_BT, jnp.arange(idx_BT.shape[1]))
        graphdef, state = self._block_state()
        if n_frozen > 0:
            x_BTD, _ = self._run_blocks(graphdef, _layers(state, 0, n_frozen), x_BTD, cos_sin, self.attention)
            x_BTD = jax.lax.stop_gradient(x_BTD)
        if n_frozen < L:
            x_BTD, _ = self._run_blocks(graphdef, _layers(state, n_frozen, L), x_BTD, cos_sin, self.attention)
        return self._head(x_BTD)

    def mlp_input(self, idx_BT: jax.Array, layer: int) -> jax.Array:
        """x_BTD that block `layer`'s MLP reads, rms_norm(h + attn(rms_norm(h))) with h the residual stream entering
        the block: the calibration activations of a trained layer (nanochat/export.py)."""
        x_BTD, cos_sin = self._embed(idx_BT, jnp.arange(idx_BT.shape[1]))
        graphdef, state = self._block_state()
        if layer:
            x_BTD, _ = self._run_blocks(graphdef, _layers(state, 0, layer), x_BTD, cos_sin, self.attention)
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state))
        a_BTD, _ = block.attn(rms_norm(x_BTD), cos_sin, implementation=self.attention)
        return rms_norm(x_BTD + a_BTD)

    def init_kv_cache(self, batch: int, length: int):
        shape = (self.cfg.n_layer, batch, length, self.cfg.n_kv_head, self.cfg.head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def decode(self, idx_BT: jax.Array, kv, pos):
        """Forward a chunk of tokens at absolute positions pos.. with the KV cache `kv` ([L, B, S, G, K] pair);
        returns (logits_BTV, updated kv). Always uses "xla" attention: only it supports a query offset."""
        x_BTD, cos_sin = self._embed(idx_BT, pos + jnp.arange(idx_BT.shape[1]))
        graphdef, state = self._block_state()
        x_BTD, kv = self._run_blocks(graphdef, state, x_BTD, cos_sin, "xla", kv, pos)
        return self._head(x_BTD), kv

    def _embed(self, idx_BT, positions_T):
        cos_sin = rotary_cos_sin(positions_T, self.cfg.head_dim, self.cfg.rope_base, self.dtype)
        return rms_norm(self.wte(idx_BT).astype(self.dtype)), cos_sin

    def _block_state(self):
        graphdef, state = nnx.split(self.blocks)
        cast = lambda a: a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
        return graphdef, jax.tree.map(cast, state)

    def _run_blocks(self, graphdef, state, x_BTD, cos_sin, implementation, kv=None, pos=None):
        def apply_block(x_BTD, layer):
            layer_state, layer_kv = layer
            block = nnx.merge(graphdef, layer_state)
            return block(x_BTD, cos_sin, implementation=implementation, kv=layer_kv, pos=pos)

        if self.scan_layers:
            return jax.lax.scan(apply_block, x_BTD, (state, kv))
        kvs = []
        for i in range(jax.tree.leaves(state)[0].shape[0]):
            x_BTD, layer_kv = apply_block(x_BTD, jax.tree.map(lambda a: a[i], (state, kv)))
            kvs.append(layer_kv)
        return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *kvs)

    def _head(self, x_BTD):
        w_DV = self.lm_head.kernel[...].astype(self.dtype)
        logits_BTV = jnp.einsum("btd,dv->btv", rms_norm(x_BTD), w_DV, preferred_element_type=jnp.float32)
        cap = self.cfg.logit_softcap
        return cap * jnp.tanh(logits_BTV / cap)


def loss_fn(model: GPT, idx_BT: jax.Array, targets_BT: jax.Array, *, mask_BT: jax.Array | None = None,
            n_frozen: int = 0) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy in nats over counted targets, per-token nats_BT with 0 where not counted).

    A target counts when it is >= 0 (nanochat's ignore_index=-1) and mask_BT, if given, is true there.
    Use as `jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), x, y)[0])`.
    """
    logits_BTV = model(idx_BT, n_frozen=n_frozen)
    counted_BT = targets_BT >= 0
    if mask_BT is not None:
        counted_BT = counted_BT & mask_BT.astype(bool)
    target_logit_BT = jnp.take_along_axis(logits_BTV, jnp.maximum(targets_BT, 0)[..., None], axis=-1)[..., 0]
    nats_BT = jnp.where(counted_BT, jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit_BT, 0.0)
    return nats_BT.sum() / jnp.maximum(counted_BT.sum(), 1), nats_BT


def generate(model: GPT, prompt_BT: jax.Array, max_new_tokens: int, temperature: float = 1.0,
             key: jax.Array | None = None) -> jax.Array:
    """Sample `max_new_tokens` after the int prompts `prompt_BT` with a KV cache (one prefill, then one cached step
    per token); returns [B, T0 + max_new_tokens], prompt first. temperature 0 is greedy; otherwise `key` is required.
    """
    prompt_BT = jnp.asarray(prompt_BT)
    if prompt_BT.ndim != 2 or prompt_BT.shape[1] == 0:
        raise UserError(f"prompt_BT must be a non-empty [B, T] array, got shape {prompt_BT.shape}")
    if max_new_tokens < 0 or temperature < 0:
        raise UserError(f"need max_new_tokens >= 0 and temperature >= 0, got {max_new_tokens}, {temperature}")
    if max_new_tokens == 0:
        return prompt_BT
    if temperature > 0 and key is None:
        raise UserError("sampling with temperature > 0 needs a PRNG key")
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if key is None else key
    return _generate(graphdef, state, prompt_BT, key, jnp.float32(temperature), max_new_tokens=max_new_tokens)


@partial(jax.jit, static_argnums=0, static_argnames="max_new_tokens")
def _generate(graphdef, state, prompt_BT, key, temperature, *, max_new_tokens):
    model = nnx.merge(graphdef, state)
    B, T0 = prompt_BT.shape

    def sample(logits_BV, key):
        # Temperature is traced so greedy and sampled decoding share one compiled program.
        sampled_B = jax.random.categorical(key, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1)
        return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BV, axis=-1)).astype(prompt_BT.dtype)

    keys = jax.random.split(key, max_new_tokens)
    logits_BTV, kv = model.decode(prompt_BT, model.init_kv_cache(B, T0 + max_new_tokens), 0)
    first_B = sample(logits_BTV[:, -1], keys[0])

    def step(carry, key):
        tok_B, kv, pos = carry
        logits_B1V, kv = model.decode(tok_B[:, None], kv, pos)
        return (sample(logits_B1V[:, 0], key), kv, pos + 1), tok_B

    (last_B, _, _), toks_NB = jax.lax.scan(step, (first_B, kv, T0), keys[1:])
    return jnp.concatenate([prompt_BT, toks_NB.T, last_B[:, None]], axis=1)
