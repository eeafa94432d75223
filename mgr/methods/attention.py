"""Softmax attention kernels behind one signature, their availability, and their FLOPs in two conventions.

Every implementation is ``fn(q_BTHK, k_BSGK, v_BSGK, *, causal, window) -> o_BTHK`` (B batch, T queries, S keys,
H query heads, G key/value heads with H % G == 0 (GQA, R = H // G), K head dim). ``window`` None is full
(causal) attention; an int w means query t sees keys s with t - w < s <= t (w keys, itself included), and needs
causal=True. Causal attention here is aligned self-attention (T == S); non-causal allows T != S.

* ``naive``: two einsums, scores and softmax in fp32 (the reference; nanochat's "xla" kernel; supports a query
  offset for KV-cached decoding).
* ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``.
* ``cudnn``: the same call with ``implementation="cudnn"`` (GPU, bf16/fp16): cuDNN flash attention.
* ``pallas-triton``: JAX's Pallas/Triton flash attention (``jax.experimental.pallas.ops.gpu.attention.mha``);
  it has no GQA, so K/V heads are repeated first (inside the timed call).
* ``pallas-mosaic``: the Hopper (sm90) Mosaic GPU flash attention (``...ops.gpu.attention_mgpu.attention``); it
  applies no 1/sqrt(K) scale (q is pre-scaled) and has no causal backward in this JAX.
* ``chunked``: pure-JAX flash attention: online softmax over a static schedule of (query block, key block) pairs
  in one ``lax.scan``, where pairs fully above the diagonal or outside the window are not in the schedule (their
  work is not done), and a custom VJP that recomputes the scores block by block instead of storing T x S.

FLOPs (matmul FLOPs only; softmax exponentials are not counted): ``palm`` is the nanochat/PaLM convention MFU
tables quote, 4·B·H·K·T·S_eff forward with S_eff = min(S, window), x3 for forward+backward. ``executed`` is what
the kernel does: dense kernels (naive, xla) execute all T x S scores, and their backward is 2x the forward (autodiff
keeps P); block-skipping kernels execute only their visible blocks and recompute scores in the backward
(5 block matmuls against the forward's 2: forward+backward = 3.5x forward). For naive/xla/chunked this formula is
checked against mgr.flops; the fused kernels are custom calls mgr.flops cannot see, so theirs is analytic, at
128 x 128 blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mgr.flops import compile_and_count, matmul_flops
from mgr.timing import measure

IMPLEMENTATIONS = ("naive", "xla", "cudnn", "pallas-triton", "pallas-mosaic", "chunked")
FUSED = ("cudnn", "pallas-triton", "pallas-mosaic")  # custom calls: FLOPs analytic
BLOCK_SKIPPING = ("chunked", *FUSED)
DEFAULT_BLOCK = 128
FUSED_BLOCK = 128  # the tile the fused kernels' executed FLOPs are estimated at
HALF_DTYPES = ("bfloat16", "float16")


def visible(t: jax.Array, s: jax.Array, *, causal: bool, window: int | None) -> jax.Array:
    """Whether query position t sees key position s (broadcasting)."""
    ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(t), jnp.shape(s)), bool)
    if causal:
        ok = ok & (s <= t)
    if window is not None:
        ok = ok & (s > t - window)
    return ok


# --- the implementations ----------------------------------------------------------------------------------------

def naive(q_BTHK, k_BSGK, v_BSGK, *, causal: bool = True, window: int | None = None,
          q_offset: int | jax.Array = 0) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v with query t at absolute position q_offset + t (KV cache: keys are the buffer)."""
    B, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    # Query heads are grouped by the kv head they share, so K/V are never materialised H/G times.
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    # Scores and softmax in fp32 whatever the compute dtype: bf16 logits lose the small differences that matter.
    s_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK, preferred_element_type=jnp.float32) * K ** -0.5
    visible_TS = visible((q_offset + jnp.arange(T))[:, None], jnp.arange(S)[None, :], causal=causal, window=window)
    s_BGRTS = jnp.where(visible_TS, s_BGRTS, jnp.finfo(jnp.float32).min)
    p_BGRTS = jax.nn.softmax(s_BGRTS, axis=-1).astype(v_BSGK.dtype)
    o_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", p_BGRTS, v_BSGK)
    return o_BTGRK.reshape(B, T, H, K)


