"""Approximate matrix compute: low-rank factorisations, data-aware low rank, neuron pruning, 2:4 masks.

Conventions: a linear layer is y = x @ w with w_IO of shape (d_in, d_out); an MLP is
y = relu(x @ w1_DH)^2 @ w2_HD (relu², the nanochat MLP nonlinearity, so results transfer to that model).
Every approximation returns parameters for a variant that executes FEWER dense FLOPs (thin factors, a
smaller MLP), except the 2:4 mask, which JAX can only execute dense (see `nominal_2_4_flops`).

Factorisation matmuls run at HIGHEST precision because on GPUs the default float32 dot may use TF32,
which would put ~1e-3 noise into factors that the error-vs-rank tests measure at ~1e-6.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from mgr.errors import UserError

_HI = jax.lax.Precision.HIGHEST


class Dense(NamedTuple):
    w_IO: jax.Array


class LowRank(NamedTuple):
    """y = (x @ a_IR) @ b_RO [+ x[:, :m] * d_M on the first m = min(d_in, d_out) outputs]."""

    a_IR: jax.Array
    b_RO: jax.Array
    d_M: jax.Array | None = None


class MLP(NamedTuple):
    w1_DH: jax.Array
    w2_HD: jax.Array


class LowRankMLP(NamedTuple):
    up: LowRank  # replaces w1_DH
    down: LowRank  # replaces w2_HD


# ----------------------------------------------------------------------------------------------- apply


def dense_apply(p: Dense, x_NI: jax.Array) -> jax.Array:
    return x_NI @ p.w_IO


def low_rank_apply(p: LowRank, x_NI: jax.Array) -> jax.Array:
    # Thin-then-wide order is what makes the saving real: 2n·r·(d_in + d_out) instead of 2n·d_in·d_out.
    y_NO = (x_NI @ p.a_IR) @ p.b_RO
    if p.d_M is None:
        return y_NO
    m = p.d_M.shape[0]
    return y_NO.at[:, :m].add(x_NI[:, :m] * p.d_M)


def mlp_apply(p: MLP, x_ND: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(x_ND @ p.w1_DH)) @ p.w2_HD


def low_rank_mlp_apply(p: LowRankMLP, x_ND: jax.Array) -> jax.Array:
    return low_rank_apply(p.down, jnp.square(jax.nn.relu(low_rank_apply(p.up, x_ND))))


@jax.jit
def low_rank_weight(p: LowRank) -> jax.Array:
    """The dense d_in x d_out matrix the factors represent (for objectives, not for execution)."""
    w_IO = jnp.matmul(p.a_IR, p.b_RO, precision=_HI)
    if p.d_M is None:
        return w_IO
    m = p.d_M.shape[0]
    return w_IO.at[jnp.arange(m), jnp.arange(m)].add(p.d_M)


@jax.jit
def relative_error_array(y: jax.Array, y_ref: jax.Array) -> jax.Array:
    """||y - y_ref||_F / ||y_ref||_F in float32 whatever the compute dtype; traceable (eval functions)."""
    y, y_ref = y.astype(jnp.float32), y_ref.astype(jnp.float32)
    return jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref)


def relative_error(y, y_ref) -> float:
    return float(relative_error_array(jnp.asarray(y), jnp.asarray(y_ref)))


@jax.jit
def _activation_error(x_NI, w_IO, w_hat_IO):
    return jnp.linalg.norm(jnp.matmul(x_NI, w_IO - w_hat_IO, precision=_HI))


def activation_error(x_NI, w_IO, w_hat_IO) -> float:
    """||X (W - Ŵ)||_F, the objective data-aware low rank minimises."""
    return float(_activation_error(*(jnp.asarray(a, jnp.float32) for a in (x_NI, w_IO, w_hat_IO))))


# ----------------------------------------------------------------------------------------------- SVD


def ranks_for(fracs, full_rank: int) -> list[int]:
    """Sorted distinct ranks round(f·full_rank) (at least 1) for fractions f in (0, 1]."""
    if not fracs or any(not 0 < f <= 1 for f in fracs):
        raise UserError(f"rank fractions must be a non-empty list of values in (0, 1], got {tuple(fracs)}")
    return sorted({max(1, round(f * full_rank)) for f in fracs})


def _check_rank(rank: int, w_IO) -> None:
    if not 1 <= rank <= min(w_IO.shape):
        raise UserError(f"rank must be in [1, {min(w_IO.shape)}] for a {w_IO.shape[0]}x{w_IO.shape[1]} matrix, "
                        f"got {rank}")


@partial(jax.jit, static_argnames=("rank", "oversample", "power_iters"))
def randomized_svd(m_IO: jax.Array, key: jax.Array, *, rank: int, oversample: int = 10, power_iters: int = 2):
    """Halko–Martinsson–Tropp range finder: top-`rank` (u, s, vt) of m from a (rank+oversample)-wide sketch.

    Power iterations sharpen a slowly decaying spectrum; re-orthonormalising after every product keeps
    the small singular directions from being lost to float32 rounding.
    """
    d_in, d_out = m_IO.shape
    k = min(rank + oversample, d_in, d_out)
    omega_OK = jax.random.normal(key, (d_out, k), m_IO.dtype)
    q_IK, _ = jnp.linalg.qr(jnp.matmul(m_IO, omega_OK, precision=_HI))
    for _ in range(power_iters):
        q_OK, _ = jnp.linalg.qr(jnp.matmul(m_IO.T, q_IK, precision=_HI))
        q_IK, _ = jnp.linalg.qr(jnp.matmul(m_IO, q_OK, precision=_HI))
    u_KK, s_K, vt_KO = jnp.linalg.svd(jnp.matmul(q_IK.T, m_IO, precision=_HI), full_matrices=False)
    return jnp.matmul(q_IK, u_KK, precision=_HI)[:, :rank], s_K[:rank], vt_KO[:rank]


_exact_svd = jax.jit(partial(jnp.linalg.svd, full_matrices=False))


def _svd_triplets(m_IO, rank: int, *, method: str, key, oversample: int, power_iters: int):
    """(u, s, vt) holding AT LEAST the top `rank` triplets: all of them for the exact SVD (one decomposition
    then serves every rank of a sweep), exactly `rank` for the randomized one."""
    _check_rank(rank, m_IO)
    if method == "exact":
        return _exact_svd(m_IO)
    if method == "randomized":
        if key is None:
            raise UserError("randomized SVD needs a PRNG key")
        return randomized_svd(m_IO, key, rank=rank, oversample=oversample, power_iters=power_iters)
    raise UserError(f"unknown SVD method {method!r} (choose exact or randomized)")


def truncated_svd(m_IO, rank: int, *, method: str = "exact", key: jax.Array | None = None,
                  oversample: int = 10, power_iters: int = 2):
    """Top-`rank` (u_IR, s_R, vt_RO). method: "exact" (LAPACK SVD) or "randomized" (Halko, needs `key`)."""
    u, s, vt = _svd_triplets(jnp.asarray(m_IO, jnp.float32), rank, method=method, key=key, oversample=oversample,
                             power_iters=power_iters)
    return u[:, :rank], s[:rank], vt[:rank]


@jax.jit
def _balanced(u_IK, s_K, vt_KO, left_II=None):
    """(left @ u diag(s), vt), rescaled per component k so that ||a[:, k]|| = ||b[k, :]||: the product is
    unchanged, and factors of equal magnitude survive bfloat16 and take sensible Adam steps. Without `left`
    this is the familiar sqrt(s) split; with the whitening's inverse on the left it undoes the imbalance
    that L^{-T} introduces."""
    a_IK = u_IK * s_K
    if left_II is not None:
        a_IK = jnp.matmul(left_II, a_IK, precision=_HI)
    a_norm_K = jnp.linalg.norm(a_IK, axis=0)
    c_K = jnp.where(a_norm_K > 0, jnp.sqrt(1.0 / jnp.where(a_norm_K > 0, a_norm_K, 1.0)), 1.0)
    return a_IK * c_K, vt_KO / c_K[:, None]


def _low_rank_factors(m_IO, ranks, *, left_II=None, method: str = "exact", key: jax.Array | None = None,
                      oversample: int = 10, power_iters: int = 2) -> dict[int, LowRank]:
    """{r: (left @ u√s, √s vt) over the top r triplets of m} for every r in `ranks`. Column i of each factor
    depends on triplet i only, so the exact SVD is computed (and balanced) once and sliced per rank; the
    randomized one sketches each rank at that rank's own cost."""
    if not ranks:
        raise UserError("no ranks given")
    m_IO = jnp.asarray(m_IO, jnp.float32)
    for r in ranks:
        _check_rank(r, m_IO)
    svd = partial(_svd_triplets, m_IO, method=method, key=key, oversample=oversample, power_iters=power_iters)
    if method == "exact":
        a_IK, b_KO = _balanced(*svd(max(ranks)), left_II)
        return {r: LowRank(a_IK[:, :r], b_KO[:r]) for r in ranks}
    return {r: LowRank(*_balanced(*svd(r), left_II)) for r in ranks}


