"""The one FLOPs estimator every budget and every speedup claim goes through.

It prices the program that runs: the optimised HLO of the compiled executable (``compiled.as_text()``), after
XLA's dead-code removal, constant folding, unrolling and fusion. Every instruction is priced from its shapes with
exact Python integers, following XLA's ``HloCostAnalysis`` conventions (elementwise op: one FLOP per output
element; dot: 2 per multiply-add, 8 for complex operands; convolution: only taps that hit real input, so padding
and dilation zeros are not counted; reduce: the reducer's cost per combined element). Where XLA prices a
``while`` body once, we multiply each body (and its condition, which runs once more) by the
``known_trip_count`` XLA recorded on the loop, nested loops multiplied through; a conditional is priced at its
dearest branch. One compile per program, nothing compiled twice, results cached by program fingerprint.

Figures (all exact ints; see README "FLOPs: which number is which"):

* ``flops``: every FLOP the program executes, summed over all ``devices`` (what budgets charge).
  ``flops_per_device`` is one device's share (what MFU divides by a chip's peak).
* ``matmul_flops``: the dot / convolution / GEMM-call part of ``flops``, also global. Analytic formulas
  (6N + 12·L·H·Dh·T) are compared with it.
* ``xla_raw``: XLA's own ``cost_analysis()`` flops, per device, each loop body once, float32-rounded: a
  diagnostic only.

Custom calls XLA cannot see into are priced analytically from their operand shapes where we know what they compute
(cuBLAS / cuBLASLt GEMMs, cuDNN convolutions and fused attention) and listed in ``analytic``; anything else (LAPACK,
Pallas/Triton kernels, host callbacks that return values), a ``while`` without a known trip count, or an opcode this
module does not know is listed by name in ``unknown``, never silently counted as zero.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import re
import time
from typing import Any, Callable

import jax

# Opcodes that do no arithmetic (data movement, bookkeeping, collectives other than all-reduce).
_FREE_OPS = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy", "copy-start", "copy-done",
    "broadcast", "reshape", "dynamic-reshape", "transpose", "slice", "dynamic-slice", "dynamic-update-slice",
    "concatenate", "pad", "reverse", "gather", "iota", "after-all", "add-dependency", "domain", "opt-barrier",
    "partition-id", "replica-id", "get-dimension-size", "set-dimension-size", "all-gather", "all-gather-start",
    "all-gather-done", "all-to-all", "ragged-all-to-all", "reduce-scatter", "collective-permute",
    "collective-permute-start", "collective-permute-done", "collective-broadcast", "all-reduce-done", "send",
    "send-done", "recv", "recv-done", "infeed", "outfeed", "async-done", "async-update", "rng-get-and-update-state",
    "top-k", "batch-norm-training", "batch-norm-inference", "batch-norm-grad",
})
_TRANSCENDENTAL_OPS = frozenset({
    "erf", "exponential", "exponential-minus-one", "log", "log-plus-one", "logistic", "power", "sqrt", "cbrt",
    "rsqrt", "tanh", "sine", "cosine", "tan", "atan2", "acos", "acosh", "asin", "asinh", "atanh", "cosh", "sinh",
})
_ELEMENTWISE_OPS = frozenset({
    "abs", "add", "and", "ceil", "clamp", "count-leading-zeros", "compare", "complex", "convert", "bitcast-convert",
    "divide", "floor", "imag", "is-finite", "maximum", "minimum", "multiply", "negate", "not", "or", "popcnt", "real",
    "reduce-precision", "remainder", "round-nearest-afz", "round-nearest-even", "select", "shift-left",
    "shift-right-arithmetic", "shift-right-logical", "sign", "stochastic-convert", "subtract", "xor",
})
# Opcodes that move no data themselves (aliases, bookkeeping) or whose called computations are priced instead.
_UNMOVED = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
                      "add-dependency", "domain", "while", "conditional", "call", "async-start"})
# Custom-call targets that are bookkeeping, not compute.
_FREE_CUSTOM_CALLS = frozenset({
    "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "annotate_device_placement",
    "MoveToHost", "MoveToDevice", "AllocateBuffer", "LayoutConstraint", "X64Combine", "X64SplitLow",
    "X64SplitHigh", "PinToDevice", "PinToDeviceSram",
})
_GEMM_CALLS = ("__cublas$gemm", "__cublas$lt$matmul")  # and their $f8 variants
_CONV_CALLS = ("__cudnn$conv",)
_FMHA_CALLS = ("__cudnn$fmha",)
_DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32,
    "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128, "token": 0,
}
_COMPLEX = frozenset({"c64", "c128"})

_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INST_RE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE_RE = re.compile(r"\s*([a-z][\w\-]*)\(")
_ARRAY_RE = re.compile(r"^(\w+)\[([^\]]*)\]")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLED_RE = re.compile(r"\b(calls|to_apply|body|condition|select|scatter|true_computation|false_computation)="
                        r"%?([\w.\-]+)")
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_TARGET_RE = re.compile(r'custom_call_target="([^"]+)"')
_BRACKET_RE = re.compile(r'[()\[\]{}"]')
_SPLIT_RE = re.compile(r"[()\[\]{},]")
_COMMENT_RE = re.compile(r"/\*.*?\*/")  # XLA marks every fifth tuple element with /*index=N*/


@dataclasses.dataclass(frozen=True)
class FlopsRecord:
    flops: int
    xla_raw: int
    matmul_flops: int
    transcendentals: int
    bytes_accessed: int
    unknown: tuple[str, ...] = ()
    devices: int = 1
    flops_per_device: int = 0
    loops: tuple[dict, ...] = ()
    analytic: tuple[str, ...] = ()
    compile_s: float = dataclasses.field(default=0.0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "unknown": list(self.unknown), "loops": [dict(x) for x in self.loops],
                "analytic": list(self.analytic)}


# --- compile once, price, cache -----------------------------------------------------------------------------------

_CACHE: collections.OrderedDict[str, tuple[FlopsRecord, Any]] = collections.OrderedDict()
_CACHE_SIZE = 32


def count_flops(fn: Callable, *args, **kwargs) -> FlopsRecord:
    """Price one call of ``fn(*args, **kwargs)``: plain, ``jax.jit``/``nnx.jit``, a grad of either, or a function
    of Flax NNX modules."""
    record, _ = compile_and_count(fn, *args, **kwargs)
    return record


def compile_and_count(fn: Callable, *args, **kwargs) -> tuple[FlopsRecord, Any]:
    """Like ``count_flops`` but also returns the compiled executable, so callers compile the step once.
    A program compiled before (same lowered module text) is not compiled again."""
    start = time.perf_counter()
    lowered = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args, **kwargs)
    key = _fingerprint(lowered)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    compiled = lowered.compile()
    record = dataclasses.replace(price(compiled), compile_s=time.perf_counter() - start)
    _CACHE[key] = (record, compiled)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return record, compiled


def _fingerprint(lowered: Any) -> str:
    """The lowered module plus what the text leaves out and the executable depends on: argument trees, and the
    devices and shardings it is compiled for (JAX keeps those in its lowering; absent, the text alone)."""
    args = getattr(getattr(lowered, "_lowering", None), "compile_args", {})
    extra = (lowered.in_tree, lowered.out_tree, args.get("in_shardings"), args.get("out_shardings"),
             args.get("backend"), args.get("device_assignment"))
    return hashlib.sha256((lowered.as_text() + repr(extra)).encode()).hexdigest()


def price(compiled: Any) -> FlopsRecord:
    """Price a compiled executable (``jax.stages.Compiled``) from its optimised HLO."""
    return price_hlo(compiled.as_text() or "", xla_raw=_xla_flops(compiled))


def price_hlo(hlo_text: str, xla_raw: int = 0) -> FlopsRecord:
    """Price an optimised HLO module given as text (what ``compiled.as_text()`` or an XLA dump holds)."""
    module = _Module(hlo_text)
    pricer = _Pricer(module)
    cost = pricer.computation(module.entry, top_level=True, runs=1)
    n = module.devices
    return FlopsRecord(flops=cost.flops * n, xla_raw=xla_raw, matmul_flops=cost.matmul * n,
                       transcendentals=cost.transcendentals * n, bytes_accessed=cost.bytes * n,
                       unknown=tuple(dict.fromkeys(pricer.unknown)), devices=n, flops_per_device=cost.flops,
                       loops=tuple(pricer.loops), analytic=tuple(dict.fromkeys(pricer.analytic)))


def _xla_flops(compiled: Any) -> int:
    analysis = compiled.cost_analysis()
    # JAX has returned a dict, a list with one dict per program, or None across versions and backends.
    parts = analysis if isinstance(analysis, (list, tuple)) else [analysis]
    return int(sum(float(a.get("flops", 0.0)) for a in parts if a))


# --- the HLO text -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Inst:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at ``text[start]``, skipping quoted strings."""
    depth, quoted = 0, False
    for m in _BRACKET_RE.finditer(text, start):
        ch = m.group()
        if quoted:
            quoted = not (ch == '"' and text[m.start() - 1] != "\\")
        elif ch == '"':
            quoted = True
        elif ch in "([{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return m.end()
    return len(text)


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, last = [], 0, 0
    for m in _SPLIT_RE.finditer(text):
        ch = m.group()
        if ch in "([{":
            depth += 1
        elif ch != ",":
            depth -= 1
        elif depth == 0:
            parts.append(text[last:m.start()])
            last = m.end()
    parts.append(text[last:])
    return [p.strip() for p in parts if p.strip()]


