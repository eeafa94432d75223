"""The one FLOPs estimator every budget and every speedup claim goes through.

Two numbers, kept apart on purpose:

* ``flops``: XLA's ``cost_analysis()`` of the compiled program, corrected for loops. XLA prices a ``while``
  body once, so an L-layer ``lax.scan`` is undercounted L times; we add ``(trip - unroll) x body`` for every
  scan (nested ones too), pricing each body by compiling it alone. ``xla_raw`` keeps the uncorrected figure.
* ``matmul_flops``: an exact walk of the jaxpr that prices every ``dot_general``/convolution at 2·M·N·K (batch
  dims included) and multiplies scan bodies by their trip count. It is what analytic formulas are compared with.

What neither can price is listed by name in ``unknown`` (custom calls such as cuDNN attention, Pallas kernels,
LAPACK routines; data-dependent ``while`` loops), never silently counted as zero.

``jax.checkpoint`` recompute appears in the differentiated jaxpr and behind optimisation barriers in HLO, so it
is counted as executed by both figures.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
from jax.extend import core as jcore

# Custom-call targets that are bookkeeping, not compute.
_FREE_CUSTOM_CALLS = frozenset({
    "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "annotate_device_placement",
    "MoveToHost", "MoveToDevice", "AllocateBuffer", "LayoutConstraint", "X64Combine", "X64SplitLow",
    "X64SplitHigh",
})
_CUSTOM_CALL_RE = re.compile(r'custom_call_target="([^"]+)"')
_WHILE_RE = re.compile(r"\swhile\(")
_OPAQUE_PRIMITIVES = frozenset({"pallas_call", "triton_kernel_call", "custom_call", "ffi_call"})


@dataclasses.dataclass(frozen=True)
class FlopsRecord:
    flops: float
    xla_raw: float
    matmul_flops: float
    transcendentals: float
    bytes_accessed: float
    unknown: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "unknown": list(self.unknown)}


@dataclasses.dataclass(frozen=True)
class _Cost:
    flops: float = 0.0
    transcendentals: float = 0.0
    bytes_accessed: float = 0.0

    def __add__(self, other: "_Cost") -> "_Cost":
        return _Cost(self.flops + other.flops, self.transcendentals + other.transcendentals,
                     self.bytes_accessed + other.bytes_accessed)

    def __mul__(self, k: float) -> "_Cost":
        return _Cost(self.flops * k, self.transcendentals * k, self.bytes_accessed * k)


def count_flops(fn: Callable, *args, **kwargs) -> FlopsRecord:
    """Price one call of ``fn(*args, **kwargs)``; ``fn`` may be plain, jitted, or a grad of either."""
    record, _ = compile_and_count(fn, *args, **kwargs)
    return record


def compile_and_count(fn: Callable, *args, **kwargs) -> tuple[FlopsRecord, Any]:
    """Like ``count_flops`` but also returns the compiled executable, so callers compile the step once."""
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    traced = jitted.trace(*args, **kwargs)
    compiled = traced.lower().compile()
    return price(traced.jaxpr, compiled), compiled


def price(closed_jaxpr: jcore.ClosedJaxpr, compiled: Any) -> FlopsRecord:
    """Combine the compiled program's cost analysis with a walk of the jaxpr it came from."""
    hlo = compiled.as_text() or ""
    raw = _xla_cost(compiled)
    unknown: list[str] = [f"custom_call:{t}" for t in _custom_call_targets(hlo)]
    matmul = _matmul_flops(_without_dead_code(closed_jaxpr.jaxpr), unknown)
    # With no while loop left in the optimised HLO, XLA unrolled everything and its count is already complete.
    correction = _loop_correction(closed_jaxpr.jaxpr, {}) if _WHILE_RE.search(hlo) else _Cost()
    total = raw + correction
    return FlopsRecord(flops=total.flops, xla_raw=raw.flops, matmul_flops=matmul,
                       transcendentals=total.transcendentals, bytes_accessed=total.bytes_accessed,
                       unknown=tuple(dict.fromkeys(unknown)))


def _xla_cost(compiled: Any) -> _Cost:
    analysis = compiled.cost_analysis()
    # JAX has returned a dict, a list with one dict per program, or None across versions and backends.
    if analysis is None:
        return _Cost()
    if isinstance(analysis, (list, tuple)):
        parts = [a for a in analysis if a]
    else:
        parts = [analysis]
    # XLA reports -1 for what it cannot price (e.g. host callbacks); those calls are listed under `unknown`.
    return sum((_Cost(*(max(float(a.get(k, 0.0)), 0.0) for k in ("flops", "transcendentals", "bytes accessed")))
                for a in parts), _Cost())