def svd_low_rank_sweep(w_IO, ranks, **svd_kw) -> dict[int, LowRank]:
    """Best rank-r approximation in Frobenius / spectral norm (Eckart–Young) for every r in `ranks`: balanced
    truncated-SVD factors. svd_kw: method ("exact" | "randomized"), key, oversample, power_iters."""
    return _low_rank_factors(w_IO, ranks, **svd_kw)


def svd_low_rank(w_IO, rank: int, **svd_kw) -> LowRank:
    return svd_low_rank_sweep(w_IO, (rank,), **svd_kw)[rank]


# ------------------------------------------------------------------------------------- data-aware


class Whitening(NamedTuple):
    """root_T (Sᵀ) and its inverse, for a factorisation XᵀX (+ damping) = S Sᵀ.

    path: "cholesky" (S = L), "damped" (Cholesky of XᵀX + λ·mean(diag)·I) or "eigh" (float64 eigen
    decomposition with eigenvalues floored, used when even the damped Gram matrix is not PD in float32).
    """

    root_T: jax.Array
    inv_root_T: jax.Array
    path: str


@jax.jit
def gram(x_NI: jax.Array) -> jax.Array:
    x_NI = x_NI.astype(jnp.float32)
    return jnp.matmul(x_NI.T, x_NI, precision=_HI)