def _parse_inst(line: str) -> _Inst | None:
    m = _INST_RE.match(line)
    if not m:
        return None
    rest = m.group(3)
    if rest.startswith("("):
        end = _matching(rest, 0)
    else:
        end = rest.find(" ")
    shape, rest = rest[:end], rest[end:]
    op = _OPCODE_RE.match(rest)
    if not op:
        return None
    open_at = op.end() - 1
    close_at = _matching(rest, open_at)
    operand_text = rest[open_at + 1:close_at - 1]
    opcode = op.group(1)
    operands = [] if opcode == "constant" else [p.split()[-1].lstrip("%") for p in _split_top(operand_text)]
    return _Inst(m.group(2), shape, opcode, operands, rest[close_at:])


class _Module:
    def __init__(self, text: str):
        self.computations: dict[str, list[_Inst]] = {}
        self.entry = ""
        header = text.split("\n", 1)[0]
        partitions = re.search(r"\bnum_partitions=(\d+)", header)
        replicas = re.search(r"\breplica_count=(\d+)", header)
        self.devices = int(partitions.group(1) if partitions else 1) * int(replicas.group(1) if replicas else 1)
        current: list[_Inst] | None = None
        for line in text.splitlines():
            if current is None:
                m = _HEADER_RE.match(line)
                if m and not line.startswith("HloModule"):
                    current = self.computations.setdefault(m.group(2), [])
                    if m.group(1):
                        self.entry = m.group(2)
            elif line.strip() == "}":
                current = None
            else:
                inst = _parse_inst(_COMMENT_RE.sub("", line) if "/*" in line else line)
                if inst is not None:
                    current.append(inst)
        if not self.entry and self.computations:
            self.entry = list(self.computations)[-1]


