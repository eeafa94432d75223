"""Seeded weights and activations that look like a trained transformer layer's, for approximation benches.

Random Gaussian weights have a flat singular spectrum, on which every low-rank method looks equally bad, and
isotropic activations make data-aware methods pointless. Trained layers have neither property, so:
  * weights: W = U diag(s) Vᵀ with random orthogonal U, V (QR of Gaussians) and a decaying spectrum,
    "power": s_i ∝ (i+1)^-alpha, or "exp": s_i ∝ exp(-alpha·i/k) (alpha = e-folds across all k values);
    scaled so ||W||_F² = d_out (unit-variance outputs for unit-variance isotropic inputs);
  * activations: X = Z diag(sqrt(λ)) Qᵀ with covariance eigenvalues λ_i ∝ (i+1)^-beta (mean 1) in a random
    basis Q; Z is Gaussian or unit-variance Student-t (heavy tails), and a few "outlier" channels are scaled
    up after the rotation, like the massive-activation channels of real LLMs;
  * MLP (relu², as nanochat): W1 (d x h), W2 (h x d) as above, with a log-normal gain per hidden neuron on W2's
    rows, because trained MLPs have very unequal neurons, which is what makes neuron pruning viable.
Tokens are split into train (calibration, --tokens-train), val (held-out error, --tokens-val) and bench (the
timed calls, --tokens) sets.

Real layers (--from-checkpoint): `load_layer_arrays(path, ...)` gives W1 (c_fc), W2 (c_proj) and the captured MLP
inputs X of one block (--checkpoint-layer) of a trained nanochat model, either straight from a run directory with
orbax checkpoints (through nanochat.export, which captures X on the run's training data) or from a .npz that
`python -m nanochat.export` wrote; linear problems take W1 as W. `mlp_problem_from_arrays` /
`linear_problem_from_arrays` turn plain arrays into the same problems.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mgr.errors import UserError

DECAYS = ("power", "exp")


@dataclass
class InputSpec:
    """Where a bench's weights and activations come from. Demo configs subclass it (through
    variant_bench.BenchSpec), so every field is also a CLI flag of those demos."""

    sv_decay: str = field(default="power", metadata={
        "help": "how the singular values of generated weights decay (not an optimizer's weight decay)",
        "choices": DECAYS})
    weight_alpha: float = field(default=1.0, metadata={
        "help": "decay rate: power s_i ~ (i+1)^-alpha, exp s_i ~ exp(-alpha*i/k)"})
    act_beta: float = field(default=1.0, metadata={"help": "activation covariance eigenvalues ~ (i+1)^-beta"})
    heavy_tail_df: float | None = field(default=None, metadata={
        "help": "Student-t degrees of freedom (> 2) for heavy-tailed activations; none = Gaussian"})
    outlier_channels: int = field(default=0, metadata={"help": "activation channels scaled up by outlier_scale"})
    outlier_scale: float = field(default=10.0, metadata={"help": "scale of the outlier channels"})
    neuron_gain_sigma: float = field(default=0.75, metadata={
        "help": "log-normal sigma of per-neuron output gains (generated MLPs)"})
    tokens_train: int = field(default=2048, metadata={"help": "calibration tokens (factorisations, statistics)"})
    tokens_val: int = field(default=1024, metadata={"help": "held-out tokens the output errors are measured on"})
    tokens: int = field(default=2048, metadata={"help": "tokens per timed call (the bench split)",
                                                "aliases": ("--tokens-bench",)})
    from_checkpoint: str | None = field(default=None, metadata={
        "help": "a trained nanochat layer replaces the generated inputs: a nanochat run directory (or its "
                "checkpoints/ or checkpoints/STEP; newest step by default) or a .npz (w1, w2, x) from "
                "`python -m nanochat.export`; W = the MLP's c_fc, X = the inputs that MLP sees"})
    checkpoint_layer: int = field(default=0, metadata={
        "help": "block whose MLP --from-checkpoint takes from a run directory (ignored for a .npz)"})

    def validate(self, d_in: int, d_out: int) -> None:
        if min(d_in, d_out) < 1:
            raise UserError(f"layer sizes must be >= 1, got {d_in} x {d_out}")
        if self.sv_decay not in DECAYS:
            raise UserError(f"unknown singular-value decay {self.sv_decay!r} (choose one of {', '.join(DECAYS)})")
        for name in ("weight_alpha", "act_beta", "neuron_gain_sigma", "outlier_scale"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserError(f"{_flag(name)} must be a finite number >= 0, got {getattr(self, name)}")
        if self.heavy_tail_df is not None and not self.heavy_tail_df > 2:
            raise UserError(f"heavy_tail_df must be > 2 (finite variance), got {self.heavy_tail_df}")
        if not 0 <= self.outlier_channels <= d_in:
            raise UserError(f"outlier_channels must be in [0, {d_in}], got {self.outlier_channels}")


    def check(self, budget=None) -> None:
        """What can be checked before a run starts (Demo.check): sizes come from the file with --from-checkpoint."""
        _total_tokens(self)
        if self.from_checkpoint:
            path = Path(self.from_checkpoint)
            if not path.exists():
                raise UserError(f"--from-checkpoint: checkpoint not found: {path}")
            if not path.is_dir() and path.suffix != ".npz":
                raise UserError(f"--from-checkpoint {path}: expected a nanochat run directory or a .npz with "
                                "arrays w1, w2, x")
            if path.is_file():
                load_layer_arrays(path)  # a .npz is small next to the run: open it now rather than fail later
        else:
            dmodel = getattr(self, "dmodel", 1)
            self.validate(dmodel, dmodel)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Splits(NamedTuple):
    train: np.ndarray  # calibration tokens (factorisations, importance statistics)
    val: np.ndarray  # held-out tokens for output errors
    bench: np.ndarray  # tokens the timed functions run on


class LinearProblem(NamedTuple):
    w_IO: np.ndarray
    x: Splits


class MLPProblem(NamedTuple):
    w1_DH: np.ndarray
    w2_HD: np.ndarray
    x: Splits


def decaying_spectrum(k: int, decay: str = "power", alpha: float = 1.0) -> np.ndarray:
    i = np.arange(k, dtype=np.float64)
    if decay == "power":
        return (i + 1) ** -alpha
    if decay == "exp":
        return np.exp(-alpha * i / k)
    raise UserError(f"unknown decay {decay!r} (choose one of {', '.join(DECAYS)})")


def random_orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """n x k with orthonormal columns, Haar-distributed (sign-corrected QR)."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def decaying_weight(rng: np.random.Generator, d_in: int, d_out: int, spec: InputSpec) -> np.ndarray:
    k = min(d_in, d_out)
    s = decaying_spectrum(k, spec.sv_decay, spec.weight_alpha)
    s *= np.sqrt(d_out / np.sum(s**2))
    w = (random_orthonormal(rng, d_in, k) * s) @ random_orthonormal(rng, d_out, k).T
    return w.astype(np.float32)