def _local_window(window: int | None):
    # jax.nn's (left, right) window: s >= t - left and s <= t + right; ours is t - w < s <= t.
    return None if window is None else (window - 1, 0)


def xla(q_BTHK, k_BSGK, v_BSGK, *, causal: bool = True, window: int | None = None) -> jax.Array:
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, is_causal=causal,
                                        local_window_size=_local_window(window), implementation="xla")


def cudnn(q_BTHK, k_BSGK, v_BSGK, *, causal: bool = True, window: int | None = None) -> jax.Array:
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, is_causal=causal,
                                        local_window_size=_local_window(window), implementation="cudnn")


def pallas_triton(q_BTHK, k_BSGK, v_BSGK, *, causal: bool = True, window: int | None = None,
                  interpret: bool = False) -> jax.Array:
    """``interpret=True`` runs the kernel in Pallas' interpreter (any backend, slow): tests check the wrapper so."""
    from jax.experimental.pallas.ops.gpu import attention as triton_attention
    assert window is None, "pallas-triton has no sliding window"
    R = q_BTHK.shape[2] // k_BSGK.shape[2]
    k_BSHK, v_BSHK = (jnp.repeat(a, R, axis=2) if R > 1 else a for a in (k_BSGK, v_BSGK))
    return triton_attention.mha(q_BTHK, k_BSHK, v_BSHK, None, sm_scale=q_BTHK.shape[-1] ** -0.5, causal=causal,
                                interpret=interpret)


def pallas_mosaic(q_BTHK, k_BSGK, v_BSGK, *, causal: bool = True, window: int | None = None) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import attention_mgpu
    assert window is None, "pallas-mosaic has no sliding window"
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal,
                                         block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    # The kernel computes softmax(q k^T) v: the 1/sqrt(K) goes into q (differentiable, one elementwise op).
    scale = jnp.asarray(q_BTHK.shape[-1] ** -0.5, q_BTHK.dtype)
    return attention_mgpu.attention(q_BTHK * scale, k_BSGK, v_BSGK, config)


# --- chunked: flash attention in pure JAX -----------------------------------------------------------------------

def block_schedule(T: int, S: int, block: int, *, causal: bool, window: int | None) -> tuple[int, int, np.ndarray]:
    """(bq, bk, pairs[P, 2]): the (query block, key block) pairs holding at least one visible (t, s), query-major.
    Blocks are min(block, T) x min(block, S); padding positions (beyond T or S) never make a block visible."""
    bq, bk = min(block, T), min(block, S)
    pairs = []
    for i in range(math.ceil(T / bq)):
        t_lo, t_hi = i * bq, min((i + 1) * bq, T) - 1
        for j in range(math.ceil(S / bk)):
            s_lo, s_hi = j * bk, min((j + 1) * bk, S) - 1
            if causal and s_lo > t_hi:
                continue
            if window is not None and s_hi <= t_lo - window:
                continue
            pairs.append((i, j))
    return bq, bk, np.asarray(pairs, np.int32).reshape(-1, 2)


def _pad_to(x, n: int, axis: int = 1):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad)


def _slice(x, start, size: int, axis: int):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _update(x, block, start, axis: int):
    return jax.lax.dynamic_update_slice_in_dim(x, block, start, axis=axis)


def _block_mask(i, j, bq: int, bk: int, S: int, causal: bool, window: int | None):
    t_Q = i * bq + jnp.arange(bq)
    s_C = j * bk + jnp.arange(bk)
    return visible(t_Q[:, None], s_C[None, :], causal=causal, window=window) & (s_C[None, :] < S)