@jax.jit
def _cholesky_whitening(g_II: jax.Array):
    """(Lᵀ, L^{-T}, ok); ok is False when Cholesky failed (NaN) or a pivot is at rounding level."""
    l_II = jnp.linalg.cholesky(g_II)
    d = g_II.shape[0]
    pivot_floor = jnp.finfo(jnp.float32).eps * jnp.max(jnp.diag(g_II))
    ok = jnp.all(jnp.isfinite(l_II)) & (jnp.min(jnp.diag(l_II)) ** 2 > pivot_floor)
    inv_lt_II = solve_triangular(l_II.T, jnp.eye(d, dtype=l_II.dtype), lower=False)
    return l_II.T, inv_lt_II, ok


def whitening(x_NI, *, damping: float = 1e-4) -> Whitening:
    """Factor XᵀX = S Sᵀ so that ||X M||_F = ||Sᵀ M||_F for any M; tries Cholesky, damped Cholesky, eigh.

    Damping solves a different problem (it adds λ·mean(diag)·||W - Ŵ||² to the objective). GPTQ's λ = 1e-2
    left the calibration objective 1.4-2.7x above the optimum on activations with cond(XᵀX) ~ 1e8-1e9 (and
    the held-out error worse too), λ = 1e-4 within 1.06x, hence the default; damping=0 goes straight to eigh.
    """
    if damping < 0:
        raise UserError(f"damping must be >= 0, got {damping}")
    g_II = gram(jnp.asarray(x_NI))
    root_T, inv_root_T, ok = _cholesky_whitening(g_II)
    if bool(ok):
        return Whitening(root_T, inv_root_T, "cholesky")
    if damping > 0:
        lam = damping * jnp.mean(jnp.diag(g_II))
        root_T, inv_root_T, ok = _cholesky_whitening(g_II + lam * jnp.eye(g_II.shape[0], dtype=g_II.dtype))
        if bool(ok):
            return Whitening(root_T, inv_root_T, "damped")
    # float64 eigh: S = Q Λ^{1/2}. Eigenvalues are floored (relative to the largest, absolute for an all-zero
    # X) so S is invertible; a floored direction carries (almost) no calibration energy, so the objective moves
    # only by the floor, while Ŵ stays finite there instead of following W's null-space part to infinity.
    evals, q = np.linalg.eigh(np.asarray(g_II, np.float64))
    evals = np.maximum(evals, max(1e-12 * float(evals.max(initial=0.0)), 1e-30))
    root = np.sqrt(evals)
    return Whitening(jnp.asarray((q * root).T, jnp.float32), jnp.asarray(q / root, jnp.float32), "eigh")