def correlated_activations(rng: np.random.Generator, n: int, d: int, spec: InputSpec) -> np.ndarray:
    lam = (np.arange(d) + 1.0) ** -spec.act_beta
    lam *= d / lam.sum()
    if spec.heavy_tail_df is None:
        z = rng.standard_normal((n, d))
    else:
        df = spec.heavy_tail_df
        z = rng.standard_t(df, (n, d)) / np.sqrt(df / (df - 2))
    x = (z * np.sqrt(lam)) @ random_orthonormal(rng, d, d).T
    outliers = rng.choice(d, spec.outlier_channels, replace=False)
    x[:, outliers] *= spec.outlier_scale
    return x.astype(np.float32)


def _total_tokens(spec: InputSpec) -> int:
    if min(spec.tokens_train, spec.tokens_val, spec.tokens) < 1:
        raise UserError(f"tokens_train, tokens_val and tokens (bench) must be >= 1, got {spec.tokens_train}, "
                        f"{spec.tokens_val} and {spec.tokens}")
    return spec.tokens_train + spec.tokens_val + spec.tokens


def split_tokens(rng: np.random.Generator, x: np.ndarray, spec: InputSpec) -> Splits:
    need = _total_tokens(spec)
    if x.shape[0] < need:
        raise UserError(f"need {need} activation rows (train+val+bench), got {x.shape[0]}")
    perm = rng.permutation(x.shape[0])
    a, b = spec.tokens_train, spec.tokens_train + spec.tokens_val
    return Splits(x[perm[:a]], x[perm[a:b]], x[perm[b:need]])


