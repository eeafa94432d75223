"""Causal softmax attention behind one function with an `implementation` switch.

"xla" is the default because it is written as two explicit einsums: the jaxpr walk of the FLOPs estimator sees
QK^T and AV as dot_generals (full T x S, the PaLM/nanochat convention), and it is the only implementation that
supports a query offset (KV-cached decoding). "jax" and "cudnn" go through `jax.nn.dot_product_attention`.

Sliding windows (`window=w`: query t sees keys s with t - w < s <= t) are masked dense in "xla": the scores of the
whole T x S square are computed and the keys outside the window are masked, so a window saves no FLOPs here and
mgr.flops prices it as full attention. "jax"/"cudnn" get the window as jax's `local_window_size`.

Shapes: B batch, T queries, S keys, H query heads, G key/value heads (GQA: H % G == 0, R = H // G), K head dim.
"""

import jax
import jax.numpy as jnp

from mgr.errors import UserError

IMPLEMENTATIONS = ("xla", "cudnn", "jax")


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise UserError(f"attention implementation 'cudnn' needs a GPU (backend is {jax.default_backend()!r})")


def causal_attention(q_BTHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, *, implementation: str = "xla",
                     q_offset: int | jax.Array | None = None, window: int | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v where query t (absolute position p = q_offset + t) sees keys s <= p, and with
    `window=w` only keys p - w < s <= p (w keys, itself included). window=None is full causal attention.

    q_offset=None means queries and keys are the same positions (training; T == S). A non-None q_offset (KV cache:
    keys are a whole cache buffer, queries start at position q_offset) is only supported by "xla".
    """
    check_implementation(implementation)
    _, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    if H % G:
        raise UserError(f"n_head={H} must be a multiple of n_kv_head={G}")
    if window is not None and window < 1:
        raise UserError(f"attention window must be >= 1 (or None for full causal), got {window}")
    if implementation == "xla":
        return _xla_attention(q_BTHK, k_BSGK, v_BSGK, 0 if q_offset is None else q_offset, window)
    if q_offset is not None or T != S:
        raise UserError(f"attention implementation {implementation!r} supports only aligned causal attention (T == S)")
    if implementation == "cudnn" and q_BTHK.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(f"attention implementation 'cudnn' needs bfloat16 or float16 inputs, got {q_BTHK.dtype}")
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, is_causal=True, local_window_size=local,
                                        implementation=None if implementation == "jax" else "cudnn")


def _xla_attention(q_BTHK, k_BSGK, v_BSGK, q_offset, window):
    B, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    # Query heads are grouped by the kv head they share, so K/V are never materialised H/G times.
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    # Scores and softmax in fp32 whatever the compute dtype: bf16 logits lose the small differences that matter.
    s_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK, preferred_element_type=jnp.float32) * K ** -0.5
    pos_T1 = (q_offset + jnp.arange(T))[:, None]
    visible_TS = jnp.arange(S)[None, :] <= pos_T1
    if window is not None:
        visible_TS = visible_TS & (jnp.arange(S)[None, :] > pos_T1 - window)
    s_BGRTS = jnp.where(visible_TS, s_BGRTS, jnp.finfo(jnp.float32).min)
    p_BGRTS = jax.nn.softmax(s_BGRTS, axis=-1).astype(v_BSGK.dtype)
    o_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", p_BGRTS, v_BSGK)
    return o_BTGRK.reshape(B, T, H, K)
