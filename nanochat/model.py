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

Recipes (`GPTConfig.from_depth(..., recipe=...)`, `RECIPES`): "classic" is the model above (the dataclass defaults,
so configs saved before the recipes existed load as classic). "current" is karpathy/nanochat's current gpt.py:
- value embeddings: on layers i with i % 2 == (L - 1) % 2, a per-layer token embedding ve [V, G*K] is added to the
  values, v += 3 * sigmoid(x[:12] @ W_gate) * ve, one gate per kv head (x = the block's normed input);
- smear: x_t += smear_lambda * sigmoid(x_t[:24] @ W_smear) * x_{t-1} on the normed token embedding (t >= 1);
- learned per-layer lambdas: before block i, x = resid_lambda_i * x + x0_lambda_i * x0 (x0 = smeared embedding);
- backout: the residual after block L // 2 is subtracted, scaled by backout_lambda, before the final norm;
- q and k scaled by qk_scale = 1.2 after QK-norm; rotary base 100000;
- sliding windows, pattern tiled over layers, last layer always long: "L" = full causal, "S" = the reference's short
  window (left context ceil(T/4/128)*128 tokens, i.e. that + 1 keys); masked dense in the "xla" attention;
- vocabulary padded to a multiple of 64 (wte and lm_head rows; logits are cut back to vocab_size before the
  soft-cap, so padded ids are never sampled and never enter the loss or bpb);
- init: wte std 0.8, block matrices uniform with std 1/sqrt(D), c_fc 0.4x that, the gates U(0, 0.02), the value
  embeddings like c_v, lambdas as in the reference (resid 1.15 -> 1.05, x0 0.20 -> 0.05 over depth, backout 0.2,
  smear 0).
Layers whose static kind differs (window, value embedding) cannot share one scan: the blocks run as scans over runs of
identical layers, so with "SSSL" and alternating value embeddings every layer is its own segment (unrolled).
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from mgr.errors import UserError
from mgr.flops import transformer_train_flops_per_token
from nanochat.attention import causal_attention, check_implementation
from nanochat.mlp import ReluSquaredMLP, linear, uniform_init

COMPUTE_DTYPES = ("float32", "bfloat16")
INITS = ("classic", "current")
RECIPES = {
    "classic": {},
    "current": dict(rope_base=100000.0, qk_scale=1.2, value_embeds=True, smear=True, backout=True,
                    layer_lambdas=True, window_pattern="SSSL", pad_vocab_to=64, init="current"),
}
VE_GATE_CHANNELS = 12
SMEAR_CHANNELS = 24


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
    qk_scale: float = 1.0
    value_embeds: bool = False
    smear: bool = False
    backout: bool = False
    layer_lambdas: bool = False
    window_pattern: str = "L"
    pad_vocab_to: int = 1
    init: str = "classic"

    def __post_init__(self):
        for name in ("vocab_size", "sequence_len", "n_layer", "n_head", "n_kv_head", "n_embd", "pad_vocab_to"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.window_pattern or set(self.window_pattern) - set("SL"):
            raise UserError(f"window_pattern must be a non-empty string of S and L, got {self.window_pattern!r}")
        if self.init not in INITS:
            raise UserError(f"init must be one of {INITS}, got {self.init!r}")
        for flag, channels in (("value_embeds", VE_GATE_CHANNELS), ("smear", SMEAR_CHANNELS)):
            if getattr(self, flag) and self.n_embd < channels:
                raise UserError(f"{flag} needs n_embd >= {channels}, got {self.n_embd}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            raise UserError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Per-layer attention window in keys (None: full causal). The last layer is always full."""
        short = -(-self.sequence_len // 4 // 128) * 128 + 1  # the reference's left context + the query itself
        short = None if short >= self.sequence_len else short
        pattern = self.window_pattern
        return tuple(None if i == self.n_layer - 1 or pattern[i % len(pattern)] == "L" else short
                     for i in range(self.n_layer))

    def has_ve(self, layer: int) -> bool:
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2

    @property
    def ve_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layer) if self.has_ve(i))

    @property
    def backout_layer(self) -> int | None:
        return self.n_layer // 2 if self.backout else None

    @classmethod
    def from_depth(cls, depth: int, *, vocab_size: int, sequence_len: int, head_dim: int | None = None,
                   n_kv_head: int | None = None, recipe: str = "classic", **overrides) -> "GPTConfig":
        """nanochat's one dial: width = 64 * depth, n_layer = depth, n_head = width // head_dim.

        head_dim=None picks 64, or 128 once the model is wide (width >= 1024, i.e. depth >= 16) and width divides
        by 128 (nanochat uses 128 throughout; 64 keeps enough heads in small models). n_kv_head defaults to n_head.
        recipe: a key of RECIPES ("classic": today's model; "current": the reference's newer parts); overrides
        win over the recipe's values.
        """
        if depth < 1:
            raise UserError(f"depth must be >= 1, got {depth}")
        if recipe not in RECIPES:
            raise UserError(f"unknown recipe {recipe!r}; choose one of {tuple(RECIPES)}")
        overrides = {**RECIPES[recipe], **overrides}
        width = 64 * depth
        if head_dim is None:
            head_dim = 128 if width >= 1024 and width % 128 == 0 else 64
        if head_dim < 1 or width % head_dim:
            raise UserError(f"head_dim={head_dim} does not divide width {width} (depth {depth})")
        n_head = width // head_dim
        return cls(vocab_size=vocab_size, sequence_len=sequence_len, n_layer=depth, n_head=n_head,
                   n_kv_head=n_head if n_kv_head is None else n_kv_head, n_embd=width, **overrides)


def matmul_params(cfg: GPTConfig, mlp_density: float = 1.0) -> int:
    """Parameters that enter a matmul: all block matrices, the value-embedding and smear gates, and lm_head (padded
    rows included: they are computed, then cut); not the embeddings (lookups) or lambdas. The MLP's two matrices
    keep the fraction ``mlp_density`` of their weights (1 = the default dense MLP; a banded one is less)."""
    D, K = cfg.n_embd, cfg.head_dim
    attn = D * (cfg.n_head + 2 * cfg.n_kv_head) * K + cfg.n_head * K * D
    mlp = round(2 * D * 4 * D * mlp_density)
    gates = len(cfg.ve_layers) * VE_GATE_CHANNELS * cfg.n_kv_head + (SMEAR_CHANNELS if cfg.smear else 0)
    return cfg.n_layer * (attn + mlp) + gates + D * cfg.padded_vocab_size


def estimate_flops(cfg: GPTConfig, mlp_density: float = 1.0, *, masked_dense: bool = False) -> float:
    """Training FLOPs per token (nanochat/PaLM): 6 * matmul params + 12 * n_head * head_dim * T_eff per layer.

    T_eff is the layer's window (the reference's estimate_flops counts a window as its length), or T. With
    masked_dense=True every layer counts T: what the "xla" attention executes, since it masks windows densely.
    Valid for the relu^2 MLP, dense or with a fraction ``mlp_density`` of its weights executed (banded); other
    swapped-in MLPs are priced with mgr.flops on the real step.
    """
    T = cfg.sequence_len
    per_layer_T = [T if w is None or masked_dense else min(w, T) for w in cfg.windows]
    attn = sum(transformer_train_flops_per_token(0, 1, cfg.n_head, cfg.head_dim, t) for t in per_layer_T)
    return transformer_train_flops_per_token(matmul_params(cfg, mlp_density), 0, cfg.n_head, cfg.head_dim, T) + attn


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
        self.n_head, self.n_kv_head, self.head_dim, self.qk_scale = cfg.n_head, cfg.n_kv_head, K, cfg.qk_scale
        uniform = cfg.init == "current"
        std = D ** -0.5 if uniform else None
        self.c_q = linear(D, cfg.n_head * K, rngs=rngs, std=std, uniform=uniform)
        self.c_k = linear(D, cfg.n_kv_head * K, rngs=rngs, std=std, uniform=uniform)
        self.c_v = linear(D, cfg.n_kv_head * K, rngs=rngs, std=std, uniform=uniform)
        self.c_proj = linear(cfg.n_head * K, D, rngs=rngs, zero=True)

    def __call__(self, x_BTD, cos_sin, *, implementation: str, kv=None, pos=None, window=None, ve=None):
        """kv=None: plain causal attention. kv=(k_BSGK, v_BSGK) cache buffers: this chunk's keys/values are written at
        position `pos` and the queries attend over the whole buffer (positions beyond are masked causally).
        window: keys per query (None: all earlier ones). ve=(ve_BTGK, gate_CG): value embedding and its gate."""
        B, T, _ = x_BTD.shape
        q_BTHK = self.c_q(x_BTD).reshape(B, T, self.n_head, self.head_dim)
        k_BTGK = self.c_k(x_BTD).reshape(B, T, self.n_kv_head, self.head_dim)
        v_BTGK = self.c_v(x_BTD).reshape(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            ve_BTGK, gate_CG = ve
            gate_BTG = 3 * jax.nn.sigmoid(x_BTD[..., :gate_CG.shape[0]] @ gate_CG)
            v_BTGK = v_BTGK + gate_BTG[..., None] * ve_BTGK
        q_BTHK = rms_norm(apply_rotary(q_BTHK, cos_sin))
        k_BTGK = rms_norm(apply_rotary(k_BTGK, cos_sin))
        if self.qk_scale != 1.0:
            q_BTHK, k_BTGK = q_BTHK * self.qk_scale, k_BTGK * self.qk_scale
        if kv is None:
            o_BTHK = causal_attention(q_BTHK, k_BTGK, v_BTGK, implementation=implementation, window=window)
        else:
            kv = tuple(jax.lax.dynamic_update_slice_in_dim(buf_BSGK, new_BTGK.astype(buf_BSGK.dtype), pos, axis=1)
                       for buf_BSGK, new_BTGK in zip(kv, (k_BTGK, v_BTGK)))
            o_BTHK = causal_attention(q_BTHK, *kv, implementation=implementation, q_offset=pos, window=window)
        return self.c_proj(o_BTHK.reshape(B, T, -1)), kv


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, mlp, *, rngs: nnx.Rngs):
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.mlp = mlp(cfg, rngs=rngs)

    def __call__(self, x_BTD, cos_sin, *, implementation: str, kv=None, pos=None, window=None, ve=None):
        a_BTD, kv = self.attn(rms_norm(x_BTD), cos_sin, implementation=implementation, kv=kv, pos=pos,
                              window=window, ve=ve)
        x_BTD = x_BTD + a_BTD
        # The cast keeps the scan carry's dtype fixed even if a swapped-in MLP returns a wider dtype.
        return x_BTD + self.mlp(rms_norm(x_BTD)).astype(x_BTD.dtype), kv


def _layers(tree, start: int, stop: int):
    return jax.tree.map(lambda a: a[start:stop], tree)


def _param(init, key, shape) -> nnx.Param:
    return nnx.Param(init(key, shape, jnp.float32))


class GPT(nnx.Module):
    """`GPT(cfg, rngs=nnx.Rngs(seed))`; `model(idx_BT, n_frozen=0) -> logits_BTV` (fp32, soft-capped, vocab_size
    wide whatever the padding).

    mlp: MLP factory (see nanochat/mlp.py). dtype: compute dtype, "float32" or "bfloat16". scan_layers: run the
    blocks as a lax.scan (True) or unrolled. attention: one of nanochat.attention.IMPLEMENTATIONS ("auto" is resolved
    before a model is built: nanochat.attention.choose).
    dtype, scan_layers and attention are plain attributes: they may be reassigned on an existing model.
    Parameters of the current recipe's parts (value_embeds [n_ve, V, G*K], ve_gates [n_ve, 12, G], resid_lambdas and
    x0_lambdas [L], smear_gate [24, 1], smear_lambda and backout_lambda [1]) exist only when their option is on.
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
        V, D, L = cfg.padded_vocab_size, cfg.n_embd, cfg.n_layer
        self.wte = nnx.Embed(V, D, embedding_init=nnx.initializers.normal(0.8 if cfg.init == "current" else 1.0),
                             rngs=rngs)

        @nnx.vmap(in_axes=0, out_axes=0)
        def make_blocks(key):
            return Block(cfg, mlp, rngs=nnx.Rngs(key))

        self.blocks = make_blocks(jax.random.split(rngs.params(), L))
        # Small rather than zero (nanochat's original choice) so every parameter gets a gradient on step one.
        self.lm_head = linear(D, V, rngs=rngs, std=1e-3)
        gate_init = uniform_init(0.0, 0.02)
        if cfg.value_embeds:
            bound = 3 ** 0.5 * D ** -0.5  # like c_v under the current init
            G = cfg.n_kv_head
            self.value_embeds = _param(uniform_init(-bound, bound), rngs.params(),
                                       (len(cfg.ve_layers), V, G * cfg.head_dim))
            self.ve_gates = _param(gate_init, rngs.params(), (len(cfg.ve_layers), VE_GATE_CHANNELS, G))
        if cfg.layer_lambdas:
            frac = jnp.arange(L, dtype=jnp.float32) / max(L - 1, 1)
            self.resid_lambdas = nnx.Param(1.15 - 0.10 * frac)
            self.x0_lambdas = nnx.Param(0.20 - 0.15 * frac)
        if cfg.smear:
            self.smear_gate = _param(gate_init, rngs.params(), (SMEAR_CHANNELS, 1))
            self.smear_lambda = nnx.Param(jnp.zeros((1,), jnp.float32))
        if cfg.backout:
            self.backout_lambda = nnx.Param(jnp.full((1,), 0.2, jnp.float32))

    def __call__(self, idx_BT: jax.Array, *, n_frozen: int = 0) -> jax.Array:
        L = self.cfg.n_layer
        if not 0 <= n_frozen <= L:
            raise UserError(f"n_frozen must be in [0, {L}], got {n_frozen}")
        x_BTD, cos_sin = self._embed(idx_BT, jnp.arange(idx_BT.shape[1]))
        graphdef, state = self._block_state()
        carry = (x_BTD, x_BTD, None)
        if n_frozen > 0:
            carry, _ = self._run_layers(graphdef, state, idx_BT, carry, cos_sin, 0, n_frozen, self.attention)
            carry = jax.lax.stop_gradient(carry)
        if n_frozen < L:
            carry, _ = self._run_layers(graphdef, state, idx_BT, carry, cos_sin, n_frozen, L, self.attention)
        return self._head(carry)

    def mlp_input(self, idx_BT: jax.Array, layer: int) -> jax.Array:
        """x_BTD that block `layer`'s MLP reads, rms_norm(h + attn(rms_norm(h))) with h the residual stream entering
        the block: the calibration activations of a trained layer (nanochat/export.py)."""
        x_BTD, cos_sin = self._embed(idx_BT, jnp.arange(idx_BT.shape[1]))
        graphdef, state = self._block_state()
        carry = (x_BTD, x_BTD, None)
        if layer:
            carry, _ = self._run_layers(graphdef, state, idx_BT, carry, cos_sin, 0, layer, self.attention)
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state))
        h_BTD = self._mix_x0(carry[0], carry[1], layer, layer + 1)
        a_BTD, _ = block.attn(rms_norm(h_BTD), cos_sin, implementation=self.attention, window=self.cfg.windows[layer],
                              ve=self._value_embeds(idx_BT, layer, layer + 1, stacked=False))
        return rms_norm(h_BTD + a_BTD)

    def init_kv_cache(self, batch: int, length: int):
        shape = (self.cfg.n_layer, batch, length, self.cfg.n_kv_head, self.cfg.head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def decode(self, idx_BT: jax.Array, kv, pos, prev_B: jax.Array | None = None):
        """Forward a chunk of tokens at absolute positions pos.. with the KV cache `kv` ([L, B, S, G, K] pair);
        returns (logits_BTV, updated kv). prev_B: the token at pos - 1 (None at pos 0), which the smear mixes into
        the chunk's first token. Always uses "xla" attention: only it supports a query offset."""
        x_BTD, cos_sin = self._embed(idx_BT, pos + jnp.arange(idx_BT.shape[1]), prev_B)
        graphdef, state = self._block_state()
        carry, kv = self._run_layers(graphdef, state, idx_BT, (x_BTD, x_BTD, None), cos_sin, 0, self.cfg.n_layer,
                                     "xla", kv, pos)
        return self._head(carry), kv

    def _embed(self, idx_BT, positions_T, prev_B=None):
        cos_sin = rotary_cos_sin(positions_T, self.cfg.head_dim, self.cfg.rope_base, self.dtype)
        x_BTD = rms_norm(self.wte(idx_BT).astype(self.dtype))
        if not self.cfg.smear:
            return x_BTD, cos_sin
        w_C1 = self.smear_gate[...].astype(self.dtype)
        lam = self.smear_lambda[...].astype(self.dtype)
        if prev_B is None:  # the first position has no predecessor
            if idx_BT.shape[1] == 1:
                return x_BTD, cos_sin
            x_BTD, prev_BTD, first_BTD = x_BTD[:, 1:], x_BTD[:, :-1], x_BTD[:, :1]
        else:
            prev_BTD = jnp.concatenate([rms_norm(self.wte(prev_B[:, None]).astype(self.dtype)), x_BTD[:, :-1]], 1)
            first_BTD = x_BTD[:, :0]
        gate_BT1 = lam * jax.nn.sigmoid(x_BTD[..., :SMEAR_CHANNELS] @ w_C1)
        return jnp.concatenate([first_BTD, x_BTD + gate_BT1 * prev_BTD], axis=1), cos_sin

    def _block_state(self):
        graphdef, state = nnx.split(self.blocks)
        cast = lambda a: a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
        return graphdef, jax.tree.map(cast, state)

    def _segments(self, start: int, stop: int) -> list[tuple[int, int]]:
        """[a, b) runs of consecutive layers in [start, stop) of one static kind (window, value embedding); a run
        also ends after the backout layer, whose output the head needs."""
        cfg = self.cfg
        kind = lambda i: (cfg.windows[i], cfg.has_ve(i))
        cuts = [i for i in range(start + 1, stop) if kind(i) != kind(i - 1) or i - 1 == cfg.backout_layer]
        bounds = [start, *cuts, stop]
        return list(zip(bounds[:-1], bounds[1:]))

    def _value_embeds(self, idx_BT, start: int, stop: int, *, stacked: bool = True):
        """(ve_[n]BTGK, gate_[n]CG) of layers [start, stop) (all with or all without value embeddings), or None."""
        if not self.cfg.has_ve(start):
            return None
        rows = [self.cfg.ve_layers.index(i) for i in range(start, stop)]
        B, T = idx_BT.shape
        tables = self.value_embeds[...][jnp.array(rows)].astype(self.dtype)
        ve_nBTGK = tables[:, idx_BT].reshape(len(rows), B, T, self.cfg.n_kv_head, self.cfg.head_dim)
        gates_nCG = self.ve_gates[...][jnp.array(rows)].astype(self.dtype)
        return (ve_nBTGK, gates_nCG) if stacked else (ve_nBTGK[0], gates_nCG[0])

    def _mix_x0(self, x_BTD, x0_BTD, start: int, stop: int):
        """x entering layer `start` after its learned residual / x0 mix (identity without layer lambdas)."""
        if not self.cfg.layer_lambdas:
            return x_BTD
        r, a = (lam[...][start].astype(self.dtype) for lam in (self.resid_lambdas, self.x0_lambdas))
        return r * x_BTD + a * x0_BTD

    def _run_layers(self, graphdef, state, idx_BT, carry, cos_sin, start, stop, implementation, kv=None, pos=None):
        """Blocks [start, stop) on carry = (x, x0, x after the backout layer or None); returns (carry, kv of these
        layers). kv and state are whole-model ([L, ...]); each segment runs as one scan (or unrolled)."""
        x_BTD, x0_BTD, backout_BTD = carry
        kvs = []
        for a, b in self._segments(start, stop):
            extras = {"ve": self._value_embeds(idx_BT, a, b)}
            if self.cfg.layer_lambdas:
                extras["lambdas"] = tuple(lam[...][a:b].astype(self.dtype)
                                          for lam in (self.resid_lambdas, self.x0_lambdas))
            x_BTD, seg_kv = self._run_blocks(graphdef, _layers(state, a, b), x_BTD, x0_BTD, cos_sin, implementation,
                                             None if kv is None else _layers(kv, a, b), pos, self.cfg.windows[a],
                                             extras)
            kvs.append(seg_kv)
            if b - 1 == self.cfg.backout_layer:
                backout_BTD = x_BTD
        kv = None if kv is None else jax.tree.map(lambda *a: jnp.concatenate(a), *kvs)
        return (x_BTD, x0_BTD, backout_BTD), kv

    def _run_blocks(self, graphdef, state, x_BTD, x0_BTD, cos_sin, implementation, kv, pos, window, extras):
        def apply_block(x_BTD, layer):
            layer_state, layer_kv, layer_extras = layer
            block = nnx.merge(graphdef, layer_state)
            if "lambdas" in layer_extras:
                r, a = layer_extras["lambdas"]
                x_BTD = r * x_BTD + a * x0_BTD
            return block(x_BTD, cos_sin, implementation=implementation, kv=layer_kv, pos=pos, window=window,
                         ve=layer_extras["ve"])

        xs = (state, kv, extras)
        if self.scan_layers:
            return jax.lax.scan(apply_block, x_BTD, xs)
        kvs = []
        for i in range(jax.tree.leaves(state)[0].shape[0]):
            x_BTD, layer_kv = apply_block(x_BTD, jax.tree.map(lambda a: a[i], xs))
            kvs.append(layer_kv)
        return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *kvs)

    def _head(self, carry):
        x_BTD, _, backout_BTD = carry
        if backout_BTD is not None:
            x_BTD = x_BTD - self.backout_lambda[...].astype(self.dtype) * backout_BTD
        w_DV = self.lm_head.kernel[...].astype(self.dtype)
        logits_BTV = jnp.einsum("btd,dv->btv", rms_norm(x_BTD), w_DV, preferred_element_type=jnp.float32)
        if self.cfg.padded_vocab_size != self.cfg.vocab_size:
            logits_BTV = logits_BTV[..., :self.cfg.vocab_size]
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
        tok_B, prev_B, kv, pos = carry
        logits_B1V, kv = model.decode(tok_B[:, None], kv, pos, prev_B)
        return (sample(logits_B1V[:, 0], key), tok_B, kv, pos + 1), tok_B

    (last_B, _, _, _), toks_NB = jax.lax.scan(step, (first_B, prompt_BT[:, -1], kv, T0), keys[1:])
    return jnp.concatenate([prompt_BT, toks_NB.T, last_B[:, None]], axis=1)