def make_linear_problem(seed: int, d_in: int, d_out: int, spec: InputSpec | None = None) -> LinearProblem:
    """A generated layer, or with spec.from_checkpoint the W1 and captured inputs of a real one
    (d_in/d_out are then taken from the file)."""
    spec = spec or InputSpec()
    if spec.from_checkpoint:
        w1, _, x = _checkpoint_arrays(spec, seed)
        return linear_problem_from_arrays(w1, x, spec, seed)
    spec.validate(d_in, d_out)
    rng = np.random.default_rng(seed)
    w = decaying_weight(rng, d_in, d_out, spec)
    x = correlated_activations(rng, _total_tokens(spec), d_in, spec)
    return LinearProblem(w, split_tokens(rng, x, spec))


def make_mlp_problem(seed: int, d: int, h: int, spec: InputSpec | None = None) -> MLPProblem:
    """A generated relu² MLP, or with spec.from_checkpoint a real nanochat layer (d/h taken from the file)."""
    spec = spec or InputSpec()
    if spec.from_checkpoint:
        return mlp_problem_from_arrays(*_checkpoint_arrays(spec, seed), spec, seed)
    spec.validate(d, h)
    rng = np.random.default_rng(seed)
    w1 = decaying_weight(rng, d, h, spec)
    gains = np.exp(spec.neuron_gain_sigma * rng.standard_normal(h))
    w2 = decaying_weight(rng, h, d, spec) * (gains / np.sqrt(np.mean(gains**2)))[:, None]
    x = correlated_activations(rng, _total_tokens(spec), d, spec)
    return MLPProblem(w1, w2.astype(np.float32), split_tokens(rng, x, spec))


# -------------------------------------------------------------------------------------- real layers


def _as_matrix(name: str, a) -> np.ndarray:
    a = np.asarray(a, np.float32)
    if a.ndim != 2 or not np.all(np.isfinite(a)):
        raise UserError(f"{name} must be a finite 2-D array, got shape {a.shape}")
    return a


def mlp_problem_from_arrays(w1_DH, w2_HD, x_ND, spec: InputSpec | None = None, seed: int = 0) -> MLPProblem:
    """An MLPProblem from a trained layer's weights and captured inputs (rows shuffled, then split)."""
    w1, w2, x = _as_matrix("W1", w1_DH), _as_matrix("W2", w2_HD), _as_matrix("X", x_ND)
    if w2.shape != (w1.shape[1], w1.shape[0]) or x.shape[1] != w1.shape[0]:
        raise UserError(f"inconsistent layer shapes W1 {w1.shape}, W2 {w2.shape}, X {x.shape}")
    return MLPProblem(w1, w2, split_tokens(np.random.default_rng(seed), x, spec or InputSpec()))


def linear_problem_from_arrays(w_IO, x_NI, spec: InputSpec | None = None, seed: int = 0) -> LinearProblem:
    w, x = _as_matrix("W", w_IO), _as_matrix("X", x_NI)
    if x.shape[1] != w.shape[0]:
        raise UserError(f"X has {x.shape[1]} columns but W has {w.shape[0]} rows")
    return LinearProblem(w, split_tokens(np.random.default_rng(seed), x, spec or InputSpec()))


def load_layer_arrays(path: str | Path, *, layer: int = 0, n_tokens: int = 8192,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W1 d x h, W2 h x d, X n x d) of one nanochat MLP layer: block `layer` of the checkpoint in a run directory
    (X captured on `n_tokens` tokens, see nanochat.export), or the arrays w1, w2, x of a .npz (layer, n_tokens and
    seed do not apply: the file fixes them)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        # imported here: only checkpoint users pay for (and need) nanochat
        from nanochat.export import layer_arrays
        return layer_arrays(path, layer=layer, n_tokens=n_tokens, seed=seed)
    if path.suffix != ".npz":
        raise UserError(f"expected a nanochat run directory or a .npz with arrays w1, w2, x, got {path}")
    try:
        with np.load(path) as f:
            return _as_matrix("w1", f["w1"]), _as_matrix("w2", f["w2"]), _as_matrix("x", f["x"])
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # BadZipFile: a truncated .npz
        raise UserError(f"unreadable layer file {path}: {str(e) or e.__class__.__name__}") from None


def _checkpoint_arrays(spec: InputSpec, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return load_layer_arrays(spec.from_checkpoint, layer=spec.checkpoint_layer, n_tokens=_total_tokens(spec),
                             seed=seed)
