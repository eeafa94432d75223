"""Dense baseline vs approximate variants on the same inputs: executed FLOPs, time, output error.

Every variant is `fn(params, x) -> y` with params passed as ARGUMENTS (not closed over): closed-over weights
become compile-time constants that XLA may fold (e.g. pre-multiply a @ b), which would time something other
than the variant. Each is compiled once for the bench tokens, priced with mgr.flops.compile_and_count, that
executable timed with mgr.timing.measure, and scored on held-out tokens against the float32 dense output computed
at HIGHEST precision (so bfloat16 variants, and TF32 on GPUs, are charged their own rounding).

Derived figures: speedup = dense median / variant median; flops_ratio = variant FLOPs / dense FLOPs;
delivered = speedup / (dense FLOPs / variant FLOPs), the fraction of the FLOP saving that turned into time
(1.0 = time fell exactly as FLOPs did). For variants whose hardware kernel does not exist in JAX (2:4 sparse),
`nominal_flops` gives what such a kernel would execute, reported beside the executed count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mgr.methods.approx import relative_error
from mgr.errors import UserError
from mgr.flops import FlopsRecord, compile_and_count
from mgr.results import Table
from mgr.structured_inputs import InputSpec
from mgr.timing import Timing, measure

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class BenchSpec(InputSpec):
    """Input fields plus how to measure; the approximation demos' configs subclass this."""

    dtype: str = dataclasses.field(default="float32", metadata={
        "help": "compute dtype (errors are measured against the float32 dense output)", "choices": tuple(DTYPES)})
    iters: int = dataclasses.field(default=10, metadata={"help": "timed calls per variant"})
    warmup: int = dataclasses.field(default=2, metadata={"help": "untimed calls per variant before timing"})

    def check(self, budget=None) -> None:
        super().check(budget)
        if self.iters < 1 or self.warmup < 0:
            raise UserError(f"--iters must be >= 1 and --warmup >= 0, got {self.iters} and {self.warmup}")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    fn: Callable[[Any, jax.Array], jax.Array]
    params: Any
    nominal_flops: float | Callable[[FlopsRecord], float] | None = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"rank": 32}: extra table columns


@dataclasses.dataclass(frozen=True)
class VariantResult:
    name: str
    info: Mapping[str, Any]
    record: FlopsRecord
    timing: Timing
    rel_err: float
    speedup: float
    flops_ratio: float
    nominal_flops: float | None
    nominal_flops_ratio: float | None

    @property
    def tflops(self) -> float:
        """Executed FLOPs per second achieved, in TFLOP/s."""
        return self.record.flops / (self.timing.median_ms * 1e-3) / 1e12

    @property
    def delivered(self) -> float:
        return self.speedup * self.flops_ratio

    @property
    def nominal_delivered(self) -> float | None:
        return None if self.nominal_flops_ratio is None else self.speedup * self.nominal_flops_ratio

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.info, "rel_err": self.rel_err, "flops": self.record.flops,
                "matmul_flops": self.record.matmul_flops, "flops_ratio": self.flops_ratio,
                "nominal_flops": self.nominal_flops, "nominal_flops_ratio": self.nominal_flops_ratio,
                **self.timing.to_dict(), "speedup": self.speedup, "delivered": self.delivered,
                "nominal_delivered": self.nominal_delivered, "tflops": self.tflops,
                "unknown": list(self.record.unknown)}


@dataclasses.dataclass(frozen=True)
class Comparison:
    dtype: str
    bench_tokens: int
    eval_tokens: int
    results: tuple[VariantResult, ...]  # dense baseline first

    def rows(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.results]

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "bench_tokens": self.bench_tokens, "eval_tokens": self.eval_tokens,
                "rows": self.rows()}

    def table(self, title: str, note: str = "") -> Table:
        info_cols = list(dict.fromkeys(k for r in self.results for k in r.info))
        nominal = any(r.nominal_flops is not None for r in self.results)
        cols = ["variant", *info_cols, "rel err", "FLOPs", "FLOPs ratio", "median ms", "p10 ms", "p90 ms",
                "speedup", "delivered", "TFLOP/s"]
        cols += ["nominal FLOPs", "nominal FLOPs ratio", "nominal delivered"] if nominal else []
        rows = []
        for r in self.results:
            row = [r.name, *(r.info.get(k) for k in info_cols), r.rel_err, r.record.flops, r.flops_ratio,
                   r.timing.median_ms, r.timing.p10_ms, r.timing.p90_ms, r.speedup, r.delivered, r.tflops]
            rows.append(row + ([r.nominal_flops, r.nominal_flops_ratio, r.nominal_delivered] if nominal else []))
        return Table(title, cols, rows, note or f"{self.dtype}, {self.bench_tokens} timed tokens, "
                     f"errors on {self.eval_tokens} held-out tokens vs float32 dense")