def _without_dead_code(jaxpr: jcore.Jaxpr) -> jcore.Jaxpr:
    """Drop equations whose results are never used, as XLA does, so the walk prices what executes
    (e.g. the last forward matmul of a grad-only function). Uses JAX's own DCE; a JAX without it keeps all."""
    try:
        from jax._src.interpreters.partial_eval import dce_jaxpr
    except ImportError:
        return jaxpr
    return dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0]


def _custom_call_targets(hlo: str) -> list[str]:
    return [t for t in dict.fromkeys(_CUSTOM_CALL_RE.findall(hlo)) if t not in _FREE_CUSTOM_CALLS]


def _sub_jaxprs(value: Any) -> list[jcore.Jaxpr]:
    if isinstance(value, jcore.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jcore.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _dot_flops(eqn: jcore.JaxprEqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in lhs_contract)


def _conv_flops(eqn: jcore.JaxprEqn) -> float:
    rhs_shape = eqn.invars[1].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    # Each output element takes (in_features/groups x kernel window) multiply-adds; rhs holds exactly that per feature.
    return 2.0 * math.prod(out_shape) * math.prod(rhs_shape) / rhs_shape[out_feature_dim]


def _matmul_flops(jaxpr: jcore.Jaxpr, unknown: list[str]) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name in _OPAQUE_PRIMITIVES:
            unknown.append(f"primitive:{name}")
        elif name == "scan":
            total += eqn.params["length"] * _matmul_flops(eqn.params["jaxpr"].jaxpr, unknown)
        elif name == "while":
            unknown.append("while_loop:dynamic trip count (body counted once)")
            total += sum(_matmul_flops(j, unknown) for j in _sub_jaxprs(eqn.params["body_jaxpr"]))
        elif name == "cond":
            # One branch executes; the dearest is the honest upper bound.
            total += max(_matmul_flops(j, unknown) for j in _sub_jaxprs(eqn.params["branches"]))
        else:
            for value in eqn.params.values():
                total += sum(_matmul_flops(j, unknown) for j in _sub_jaxprs(value))
    return total


def _compiled_body_cost(body: jcore.ClosedJaxpr, cache: dict[int, _Cost]) -> _Cost:
    key = id(body)
    if key not in cache:
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in body.in_avals]
        compiled = jax.jit(jcore.jaxpr_as_fun(body)).lower(*specs).compile()
        cache[key] = _xla_cost(compiled)
    return cache[key]


def _loop_correction(jaxpr: jcore.Jaxpr, cache: dict[int, _Cost]) -> _Cost:
    """FLOPs XLA's single pass over each loop body missed: for a scan of n trips unrolled u times,
    XLA saw u copies of the body, so (n - u) more are added, and nested loops are corrected n times."""
    total = _Cost()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "scan":
            body = eqn.params["jaxpr"]
            n = eqn.params["length"]
            unroll = eqn.params.get("unroll", 1)
            seen = n if unroll is True else min(max(int(unroll), 1), n)
            total = total + _compiled_body_cost(body, cache) * (n - seen) + _loop_correction(body.jaxpr, cache) * n
        elif name == "cond":
            branches = [_loop_correction(j, cache) for j in _sub_jaxprs(eqn.params["branches"])]
            total = total + max(branches, key=lambda c: c.flops)
        else:
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total = total + _loop_correction(sub, cache)
    return total


# --- analytic counts that tests and budgets are checked against -------------------------------------------------

def matmul_flops(m: int, k: int, n: int, batch: int = 1) -> float:
    """(batch x m x k) @ (k x n): one multiply and one add per term."""
    return 2.0 * batch * m * k * n


def mlp_flops(tokens: int, d_in: int, d_hidden: int, d_out: int | None = None) -> float:
    """Forward FLOPs of a two-matmul MLP (elementwise activation not counted)."""
    d_out = d_in if d_out is None else d_out
    return matmul_flops(tokens, d_in, d_hidden) + matmul_flops(tokens, d_hidden, d_out)


def attention_flops(batch: int, seq: int, n_heads: int, head_dim: int) -> float:
    """Forward FLOPs of QK^T and AV. Causal attention is counted with the full T x T score matrix (the
    PaLM/nanochat convention): that is what a masked dense kernel executes; a causal-skipping kernel does ~half."""
    return 2 * matmul_flops(seq, head_dim, seq, batch=batch * n_heads)


def transformer_train_flops_per_token(n_matmul_params: int, n_layers: int, n_heads: int, head_dim: int,
                                      seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6·N + 12·L·H·Dh·T (nanochat's estimate_flops)."""
    return 6.0 * n_matmul_params + 12.0 * n_layers * n_heads * head_dim * seq_len
