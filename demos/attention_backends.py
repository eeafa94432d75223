"""Attention backends, forward and forward+backward: which kernel delivers the most FLOP/s, and is it correct?

Every implementation of mgr.methods.attention (naive, xla, cudnn, pallas-triton, pallas-mosaic, chunked) runs the
same q, k, v (B x T x H x K, GQA with G key/value heads) over a grid of sequence lengths, head dims and masks. Per
row: median and p10-p90 ms (warm-up excluded), matmul FLOPs in two conventions (executed by this kernel, and the
full-T² nanochat/PaLM convention MFU tables quote) and TFLOP/s in both, the max abs error of the output and of
dq/dk/dv against an fp32 reference (naive at HIGHEST precision; chunked fp32 at long T) from the same dtype-rounded
inputs (so the error is the kernel's, not the input rounding's), and XLA's compiled temp memory. An implementation that cannot run a row
(backend, dtype, shape) is a row that says why. The recommendation is the fastest row within the error tolerance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax

from mgr.demo import Demo
from mgr.errors import UserError
from mgr.methods import attention as A
from mgr.results import Results, Table

DTYPES = ("float32", "bfloat16", "float16")
MASKS = ("causal", "full")
# `--preset gpu`: H100/H200 shapes (bf16, T 1k-16k, head dims 64 and 128, 16k tokens per call); flags the user
# set to something other than the CPU default keep their value.
GPU_PRESET = {"seq_lens": (1024, 2048, 4096, 8192, 16384), "batch": 0, "heads": 16, "kv_heads": 16,
              "head_dims": (64, 128), "dtype": "bfloat16", "iters": 20, "warmup": 3}
TOKENS_PER_CALL = 16384  # batch 0: max(1, this // T) rows


@dataclass
class Config:
    preset: str = field(default="cpu", metadata={
        "help": "grid preset: cpu (the defaults below) or gpu (bf16, T 1k-16k, K 64/128, 16 heads, 16k tokens per "
                "call; flags set to other values than the cpu defaults win)", "choices": ("cpu", "gpu")})
    seq_lens: tuple[int, ...] = field(default=(128, 256, 512), metadata={
        "help": "sequence lengths T, comma-separated"})
    batch: int = field(default=1, metadata={"help": f"rows per call; 0 = max(1, {TOKENS_PER_CALL} // T)"})
    heads: int = field(default=4, metadata={"help": "query heads H"})
    kv_heads: int = field(default=2, metadata={"help": "key/value heads G (GQA: H a multiple of G)"})
    head_dims: tuple[int, ...] = field(default=(64,), metadata={"help": "head dims K, comma-separated"})
    masks: tuple[str, ...] = field(default=("causal",), metadata={"help": "masks, comma-separated: causal, full"})
    window: int | None = field(default=None, metadata={
        "help": "sliding window w (causal only): query t sees keys t-w < s <= t; none = full causal"})
    dtype: str = field(default="float32", metadata={"help": "input dtype", "choices": DTYPES})
    implementations: tuple[str, ...] = field(default=A.IMPLEMENTATIONS, metadata={
        "help": "implementations, comma-separated: " + ", ".join(A.IMPLEMENTATIONS)})
    block: int = field(default=A.DEFAULT_BLOCK, metadata={"help": "chunked: query/key block size"})
    iters: int = field(default=5, metadata={"help": "timed calls per row"})
    warmup: int = field(default=1, metadata={"help": "untimed calls per row before timing"})
    tol: float | None = field(default=None, metadata={
        "help": "error tolerance for the recommendation, as max abs error / max |reference| of the output and of "
                "each gradient; none = by dtype " + ", ".join(f"{k} {v:g}" for k, v in A.DEFAULT_TOL.items())})

    def __post_init__(self):
        # checked here, before the launcher makes a run directory
        if self.preset == "gpu":
            for name, value in GPU_PRESET.items():
                if getattr(self, name) == _CPU_DEFAULTS[name]:
                    setattr(self, name, value)
        problems = []
        if not self.seq_lens or min(self.seq_lens) < 1:
            problems.append(f"--seq-lens must be non-empty and >= 1, got {self.seq_lens}")
        if not self.head_dims or min(self.head_dims) < 1:
            problems.append(f"--head-dims must be non-empty and >= 1, got {self.head_dims}")
        if self.batch < 0 or self.heads < 1 or self.kv_heads < 1 or self.heads % self.kv_heads:
            problems.append(f"need --batch >= 0 and --heads a multiple of --kv-heads >= 1, got batch {self.batch}, "
                            f"heads {self.heads}, kv heads {self.kv_heads}")
        if not self.masks or set(self.masks) - set(MASKS):
            problems.append(f"--masks must be a non-empty subset of {', '.join(MASKS)}, got {self.masks}")
        if self.window is not None and (self.window < 1 or "full" in self.masks):
            problems.append(f"--window needs causal masks only and >= 1, got {self.window} with {self.masks}")
        if not self.implementations or set(self.implementations) - set(A.IMPLEMENTATIONS):
            problems.append(f"--implementations must be a non-empty subset of {', '.join(A.IMPLEMENTATIONS)}, got "
                            f"{self.implementations}")
        if self.block < 1 or self.iters < 1 or self.warmup < 0 or (self.tol is not None and self.tol <= 0):
            problems.append(f"need --block >= 1, --iters >= 1, --warmup >= 0, --tol > 0, got {self.block}, "
                            f"{self.iters}, {self.warmup}, {self.tol}")
        if problems:
            raise UserError("; ".join(problems))


_CPU_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}


def problems(cfg: Config) -> list[A.Problem]:
    out = []
    for K in cfg.head_dims:
        for mask in cfg.masks:
            for T in cfg.seq_lens:
                B = cfg.batch or max(1, TOKENS_PER_CALL // T)
                out.append(A.Problem(B, T, cfg.heads, cfg.kv_heads, K, mask == "causal",
                                     cfg.window if mask == "causal" else None, cfg.dtype))
    return out


def _mask(r: dict) -> str:
    return ("causal" if r["causal"] else "full") + (f" w={r['window']}" if r["window"] else "")


def _shape(r: dict) -> str:
    return f"T={r['T']} K={r['K']} {_mask(r)}" + (f" B={r['B']}" if r["B"] != 1 else "")


def _tables(rows: list[dict], head: str, note: str) -> list[Table]:
    """Narrow tables (they print in an 80-column terminal): speed per pass, accuracy and memory, and why rows
    could not run."""
    ok = [r for r in rows if r["available"]]
    speed = [Table(f"attention {p}: speed ({head})", ["shape", "impl", "ms", "p10-p90 ms", "TFLOP/s PaLM",
                                                     "TFLOP/s exec"],
                   [[_shape(r), r["implementation"], r["median_ms"], f"{r['p10_ms']:.3g}-{r['p90_ms']:.3g}",
                     r["tflops_palm"], r["tflops_executed"]] for r in ok if r["pass"] == p], note)
             for p in ("fwd", "fwd+bwd")]
    pair = {(r["implementation"], r["T"], r["K"], r["causal"], r["pass"]): r for r in ok}
    acc_rows = []
    for r in ok:
        if r["pass"] != "fwd":
            continue
        g = pair.get((r["implementation"], r["T"], r["K"], r["causal"], "fwd+bwd"), {})
        acc_rows.append([_shape(r), r["implementation"], r["executed_flops"] / r["palm_flops"], r["max_abs_err"],
                         g.get("max_abs_err"), r["temp_mib"], g.get("temp_mib")])
    accuracy = Table(f"attention: accuracy and memory ({head})",
                     ["shape", "impl", "exec/PaLM", "out err", "grad err", "fwd MiB", "bwd MiB"], acc_rows,
                     "exec/PaLM: executed / full-T² FLOPs (1 = dense; block skipping < 1). out err: max |o - ref|; "
                     "grad err: max over dq, dk, dv; vs the fp32 reference (notes). MiB: XLA's compiled "
                     "temp buffers of the fwd and the fwd+bwd executable.")
    reasons: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if not r["available"]:
            reasons.setdefault((r["implementation"], r["reason"]), []).append(f"{_shape(r)} {r['pass']}")
    missing = Table("attention: rows that could not run", ["impl", "why", "rows"],
                    [[impl, why, len(where) if len(where) > 2 else "; ".join(where)]
                     for (impl, why), where in reasons.items()])
    return speed + [accuracy] + ([missing] if reasons else [])


def _plot(rows: list[dict], path) -> None:
    from mgr.plots import figure, save  # matplotlib loads only when the bench plots

    fig, axes = figure(2)
    for ax, which in zip(axes, ("fwd", "fwd+bwd")):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r["pass"] == which and r["available"]:
                label = f"{r['implementation']} K={r['K']} {_mask(r)}"
                lines.setdefault(label, []).append((r["T"], r["tflops_palm"]))
        for label, pts in lines.items():
            pts.sort()
            ax.plot([t for t, _ in pts], [y for _, y in pts], "o-", label=label, markersize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("TFLOP/s (full-T² PaLM convention)")
        ax.set_title(which)
        if lines:
            ax.legend(fontsize=7)
    save(fig, path)


def run(cfg: Config, ctx) -> Results:
    tol = cfg.tol or A.DEFAULT_TOL[cfg.dtype]
    rows = []
    for i, problem in enumerate(problems(cfg)):
        args = A.make_inputs(problem, ctx.seed + i)
        try:
            ref = A.reference(problem, args)
        except Exception as e:  # e.g. out of memory at long T: rows still timed, errors unknown
            ctx.log({"shape": problem.label, "reference": A.first_line(e)})
            ref = (None, None)
        for grad in (False, True):
            rows += [A.measure_kernel(name, problem, args, ref, grad=grad, iters=cfg.iters, warmup=cfg.warmup,
                                      block=cfg.block) for name in cfg.implementations]
    best = A.fastest(rows, tol)
    _plot(rows, ctx.plot_path("tflops_vs_T.png"))
    device = jax.devices()[0].device_kind
    head = f"H={cfg.heads}, G={cfg.kv_heads}, {cfg.dtype}, {device}"
    note = (f"{cfg.iters} timed calls after {cfg.warmup} warm-up. TFLOP/s PaLM: full T x S_eff matmul FLOPs "
            "(x3 with backward), what MFU tables quote; exec: what the kernel executes (mgr.flops for naive/xla/"
            "chunked, analytic for the fused custom calls).")
    rec_lines = []
    for problem in problems(cfg):
        picks = {r["pass"]: r for r in best if (r["B"], r["T"], r["K"], r["causal"], r["window"]) ==
                 (problem.B, problem.T, problem.K, problem.causal, problem.window)}
        text = ", ".join(f"{p} {picks[p]['implementation']} ({picks[p]['median_ms']:.3g} ms, "
                         f"{picks[p]['tflops_palm']:.3g} TFLOP/s PaLM)" if p in picks else f"{p} none"
                         for p in ("fwd", "fwd+bwd"))
        rec_lines.append(f"recommended at {problem.label}: {text}")
    return Results(
        metrics={"rows": rows, "tolerance": tol, "device": device, "recommendations": [
            {k: r[k] for k in ("implementation", "pass", "B", "T", "K", "causal", "window", "median_ms",
                               "tflops_palm", "rel_err")} for r in best]},
        tables=_tables(rows, head, note),
        notes=[f"recommendation: the fastest row with rel err <= {tol:g} (max abs error / max |reference|).",
               "reference: fp32 naive at HIGHEST precision; fp32 chunked where B·H·T² > "
               f"{A.REFERENCE_DENSE_LIMIT:.3g} (the dense one would not fit).",
               *rec_lines])


DEMO = Demo(name="attention-backends",
            description="attention kernels (naive, xla, cudnn, Pallas, chunked): fwd and fwd+bwd ms, TFLOP/s in "
                        "both FLOPs conventions, errors vs fp32, recommendation",
            config=Config, run=run, kind="benches", topic="attention_backends")