def _chunked_forward(q_BTHK, k_BSGK, v_BSGK, causal: bool, window: int | None, block: int):
    B, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    R, scale = H // G, K ** -0.5
    bq, bk, pairs = block_schedule(T, S, block, causal=causal, window=window)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    q_BTGRK = _pad_to(q_BTHK, Tp).reshape(B, Tp, G, R, K)
    k_BSGK, v_BSGK = _pad_to(k_BSGK, Sp), _pad_to(v_BSGK, Sp)

    def step(carry, ij):
        m_BGRT, l_BGRT, acc_BTGRK = carry
        i, j = ij[0], ij[1]
        q_BQGRK = _slice(q_BTGRK, i * bq, bq, 1)
        k_BCGK, v_BCGK = _slice(k_BSGK, j * bk, bk, 1), _slice(v_BSGK, j * bk, bk, 1)
        s_BGRQC = jnp.einsum("bqgrk,bcgk->bgrqc", q_BQGRK, k_BCGK, preferred_element_type=jnp.float32) * scale
        s_BGRQC = jnp.where(_block_mask(i, j, bq, bk, S, causal, window), s_BGRQC, -jnp.inf)
        m_old = _slice(m_BGRT, i * bq, bq, 3)
        m_new = jnp.maximum(m_old, s_BGRQC.max(-1))
        # A row with nothing visible yet keeps m = -inf; shift it by 0 so exp gives 0, not nan.
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p_BGRQC = jnp.exp(s_BGRQC - m_safe[..., None])
        correction = jnp.exp(m_old - m_safe)
        l_new = _slice(l_BGRT, i * bq, bq, 3) * correction + p_BGRQC.sum(-1)
        pv_BQGRK = jnp.einsum("bgrqc,bcgk->bqgrk", p_BGRQC.astype(v_BCGK.dtype), v_BCGK,
                              preferred_element_type=jnp.float32)
        acc_new = _slice(acc_BTGRK, i * bq, bq, 1) * jnp.moveaxis(correction, 3, 1)[..., None] + pv_BQGRK
        return (_update(m_BGRT, m_new, i * bq, 3), _update(l_BGRT, l_new, i * bq, 3),
                _update(acc_BTGRK, acc_new, i * bq, 1)), None

    init = (jnp.full((B, G, R, Tp), -jnp.inf, jnp.float32), jnp.zeros((B, G, R, Tp), jnp.float32),
            jnp.zeros((B, Tp, G, R, K), jnp.float32))
    (m_BGRT, l_BGRT, acc_BTGRK), _ = jax.lax.scan(step, init, jnp.asarray(pairs))
    seen = l_BGRT > 0  # only padding rows see nothing
    o_BTGRK = acc_BTGRK / jnp.moveaxis(jnp.where(seen, l_BGRT, 1.0), 3, 1)[..., None]
    lse_BGRT = jnp.where(seen, m_BGRT + jnp.log(jnp.where(seen, l_BGRT, 1.0)), jnp.inf)
    return o_BTGRK[:, :T].reshape(B, T, H, K).astype(q_BTHK.dtype), lse_BGRT


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(q_BTHK, k_BSGK, v_BSGK, causal, window, block):
    return _chunked_forward(q_BTHK, k_BSGK, v_BSGK, causal, window, block)[0]


def _chunked_fwd(q_BTHK, k_BSGK, v_BSGK, causal, window, block):
    o_BTHK, lse_BGRT = _chunked_forward(q_BTHK, k_BSGK, v_BSGK, causal, window, block)
    return o_BTHK, (q_BTHK, k_BSGK, v_BSGK, o_BTHK, lse_BGRT)