# --- shapes -------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=65536)
def _leaves(shape: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(dtype, dims) of every array in a (possibly nested tuple) shape."""
    shape = shape.strip()
    if shape.startswith("("):
        return tuple(leaf for part in _split_top(shape[1:_matching(shape, 0) - 1]) for leaf in _leaves(part))
    m = _ARRAY_RE.match(shape)
    if not m:
        return ()
    dims = tuple(int(d.strip().lstrip("<=")) for d in m.group(2).split(",") if d.strip())
    return ((m.group(1), dims),)


def _first(shape: str) -> tuple[str, tuple[int, ...]]:
    leaves = _leaves(shape)
    return leaves[0] if leaves else ("token", ())


def _elements(shape: str) -> int:
    return math.prod(_first(shape)[1])


def _all_elements(shape: str) -> int:
    return sum(math.prod(d) for t, d in _leaves(shape) if t != "token")


@functools.lru_cache(maxsize=65536)
def _bytes(shape: str) -> int:
    return sum(math.prod(d) * _DTYPE_BITS.get(t, 8) // 8 for t, d in _leaves(shape))


def _ints(attrs: str, key: str) -> list[int]:
    m = re.search(rf"\b{key}=\{{([^}}]*)\}}", attrs)
    return [int(v) for v in m.group(1).split(",") if v.strip()] if m else []


def _backend_config(attrs: str) -> dict:
    at = attrs.find("backend_config=")
    if at < 0:
        return {}
    start = at + len("backend_config=")
    if attrs.startswith('"', start):  # older XLA prints the JSON as a quoted, escaped string
        end = start + 1
        while end < len(attrs) and not (attrs[end] == '"' and attrs[end - 1] != "\\"):
            end += 1
        raw = attrs[start + 1:end].encode().decode("unicode_escape")
    else:
        raw = attrs[start:_matching(attrs, start)]
    try:
        config = json.loads(raw)
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


# --- pricing ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Cost:
    flops: int = 0
    transcendentals: int = 0
    bytes: int = 0
    matmul: int = 0

    def __add__(self, other: "_Cost") -> "_Cost":
        return _Cost(self.flops + other.flops, self.transcendentals + other.transcendentals,
                     self.bytes + other.bytes, self.matmul + other.matmul)

    def __mul__(self, k: int) -> "_Cost":
        return _Cost(self.flops * k, self.transcendentals * k, self.bytes * k, self.matmul * k)

    def arithmetic(self) -> "_Cost":
        return _Cost(self.flops, self.transcendentals, 0, self.matmul)


_Array = tuple[str, tuple[int, ...]]  # (dtype, dims)


def _dot_flops(lhs: _Array, out: _Array, contracting: list[int]) -> int:
    per_mac = 8 if lhs[0] in _COMPLEX or out[0] in _COMPLEX else 2
    return per_mac * math.prod(out[1]) * math.prod(lhs[1][d] for d in contracting)


def _window(attrs: str) -> list[dict[str, int]]:
    m = re.search(r"\bwindow=\{([^}]*)\}", attrs)
    if not m:
        return []
    fields = dict(kv.split("=", 1) for kv in m.group(1).split())
    size = [int(v) for v in fields["size"].split("x")]
    dims = [{"size": s, "stride": 1, "pad_lo": 0, "pad_hi": 0, "lhs_dilate": 1, "rhs_dilate": 1} for s in size]
    for key in ("stride", "lhs_dilate", "rhs_dilate"):
        for d, v in zip(dims, fields.get(key, "").split("x") if key in fields else []):
            d[key] = int(v)
    if "pad" in fields:
        for d, v in zip(dims, fields["pad"].split("x")):
            lo, hi = v.split("_")
            d["pad_lo"], d["pad_hi"] = int(lo), int(hi)
    return dims


def _valid_taps(in_size: int, out_size: int, kernel: int, w: dict[str, int]) -> int:
    """(output position, kernel tap) pairs that read a real input element: padding and lhs-dilation holes skipped."""
    if w["stride"] == 1 and w["lhs_dilate"] == 1:
        return sum(max(min(in_size + w["pad_lo"] - k * w["rhs_dilate"], out_size)
                       - max(w["pad_lo"] - k * w["rhs_dilate"], 0), 0) for k in range(kernel))
    count = 0
    for k in range(kernel):
        for o in range(out_size):
            pos = o * w["stride"] - w["pad_lo"] + k * w["rhs_dilate"]
            if pos % w["lhs_dilate"] == 0 and 0 <= pos // w["lhs_dilate"] < in_size:
                count += 1
    return count


def _conv_flops(lhs_array: _Array, rhs_array: _Array, out_array: _Array, attrs: str) -> int:
    labels = re.search(r"\bdim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not labels:
        return 0
    lhs_l, rhs_l, out_l = labels.groups()
    (dtype, lhs), rhs, out = lhs_array, rhs_array[1], out_array[1]
    window = _window(attrs)
    taps = 1
    for s, w in enumerate(window):
        taps *= _valid_taps(lhs[lhs_l.index(str(s))], out[out_l.index(str(s))], rhs[rhs_l.index(str(s))], w)
    groups = int(re.search(r"feature_group_count=(\d+)", attrs).group(1)) if "feature_group_count" in attrs else 1
    batch_groups = int(re.search(r"batch_group_count=(\d+)", attrs).group(1)) if "batch_group_count" in attrs else 1
    macs = (lhs[lhs_l.index("f")] // groups) * out[out_l.index("f")] * (lhs[lhs_l.index("b")] // batch_groups) * taps
    return (8 if dtype in _COMPLEX else 2) * macs


class _Pricer:
    def __init__(self, module: _Module):
        self.module = module
        self.unknown: list[str] = []
        self.analytic: list[str] = []
        self.loops: list[dict] = []
        self._memo: dict[tuple[str, bool], _Cost] = {}
        self._loops_inside: dict[str, bool] = {}

    def computation(self, name: str, top_level: bool, runs: int) -> _Cost:
        """Cost of one run of computation ``name``; ``runs`` (how often it runs) is only for the loop report.
        Memoised per computation once no loop inside needs reporting under a new multiplier."""
        key = (name, top_level)
        if key in self._memo and not self._has_loops(name, frozenset()):
            return self._memo[key]
        insts = self.module.computations.get(name, [])
        shapes = {i.name: i.shape for i in insts}
        total = _Cost()
        for inst in insts:
            total = total + self.instruction(inst, shapes, top_level, runs)
        self._memo[key] = total
        return total

    def _has_loops(self, name: str, seen: frozenset) -> bool:
        if name not in self._loops_inside:
            self._loops_inside[name] = any(
                inst.opcode == "while" or any(c not in seen and self._has_loops(c, seen | {name})
                                              for _, c in _CALLED_RE.findall(inst.attrs))
                for inst in self.module.computations.get(name, []))
        return self._loops_inside[name]

    def instruction(self, inst: _Inst, shapes: dict[str, str], top_level: bool, runs: int) -> _Cost:
        op = inst.opcode
        operand_shapes = [shapes.get(o, "") for o in inst.operands]
        called = dict(_CALLED_RE.findall(inst.attrs))
        memory = (_bytes(inst.shape) + sum(_bytes(s) for s in operand_shapes)
                  if top_level and op not in _UNMOVED else 0)
        if op in _ELEMENTWISE_OPS:
            return _Cost(flops=_elements(inst.shape), bytes=memory)
        if op in _TRANSCENDENTAL_OPS:
            return _Cost(transcendentals=_elements(inst.shape), bytes=memory)
        if op == "dot":
            f = _dot_flops(_first(operand_shapes[0]), _first(inst.shape), _ints(inst.attrs, "lhs_contracting_dims"))
            return _Cost(flops=f, matmul=f, bytes=memory)
        if op == "convolution":
            f = _conv_flops(_first(operand_shapes[0]), _first(operand_shapes[1]), _first(inst.shape), inst.attrs)
            return _Cost(flops=f, matmul=f, bytes=memory)
        if op == "fusion":
            return self.computation(called["calls"], False, runs).arithmetic() + _Cost(bytes=memory)
        if op in ("call", "async-start"):
            return self.computation(called.get("to_apply") or called["calls"], top_level, runs)
        if op == "while":
            return self.loop(inst, called, top_level, runs)
        if op == "conditional":
            names = ([b.strip().lstrip("%") for b in _BRANCHES_RE.search(inst.attrs).group(1).split(",")]
                     if "branch_computations" in inst.attrs else
                     [called["true_computation"], called["false_computation"]])
            # One branch runs; which is data-dependent, so the dearest is the honest upper bound.
            return max((self.computation(b, top_level, runs) for b in names), key=lambda c: (c.flops, c.matmul))
        if op in ("reduce", "reduce-window", "map", "scatter", "all-reduce", "all-reduce-start", "select-and-scatter"):
            return self.applied(inst, operand_shapes, called, runs) + _Cost(bytes=memory)
        if op == "sort":
            n = _elements(operand_shapes[0])
            return _Cost(flops=n * max(n - 1, 0).bit_length(), bytes=memory)
        if op == "fft":
            logs = math.prod(max(int(v).bit_length() - 1, 0) for v in _ints(inst.attrs, "fft_length"))
            return _Cost(flops=2 * 4 * logs * _elements(operand_shapes[0]), bytes=memory)
        if op == "triangular-solve":
            return _Cost(flops=2 * _first(operand_shapes[0])[1][-1] * _elements(operand_shapes[1]), bytes=memory)
        if op == "cholesky":
            a = _first(operand_shapes[0])[1]
            return _Cost(flops=a[-1] * math.prod(a) // 3, bytes=memory)
        if op in ("rng", "rng-bit-generator"):
            return _Cost(transcendentals=_all_elements(inst.shape), bytes=memory)
        if op == "custom-call":
            return self.custom_call(inst, operand_shapes) + _Cost(bytes=memory)
        if op in _FREE_OPS:
            return _Cost(bytes=memory)
        self.unknown.append(f"opcode:{op} (not priced)")
        return _Cost(bytes=memory)

    def loop(self, inst: _Inst, called: dict[str, str], top_level: bool, runs: int) -> _Cost:
        trip = _TRIP_RE.search(inst.attrs)
        n = int(trip.group(1)) if trip else None
        self.loops.append({"computation": called["body"], "while": inst.name, "trip_count": n, "runs": runs})
        if n is None:
            self.unknown.append(f"while:{inst.name} (no known trip count; body priced once)")
        k = 1 if n is None else n
        body = self.computation(called["body"], top_level, runs * k)
        cond = self.computation(called["condition"], top_level, runs * (k + 1))
        return body * k + cond * (k + 1)

    def applied(self, inst: _Inst, operand_shapes: list[str], called: dict[str, str], runs: int) -> _Cost:
        """Ops that apply a scalar computation many times; XLA's counting rules."""
        op = inst.opcode
        if op == "select-and-scatter":
            select = self.computation(called["select"], False, runs).arithmetic()
            scatter = self.computation(called["scatter"], False, runs).arithmetic()
            window = math.prod(w["size"] for w in _window(inst.attrs))
            source = _elements(operand_shapes[1])
            return select * (source * (window - 1)) + scatter * source
        if op in ("all-reduce", "all-reduce-start"):
            return _Cost(flops=_all_elements(inst.shape))
        fn = self.computation(called["to_apply"], False, runs).arithmetic()
        out = _elements(inst.shape)
        if op == "reduce":
            return fn * (_elements(operand_shapes[0]) - out)
        if op == "map":
            return fn * out
        if op == "scatter":
            return fn * _elements(operand_shapes[(len(operand_shapes) - 1) // 2 + 1])
        window = _window(inst.attrs)
        size = math.prod(w["size"] for w in window)
        count = (size - 1) * out
        # XLA prices a reduce-window that is a reduce broadcast back along one axis (a cumulative sum) as such.
        reducing = [(i, w) for i, w in enumerate(window) if w["size"] != 1]
        padded = [w for w in window if w["pad_lo"] or w["pad_hi"]]
        dims = _first(inst.shape)[1]
        if len(reducing) == 1 and len(padded) == 1:
            i, w = reducing[0]
            if w["pad_lo"] == w["pad_hi"] == dims[i] - 1 and w["size"] == 2 * w["pad_lo"] + 1:
                count = out // dims[i] + dims[i] - 1
        return fn * count

    def custom_call(self, inst: _Inst, operand_shapes: list[str]) -> _Cost:
        target_m = _TARGET_RE.search(inst.attrs)
        target = target_m.group(1) if target_m else "?"
        if target in _FREE_CUSTOM_CALLS:
            return _Cost()
        if "callback" in target and not _all_elements(inst.shape):
            return _Cost()  # a host callback that returns nothing (jax.debug.print) computes nothing on device
        if target.startswith(_GEMM_CALLS):
            dims = _backend_config(inst.attrs).get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
            contracting = [int(d) for d in dims.get("lhs_contracting_dimensions", [])]
            if contracting:
                f = _dot_flops(_first(operand_shapes[0]), _first(inst.shape), contracting)
                self.analytic.append(f"custom_call:{target} (2·M·N·K from operand shapes)")
                return _Cost(flops=f, matmul=f)
        if target.startswith(_CONV_CALLS):
            f = self.cudnn_conv(target, inst, operand_shapes)
            if f:
                self.analytic.append(f"custom_call:{target} (convolution from window and operand shapes)")
                return _Cost(flops=f, matmul=f)
        if target.startswith(_FMHA_CALLS):
            f = self.cudnn_fmha(target, inst, operand_shapes)
            if f:
                self.analytic.append(f"custom_call:{target} (attention matmuls from operand shapes; causal and "
                                     f"windowed masks counted at full T x S)")
                return _Cost(flops=f, matmul=f)
        self.unknown.append(f"custom_call:{target}")
        return _Cost()

    @staticmethod
    def cudnn_conv(target: str, inst: _Inst, operand_shapes: list[str]) -> int:
        if len(operand_shapes) < 2:
            return 0
        result, a, b = _first(inst.shape), _first(operand_shapes[0]), _first(operand_shapes[1])
        if "BackwardInput" in target:  # operands (dy, w) -> dx: priced as the forward convolution x * w = dy
            return _conv_flops(result, b, a, inst.attrs)
        if "BackwardFilter" in target:  # operands (x, dy) -> dw
            return _conv_flops(a, result, b, inst.attrs)
        return _conv_flops(a, b, result, inst.attrs)

    @staticmethod
    def cudnn_fmha(target: str, inst: _Inst, operand_shapes: list[str]) -> int:
        """Forward: S = Q·Kᵀ and O = P·V, 2·B·N·T·S·(Dqk + Dv). Backward: S recomputed, then dV, dP, dQ, dK:
        2·B·N·T·S·(3·Dqk + 2·Dv). B, N, T, S come from the BNTS score shape in the backend config."""
        config = _backend_config(inst.attrs).get("cudnn_fmha_backend_config", {})
        dims = [int(d) for d in config.get("intermediate_tensor_shape", {}).get("dimensions", [])]
        if len(dims) != 4 or len(operand_shapes) < 3:
            return 0
        b, n, t, s = dims
        d_qk = _elements(operand_shapes[0]) // (b * n * t)
        d_v = _elements(operand_shapes[2]) // (b * n * s)
        scores = 2 * b * n * t * s
        return scores * (3 * d_qk + 2 * d_v) if "Backward" in target else scores * (d_qk + d_v)


# --- analytic counts that tests and budgets are checked against -------------------------------------------------

def matmul_flops(m: int, k: int, n: int, batch: int = 1) -> int:
    """(batch x m x k) @ (k x n): one multiply and one add per term."""
    return 2 * batch * m * k * n


def mlp_flops(tokens: int, d_in: int, d_hidden: int, d_out: int | None = None) -> int:
    """Forward FLOPs of a two-matmul MLP (elementwise activation not counted)."""
    d_out = d_in if d_out is None else d_out
    return matmul_flops(tokens, d_in, d_hidden) + matmul_flops(tokens, d_hidden, d_out)


def attention_flops(batch: int, seq: int, n_heads: int, head_dim: int) -> int:
    """Forward FLOPs of QK^T and AV. Causal attention is counted with the full T x T score matrix (the
    PaLM/nanochat convention): that is what a masked dense kernel executes; a causal-skipping kernel does ~half."""
    return 2 * matmul_flops(seq, head_dim, seq, batch=batch * n_heads)


def transformer_train_flops_per_token(n_matmul_params: int, n_layers: int, n_heads: int, head_dim: int,
                                      seq_len: int) -> int:
    """Training FLOPs per token (forward + backward = 3x forward): 6·N + 12·L·H·Dh·T (nanochat estimate_flops)."""
    return 6 * n_matmul_params + 12 * n_layers * n_heads * head_dim * seq_len