def data_aware_low_rank_sweep(w_IO, x_NI, ranks, *, diagonal: bool = False, damping: float = 1e-4,
                              white: Whitening | None = None, **svd_kw) -> tuple[dict[int, LowRank], str]:
    """Rank-r factors minimising ||X (W - Ŵ)||_F over calibration activations X, for every r in `ranks`;
    returns ({r: factors}, whitening path).

    With XᵀX = S Sᵀ, ||X(W - Ŵ)||_F = ||Sᵀ W - Sᵀ Ŵ||_F, so the optimum is Ŵ = S^{-T} [Sᵀ W]_r
    (truncated SVD of the whitened weight). Pass a precomputed `white` to reuse one factorisation of XᵀX.
    diagonal=True adds the optimal diagonal on top (see `with_optimal_diagonal`).
    """
    w_IO = jnp.asarray(w_IO, jnp.float32)
    x_NI = jnp.asarray(x_NI, jnp.float32)
    if x_NI.ndim != 2 or x_NI.shape[1] != w_IO.shape[0]:
        raise UserError(f"calibration activations must be (n, {w_IO.shape[0]}), got {tuple(x_NI.shape)}")
    for r in ranks:
        _check_rank(r, w_IO)
    if white is None:
        white = whitening(x_NI, damping=damping)
    factors = _low_rank_factors(_whiten(white.root_T, w_IO), ranks, left_II=white.inv_root_T, **svd_kw)
    if diagonal:
        g_II = gram(x_NI)
        factors = {r: with_optimal_diagonal(f, w_IO, g_II) for r, f in factors.items()}
    return factors, white.path


def data_aware_low_rank(w_IO, x_NI, rank: int, **kw) -> tuple[LowRank, str]:
    factors, path = data_aware_low_rank_sweep(w_IO, x_NI, (rank,), **kw)
    return factors[rank], path


def with_optimal_diagonal(factors: LowRank, w_IO, g_II) -> LowRank:
    """`factors` plus the diagonal D minimising ||X(W - Ŵ - D)||_F given Ŵ; g_II = XᵀX (see `gram`).

    For output column j the residual X(R_j - d_j e_j) (R = W - Ŵ) is minimised by d_j = (XᵀX R)_jj / (XᵀX)_jj.
    Columns are independent in the Frobenius norm, so this is the exact optimum over D given Ŵ and can never
    increase the objective. For non-square W the "diagonal" is the leading min(d_in, d_out) block: output
    j < m gets d_j · x_j. It costs 2n·min(d_in, d_out) FLOPs on top of the thin matmuls.
    """
    w_IO = jnp.asarray(w_IO, jnp.float32)
    return factors._replace(d_M=_optimal_diagonal(g_II, w_IO - low_rank_weight(factors._replace(d_M=None))))


@jax.jit
def _whiten(root_T_II: jax.Array, w_IO: jax.Array) -> jax.Array:
    return jnp.matmul(root_T_II, w_IO, precision=_HI)


@jax.jit
def _optimal_diagonal(g_II: jax.Array, r_IO: jax.Array) -> jax.Array:
    m = min(r_IO.shape)
    gr_M = jnp.einsum("jk,kj->j", g_II[:m], r_IO[:, :m], precision=_HI)
    g_M = jnp.diag(g_II)[:m]
    return jnp.where(g_M > 0, gr_M / jnp.where(g_M > 0, g_M, 1.0), 0.0)


def low_rank_mlp_sweep(p: MLP, ranks, *, x_ND=None, damping: float = 1e-4,
                       **svd_kw) -> tuple[dict[int, LowRankMLP], str]:
    """Both MLP weights at rank r for every r in `ranks`: plain SVD, or data-aware when calibration inputs x_ND
    are given (W1 fitted to x, W2 to the dense layer's hidden activations relu(x W1)², each layer against its
    own dense input). Returns ({r: factors}, whitening paths "up/down" or "svd")."""
    if x_ND is None:
        up, down = svd_low_rank_sweep(p.w1_DH, ranks, **svd_kw), svd_low_rank_sweep(p.w2_HD, ranks, **svd_kw)
        path = "svd"
    else:
        x_ND = jnp.asarray(x_ND, jnp.float32)
        up, up_path = data_aware_low_rank_sweep(p.w1_DH, x_ND, ranks, damping=damping, **svd_kw)
        down, down_path = data_aware_low_rank_sweep(p.w2_HD, _hidden(p.w1_DH, x_ND), ranks, damping=damping,
                                                    **svd_kw)
        path = f"{up_path}/{down_path}"
    return {r: LowRankMLP(up[r], down[r]) for r in ranks}, path