def _chunked_bwd(causal, window, block, residuals, do_BTHK):
    """FlashAttention-2's backward: per visible block, recompute P from the saved log-sum-exp, then dV += P^T dO,
    dP = dO V^T, dS = P (dP - rowsum(dO o)), dQ += dS K, dK += dS^T Q: memory O(T), no T x S array."""
    q_BTHK, k_BSGK, v_BSGK, o_BTHK, lse_BGRT = residuals
    B, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    R, scale = H // G, K ** -0.5
    bq, bk, pairs = block_schedule(T, S, block, causal=causal, window=window)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    delta_BTH = jnp.sum(do_BTHK.astype(jnp.float32) * o_BTHK.astype(jnp.float32), axis=-1)
    delta_BGRT = jnp.moveaxis(_pad_to(delta_BTH, Tp).reshape(B, Tp, G, R), 1, 3)
    q_BTGRK = _pad_to(q_BTHK, Tp).reshape(B, Tp, G, R, K)
    do_BTGRK = _pad_to(do_BTHK, Tp).reshape(B, Tp, G, R, K)
    kp_BSGK, vp_BSGK = _pad_to(k_BSGK, Sp), _pad_to(v_BSGK, Sp)

    def step(carry, ij):
        dq_BTGRK, dk_BSGK, dv_BSGK = carry
        i, j = ij[0], ij[1]
        q_BQGRK, do_BQGRK = _slice(q_BTGRK, i * bq, bq, 1), _slice(do_BTGRK, i * bq, bq, 1)
        k_BCGK, v_BCGK = _slice(kp_BSGK, j * bk, bk, 1), _slice(vp_BSGK, j * bk, bk, 1)
        s_BGRQC = jnp.einsum("bqgrk,bcgk->bgrqc", q_BQGRK, k_BCGK, preferred_element_type=jnp.float32) * scale
        p_BGRQC = jnp.where(_block_mask(i, j, bq, bk, S, causal, window),
                            jnp.exp(s_BGRQC - _slice(lse_BGRT, i * bq, bq, 3)[..., None]), 0.0)
        dv_BCGK = jnp.einsum("bgrqc,bqgrk->bcgk", p_BGRQC.astype(do_BQGRK.dtype), do_BQGRK,
                             preferred_element_type=jnp.float32)
        dp_BGRQC = jnp.einsum("bqgrk,bcgk->bgrqc", do_BQGRK, v_BCGK, preferred_element_type=jnp.float32)
        ds_BGRQC = p_BGRQC * (dp_BGRQC - _slice(delta_BGRT, i * bq, bq, 3)[..., None]) * scale
        dq_BQGRK = jnp.einsum("bgrqc,bcgk->bqgrk", ds_BGRQC.astype(k_BCGK.dtype), k_BCGK,
                              preferred_element_type=jnp.float32)
        dk_BCGK = jnp.einsum("bgrqc,bqgrk->bcgk", ds_BGRQC.astype(q_BQGRK.dtype), q_BQGRK,
                             preferred_element_type=jnp.float32)
        return (_update(dq_BTGRK, _slice(dq_BTGRK, i * bq, bq, 1) + dq_BQGRK, i * bq, 1),
                _update(dk_BSGK, _slice(dk_BSGK, j * bk, bk, 1) + dk_BCGK, j * bk, 1),
                _update(dv_BSGK, _slice(dv_BSGK, j * bk, bk, 1) + dv_BCGK, j * bk, 1)), None

    init = (jnp.zeros((B, Tp, G, R, K), jnp.float32), jnp.zeros((B, Sp, G, K), jnp.float32),
            jnp.zeros((B, Sp, G, K), jnp.float32))
    (dq, dk, dv), _ = jax.lax.scan(step, init, jnp.asarray(pairs))
    return (dq[:, :T].reshape(B, T, H, K).astype(q_BTHK.dtype), dk[:, :S].astype(k_BSGK.dtype),
            dv[:, :S].astype(v_BSGK.dtype))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked(q_BTHK, k_BSGK, v_BSGK, *, causal: bool = True, window: int | None = None,
            block: int = DEFAULT_BLOCK) -> jax.Array:
    return _chunked(q_BTHK, k_BSGK, v_BSGK, causal, window, block)


KERNELS: dict[str, Callable[..., jax.Array]] = {
    "naive": naive, "xla": xla, "cudnn": cudnn, "pallas-triton": pallas_triton, "pallas-mosaic": pallas_mosaic,
    "chunked": chunked}


# --- availability -----------------------------------------------------------------------------------------------