def cast_floats(tree: Any, dtype) -> Any:
    def cast(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return jax.tree.map(cast, tree)


def compare(dense: Variant, variants: Sequence[Variant], x_bench, x_eval, *, dtype: str = "float32",
            iters: int = 20, warmup: int = 3) -> Comparison:
    """Measure `dense` and every variant on the same bench/eval tokens in compute dtype `dtype`."""
    if iters < 1 or warmup < 0:
        raise UserError(f"iters must be >= 1 and warmup >= 0, got {iters} and {warmup}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose one of {', '.join(DTYPES)})")
    names = [v.name for v in (dense, *variants)]
    if len(set(names)) != len(names):
        raise UserError(f"variant names must be unique, got {names}")
    cdt = DTYPES[dtype]
    with jax.default_matmul_precision("highest"):
        y_ref = jax.jit(dense.fn)(cast_floats(dense.params, jnp.float32), jnp.asarray(x_eval, jnp.float32))
    x_bench_c, x_eval_c = jnp.asarray(x_bench, cdt), jnp.asarray(x_eval, cdt)

    def run(v: Variant) -> tuple[FlopsRecord, Timing, float, float | None]:
        fn, params = jax.jit(v.fn), cast_floats(v.params, cdt)
        # time the executable that was priced: jit dispatch would compile the bench shape a second time
        record, compiled = compile_and_count(fn, params, x_bench_c)
        timing = measure(compiled, params, x_bench_c, iters=iters, warmup=warmup)
        err = relative_error(fn(params, x_eval_c), y_ref)
        nominal = v.nominal_flops(record) if callable(v.nominal_flops) else v.nominal_flops
        return record, timing, err, None if nominal is None else float(nominal)

    everything = (dense, *variants)
    measured = [run(v) for v in everything]
    base_rec, base_t = measured[0][:2]
    results = tuple(VariantResult(v.name, dict(v.info), rec, t, err, base_t.median_ms / t.median_ms,
                                  rec.flops / base_rec.flops, nom, None if nom is None else nom / base_rec.flops)
                    for v, (rec, t, err, nom) in zip(everything, measured))
    return Comparison(dtype, int(x_bench_c.shape[0]), int(x_eval_c.shape[0]), results)


def setup_cost(fn: Callable, *args, jit: bool = True, iters: int = 1, warmup: int = 0) -> dict[str, Any]:
    """One-off cost of building a variant (an SVD, a whitening): median time and counted FLOPs.

    The jitted path times the executable that was compiled to count the FLOPs, so no call pays for
    compilation and one timed call (the default: a large SVD takes seconds) needs no warm-up; call it after
    the variant has been built once, so that one-time library set-up (e.g. cuSOLVER handles) is not charged.
    LAPACK/cuSOLVER decompositions are custom calls that XLA cannot price: they appear in `unknown` and
    `flops_complete` is False, so the FLOPs figure covers only the surrounding matmuls. jit=False is for
    builders with host-side control flow (the whitening fallback chain): timed only, FLOPs not counted.
    """
    if not jit:
        t = measure(fn, *args, iters=iters, warmup=warmup)
        return {**t.to_dict(), "flops": None, "flops_complete": False,
                "unknown": ["host-side control flow: not traced"]}
    record, compiled = compile_and_count(jax.jit(fn), *args)
    t = measure(compiled, *args, iters=iters, warmup=warmup)
    return {**t.to_dict(), "flops": record.flops, "matmul_flops": record.matmul_flops,
            "flops_complete": not record.unknown, "unknown": list(record.unknown)}


# ---------------------------------------------------------------------------------------------- Pareto


def pareto_front(speedup: Sequence[float], err: Sequence[float]) -> np.ndarray:
    """Boolean mask of points no other point beats: faster-or-equal AND more-or-equally accurate, one strictly."""
    s, e = np.asarray(speedup, float), np.asarray(err, float)
    dominated = ((s[None, :] >= s[:, None]) & (e[None, :] <= e[:, None])
                 & ((s[None, :] > s[:, None]) | (e[None, :] < e[:, None]))).any(axis=1)
    return ~dominated


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "",
                err_floor: float = 1e-7) -> Path:
    """Error vs speedup scatter (rows from Comparison.rows()), Pareto front joined and highlighted."""
    return plot_pareto_panels({title: rows}, path, err_floor=err_floor)


def plot_pareto_panels(panels: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *,
                       err_floor: float = 1e-7) -> Path:
    """One error-vs-speedup panel per comparison (title -> rows). Speedups are relative to each panel's own
    dense baseline, so each layer gets its own front. Errors are drawn on a log axis, clipped at `err_floor`
    (the float32 dense baseline's error is ~0)."""
    from mgr.plots import figure, save  # matplotlib loads only when a bench plots

    fig, axes = figure(len(panels))
    for ax, (title, rows) in zip(axes, panels.items()):
        names = [r["name"] for r in rows]
        s = np.array([r["speedup"] for r in rows], float)
        e = np.maximum(np.array([r["rel_err"] for r in rows], float), err_floor)
        front = pareto_front(s, e)
        ax.scatter(s[~front], e[~front], c="0.6", label="dominated")
        order = np.argsort(s[front])
        ax.plot(s[front][order], e[front][order], "o-", c="tab:red", label="Pareto front")
        for name, xi, yi in zip(names, s, e):
            ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axvline(1.0, ls=":", c="0.4")
        ax.set_yscale("log")
        ax.set_xlabel("speedup vs dense (median time)")
        ax.set_ylabel(f"relative output error (clipped at {err_floor:g})")
        ax.set_title(title)
        ax.legend()
    return save(fig, path)