def low_rank_mlp(p: MLP, rank: int, **kw) -> tuple[LowRankMLP, str]:
    factors, path = low_rank_mlp_sweep(p, (rank,), **kw)
    return factors[rank], path


@jax.jit
def _hidden(w1_DH: jax.Array, x_ND: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(jnp.matmul(x_ND, w1_DH, precision=_HI)))


# ------------------------------------------------------------------------------------ neuron pruning


IMPORTANCE = ("weight", "activation")


def neuron_importance(p: MLP, *, method: str = "weight", x_ND=None) -> jax.Array:
    """Per-hidden-neuron score (h,). "weight": ||W1[:,i]||·||W2[i,:]||; "activation": E|act_i|·||W2[i,:]||
    over calibration inputs x_ND (what the neuron actually contributes on realistic data)."""
    if method == "weight":
        return _weight_importance(p)
    if method == "activation":
        if x_ND is None:
            raise UserError("activation importance needs calibration inputs")
        return _activation_importance(p, jnp.asarray(x_ND, jnp.float32))
    raise UserError(f"unknown importance {method!r} (choose one of {', '.join(IMPORTANCE)})")


@jax.jit
def _weight_importance(p: MLP) -> jax.Array:
    return jnp.linalg.norm(p.w1_DH, axis=0) * jnp.linalg.norm(p.w2_HD, axis=1)


@jax.jit
def _activation_importance(p: MLP, x_ND: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(_hidden(p.w1_DH, x_ND)), axis=0) * jnp.linalg.norm(p.w2_HD, axis=1)


def kept_count(keep_frac: float, hidden: int) -> int:
    if not 0 < keep_frac <= 1:
        raise UserError(f"keep fraction must be in (0, 1], got {keep_frac}")
    return max(1, round(keep_frac * hidden))


def prune_mlp(p: MLP, keep_frac: float, *, importance: str = "weight", x_ND=None) -> tuple[MLP, np.ndarray]:
    """Keep the top keep_frac·h neurons and gather them into a SMALLER dense MLP (done once, here, outside
    any timed function) so the executed matmuls really shrink. Returns (small MLP, sorted kept indices)."""
    h = p.w1_DH.shape[1]
    scores_H = np.asarray(neuron_importance(p, method=importance, x_ND=x_ND))
    kept = np.sort(np.argsort(-scores_H, kind="stable")[: kept_count(keep_frac, h)])
    return MLP(jnp.asarray(p.w1_DH)[:, kept], jnp.asarray(p.w2_HD)[kept]), kept


# ----------------------------------------------------------------------------------------------- 2:4


@jax.jit
def mask_2_4(w_IO: jax.Array) -> jax.Array:
    """Boolean mask keeping the 2 largest |w| in each group of 4 consecutive INPUT rows (per output column),
    the layout sparse tensor cores use. Ties go to the lower index, so every group has exactly 2."""
    d_in, d_out = w_IO.shape
    if d_in % 4:
        raise UserError(f"2:4 sparsity needs the input dimension divisible by 4, got {d_in}")
    mag_G4O = jnp.abs(w_IO).reshape(d_in // 4, 4, d_out)
    order = jnp.argsort(-mag_G4O, axis=1, stable=True)
    rank_G4O = jnp.argsort(order, axis=1, stable=True)
    return (rank_G4O < 2).reshape(d_in, d_out)


@jax.jit
def sparsify_2_4(p: MLP) -> MLP:
    """2:4-masked copy of both MLP weights. It still executes DENSE (JAX has no 2:4 kernel); see nominal_2_4_flops."""
    return MLP(jnp.where(mask_2_4(p.w1_DH), p.w1_DH, 0), jnp.where(mask_2_4(p.w2_HD), p.w2_HD, 0))


def nominal_2_4_flops(record) -> float:
    """FLOPs a 2:4 sparse kernel would execute: half the matmul FLOPs plus everything else unchanged.
    `record` is the mgr.flops.FlopsRecord of the dense-executed masked function."""
    return record.flops - record.matmul_flops / 2
