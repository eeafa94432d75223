"""Causal self-attention for nanochat: one function with an `implementation` switch, and "auto", which picks the
fastest correct kernel for the model's shape and device.

The kernels live in mgr.methods.attention; nanochat's names for them:

* "xla": two explicit einsums compiled by XLA (mgr.methods.attention.naive). The FLOPs estimator sees QK^T and AV
  as dot_generals (full T x S, the PaLM/nanochat convention), and it is the only kernel with a query offset
  (KV-cached decoding), so generation always uses it.
* "jax": jax.nn.dot_product_attention (the methods' "xla"); "cudnn": its cuDNN flash attention (GPU, bf16/fp16).
* "chunked": pure-JAX flash attention (online softmax over the visible blocks, recomputing custom VJP); runs
  everywhere.
* "pallas-triton", "pallas-mosaic": JAX's Pallas GPU flash attention kernels (Mosaic: Hopper only, and no causal
  backward in this JAX, so it cannot train).

"auto" is resolved before the model is built by `choose`: an in-process probe (memoised per process) that times the
forward+backward of every kernel available for this (B, T, H, G, K, dtype, window) on random inputs and keeps the
fastest whose output and gradients are within tolerance of the fp32 reference (mgr.methods.attention).

Sliding windows (`window=w`: query t sees keys s with t - w < s <= t): "chunked" skips the key blocks outside the
window, so its work falls with w; "xla" masks them densely (the whole T x S square is computed, and mgr.flops
prices it as full attention); "jax"/"cudnn" get the window as jax's `local_window_size`.

Shapes: B batch, T queries, S keys, H query heads, G key/value heads (GQA: H % G == 0), K head dim.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from mgr.errors import UserError
from mgr.methods import attention as A

KERNELS = {"xla": "naive", "jax": "xla", "cudnn": "cudnn", "chunked": "chunked", "pallas-triton": "pallas-triton",
           "pallas-mosaic": "pallas-mosaic"}
IMPLEMENTATIONS = tuple(KERNELS)
ALIASES = {"standard": "xla"}  # the earlier fixed-FLOPs harness's name for the plain kernel
CHOICES = ("auto", *IMPLEMENTATIONS, *ALIASES)
PROBE_ITERS, PROBE_WARMUP = 5, 1


def check_implementation(implementation: str) -> str:
    """The kernel's canonical name (aliases resolved); one error line for an unknown or unusable one."""
    implementation = ALIASES.get(implementation, implementation)
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if KERNELS[implementation] in A.FUSED and jax.default_backend() != "gpu":
        raise UserError(f"attention implementation {implementation!r} needs a GPU (backend is "
                        f"{jax.default_backend()!r})")
    return implementation


def causal_attention(q_BTHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, *, implementation: str = "xla",
                     q_offset: int | jax.Array | None = None, window: int | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v where query t (absolute position p = q_offset + t) sees keys s <= p, and with
    `window=w` only keys p - w < s <= p (w keys, itself included). window=None is full causal attention.

    q_offset=None means queries and keys are the same positions (training; T == S). A non-None q_offset (KV cache:
    keys are a whole cache buffer, queries start at position q_offset) is only supported by "xla".
    """
    implementation = check_implementation(implementation)
    _, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    if H % G:
        raise UserError(f"n_head={H} must be a multiple of n_kv_head={G}")
    if window is not None and window < 1:
        raise UserError(f"attention window must be >= 1 (or None for full causal), got {window}")
    if implementation == "xla":
        return A.naive(q_BTHK, k_BSGK, v_BSGK, causal=True, window=window, q_offset=0 if q_offset is None else q_offset)
    if q_offset is not None or T != S:
        raise UserError(f"attention implementation {implementation!r} supports only aligned causal attention (T == S)")
    # nanochat trains through attention, so a kernel without a backward pass is refused here too
    reason = A.unavailable_reason(KERNELS[implementation], T=T, S=S, H=H, G=G, K=K, dtype=q_BTHK.dtype.name,
                                  causal=True, window=window, grad=True)
    if reason is not None:
        raise UserError(f"attention implementation {implementation!r}: {reason}")
    return A.KERNELS[KERNELS[implementation]](q_BTHK, k_BSGK, v_BSGK, causal=True, window=window)


@functools.lru_cache(maxsize=None)
def choose(B: int, T: int, H: int, G: int, K: int, dtype: str, window: int | None = None) -> dict[str, Any]:
    """The fastest correct kernel for this attention shape on this device, by an in-process probe of fwd+bwd
    (memoised: a second model of the same shape reuses the answer). Returns the choice and the probe's evidence."""
    problem = A.Problem(B, T, H, G, K, True, window, dtype)
    args = A.make_inputs(problem, seed=0)
    ref = A.reference(problem, args)
    tol = A.DEFAULT_TOL[dtype]
    rows = {name: A.measure_kernel(KERNELS[name], problem, args, ref, grad=True, iters=PROBE_ITERS,
                                   warmup=PROBE_WARMUP) for name in IMPLEMENTATIONS}
    ok = {n: r for n, r in rows.items() if r["available"] and r["rel_err"] <= tol}
    # "xla" is the reference computed in the compute dtype: it is the fallback should nothing pass
    chosen = min(ok, key=lambda n: ok[n]["median_ms"]) if ok else "xla"
    probe = {n: ({"fwd_bwd_ms": r["median_ms"], "rel_err": r["rel_err"]} if r["available"]
                 else {"unavailable": r["reason"]}) for n, r in rows.items()}
    return {"requested": "auto", "chosen": chosen, "source": f"in-process probe (fwd+bwd, {PROBE_ITERS} timed calls)",
            "shape": {"B": B, "T": T, "H": H, "G": G, "K": K, "dtype": dtype, "window": window},
            "tolerance": tol, "probe": probe}