def _is_hopper() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def unavailable_reason(implementation: str, *, T: int, S: int, H: int, G: int, K: int, dtype: str, causal: bool,
                       window: int | None, grad: bool = False, backend: str | None = None) -> str | None:
    """Why ``implementation`` cannot run this problem here (None: it can). Static checks only: a fused kernel may
    still fail to compile (e.g. shared memory), which callers report as a failure row."""
    backend = backend or jax.default_backend()
    if implementation not in KERNELS:
        return f"unknown implementation {implementation!r} (choose one of {', '.join(IMPLEMENTATIONS)})"
    if H % G:
        return f"n_head={H} is not a multiple of n_kv_head={G}"
    if causal and T != S:
        return f"causal attention here is self-attention (T == S), got T={T}, S={S}"
    if window is not None and (not causal or window < 1):
        return f"a window needs causal attention and window >= 1, got causal={causal}, window={window}"
    if implementation in FUSED and backend != "gpu":
        return f"needs a CUDA GPU (backend is {backend})"
    if implementation in ("cudnn", "pallas-mosaic") and dtype not in HALF_DTYPES:
        return f"needs bfloat16 or float16 inputs, got {dtype}"
    if implementation in ("pallas-triton", "pallas-mosaic") and window is not None:
        return "JAX's kernel has no sliding window"
    if implementation == "pallas-triton":
        bad = [f"{n}={x} is not a multiple of {min(128, x)}" for n, x in (("T", T), ("S", S)) if x % min(128, x)]
        if bad:
            return "block size 128: " + ", ".join(bad)
    if implementation == "pallas-mosaic":
        if not _is_hopper():
            return f"needs a Hopper (sm90) GPU, got {jax.devices()[0].device_kind}"
        if K % 64 or T % 128 or S % 128:
            return f"needs head dim % 64 == 0 and T, S % 128 == 0, got K={K}, T={T}, S={S}"
        if grad and causal:
            return "JAX's Mosaic kernel has no causal backward pass"
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu  # noqa: F401
        except ImportError as e:
            return f"not shipped in this JAX ({e})"
    return None


# --- FLOPs ------------------------------------------------------------------------------------------------------

def palm_flops(B: int, T: int, S: int, H: int, K: int, *, window: int | None = None, grad: bool = False) -> float:
    """Matmul FLOPs in the nanochat/PaLM convention: full T x S_eff scores (S_eff = min(S, window)), 3x with
    the backward; what MFU tables quote, whatever a kernel skips."""
    s_eff = S if window is None else min(S, window)
    return 2 * matmul_flops(T, K, s_eff, batch=B * H) * (3 if grad else 1)


def executed_flops(implementation: str, B: int, T: int, S: int, H: int, K: int, *, causal: bool,
                   window: int | None = None, grad: bool = False, block: int = DEFAULT_BLOCK) -> float:
    """Matmul FLOPs the kernel executes (module docstring): dense T x S for naive/xla; visible blocks only, and a
    recomputing backward (x3.5), for chunked (at ``block``) and the fused kernels (at 128, an estimate)."""
    if implementation not in BLOCK_SKIPPING:
        return 2 * matmul_flops(T, K, S, batch=B * H) * (3 if grad else 1)
    bq, bk, pairs = block_schedule(T, S, block if implementation == "chunked" else FUSED_BLOCK, causal=causal,
                                   window=window)
    return 2 * matmul_flops(bq, K, bk, batch=B * H * len(pairs)) * (3.5 if grad else 1)


def flops_source(implementation: str) -> str:
    return "analytic (custom call)" if implementation in FUSED else "mgr.flops"


# --- measuring: time, FLOPs, error and memory of one kernel on one problem --------------------------------------

# Relative error (max abs error / max |reference|) a kernel may make and still be chosen, by input dtype.
DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One attention problem: B x T x H x K queries, G kv heads, self-attention (T == S), input dtype."""

    B: int
    T: int
    H: int
    G: int
    K: int
    causal: bool
    window: int | None
    dtype: str

    @property
    def label(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"T={self.T} K={self.K} {mask}" + (f" w={self.window}" if self.window else "")


def bind(name: str, problem: Problem, block: int = DEFAULT_BLOCK):
    """``fn(q, k, v)`` running ``name`` on this problem's mask."""
    kernel = KERNELS[name]
    kw = {"block": block} if name == "chunked" else {}
    return lambda q, k, v: kernel(q, k, v, causal=problem.causal, window=problem.window, **kw)


def loss_and_grads(f):
    """Loss sum(o * do) with its gradients: the output is used (as in training), so no forward matmul is dead."""
    def loss(q, k, v, do):
        return jnp.sum(f(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def make_inputs(problem: Problem, seed: int):
    """q, k, v and an output cotangent do, ~N(0, 1), rounded to the problem's dtype."""
    keys = jax.random.split(jax.random.key(seed), 4)
    dims = [(problem.B, problem.T, problem.H, problem.K), (problem.B, problem.T, problem.G, problem.K),
            (problem.B, problem.T, problem.G, problem.K), (problem.B, problem.T, problem.H, problem.K)]
    return [jax.random.normal(k, d, jnp.float32).astype(problem.dtype) for k, d in zip(keys, dims)]


def max_err(got, ref) -> tuple[float, float]:
    """(max abs error, that / max |ref|) over the leaves of got vs ref."""
    errs = [(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r))), float(jnp.max(jnp.abs(r))))
            for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
    return max(e for e, _ in errs), max(e / max(m, 1e-30) for e, m in errs)


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"failed: {e.__class__.__name__}: {text[0][:160] if text else ''}"


def measure_kernel(name: str, problem: Problem, args, ref, *, grad: bool, iters: int, warmup: int,
                   block: int = DEFAULT_BLOCK) -> dict[str, Any]:
    """One (implementation, problem, pass) row: time, FLOPs (both conventions), error vs ``ref`` (from
    ``reference``; (None, None): errors unknown) and XLA's compiled temp memory; or why it cannot run."""
    B, T, H, K = problem.B, problem.T, problem.H, problem.K
    row = {"implementation": name, "B": B, "T": T, "H": H, "G": problem.G, "K": K, "causal": problem.causal,
           "window": problem.window, "pass": "fwd+bwd" if grad else "fwd",
           "palm_flops": palm_flops(B, T, T, H, K, window=problem.window, grad=grad),
           "executed_flops_analytic": executed_flops(name, B, T, T, H, K, causal=problem.causal,
                                                     window=problem.window, grad=grad, block=block),
           "flops_source": flops_source(name)}
    reason = unavailable_reason(name, T=T, S=T, H=H, G=problem.G, K=K, dtype=problem.dtype,
                                causal=problem.causal, window=problem.window, grad=grad)
    if reason is not None:
        return {**row, "available": False, "reason": reason}
    f = bind(name, problem, block)
    fn, fn_args = (loss_and_grads(f), args) if grad else (f, args[:3])
    try:
        record, compiled = compile_and_count(jax.jit(fn), *fn_args)
        timing = measure(compiled, *fn_args, iters=iters, warmup=warmup)
        out = compiled(*fn_args)
    except Exception as e:  # a fused kernel that does not compile or run here (shared memory, ptxas, OOM)
        return {**row, "available": False, "reason": first_line(e)}
    executed = row["executed_flops_analytic"] if name in FUSED else record.matmul_flops
    got, want = (out[1], ref[1]) if grad else (out, ref[0])
    errs = (None, None) if want is None else max_err(got, want)
    seconds = timing.median_ms * 1e-3
    mem = compiled.memory_analysis()
    return {**row, "available": True, "reason": None, **timing.to_dict(), "executed_flops": executed,
            "mgr_flops_matmul": record.matmul_flops, "mgr_flops_unknown": list(record.unknown),
            "tflops_palm": row["palm_flops"] / seconds / 1e12, "tflops_executed": executed / seconds / 1e12,
            "max_abs_err": errs[0], "rel_err": errs[1],
            "temp_mib": None if mem is None else mem.temp_size_in_bytes / 2**20}


REFERENCE_DENSE_LIMIT = 2**31  # B·H·T² fp32 scores above this (8 GiB a copy): the reference is chunked fp32


def reference_kernel(problem: Problem) -> str:
    """naive, or chunked where the dense fp32 reference's T x T arrays would not fit (both exact in fp32 to ~1e-6)."""
    return "naive" if problem.B * problem.H * problem.T ** 2 <= REFERENCE_DENSE_LIMIT else "chunked"


def reference(problem: Problem, args) -> tuple[Any, Any]:
    """fp32 output and gradients at HIGHEST precision (``reference_kernel``), from the dtype-rounded inputs upcast,
    so an error is the kernel's, not the input rounding's."""
    args32 = [a.astype(jnp.float32) for a in args]
    f = bind(reference_kernel(problem), problem)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(f)(*args32[:3])
        _, grads = jax.jit(loss_and_grads(f))(*args32)
    return out, grads


def fastest(rows: list[dict[str, Any]], tol: float) -> list[dict[str, Any]]:
    """Per problem and pass: the fastest available row whose relative error is within tol."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if not r["available"] or r["rel_err"] is None or r["rel_err"] > tol:
            continue
        key = (r["B"], r["T"], r["K"], r["causal"], r["window"], r["pass"])
        if key not in best or r["median_ms"] < best[key]["median_ms"]:
            best[key] = r
    return list(best.values())
