"""Contextual FFN sparsity chosen by a training-free SVD estimator (SparseLoRA, ICML 2025), executed for real.

Per MLP layer, once: a rank-``r`` truncated SVD of the frozen up-projection, W_fc [D, F] ≈ U_r (S_r V_rᵀ)
(``svd_factors``). Per batch: the estimator predicts the hidden activations act(x U_r (S_r V_rᵀ)) at 2r(D + F)
FLOPs per token instead of 2DF, scores every hidden channel by the L2 norm of its predicted activation over all the
batch's tokens (every token of a language-model batch is a context token: there is no separate output span to keep
dense), and keeps the ``keep`` best (``top_channels``); one set per layer per batch, so the kept work is one smaller
dense matmul for the whole batch. The estimator runs under stop_gradient: it is not trained and has no backward.

The FFN then runs only the kept channels (``sparse_mlp``): the kept columns of the up-projection and rows of the
down-projection are gathered (with the LoRA factors on the hidden side) and multiplied densely, so the FFN's matmul
FLOPs fall linearly with ``keep``. ``keep`` is a Python int: each layer's shapes are static under jit. Nothing is
ever multiplied by a mask.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mgr.errors import UserError
from mgr.methods.lora import restricted_linear


def relu_squared(h: jax.Array) -> jax.Array:
    """nanochat's MLP activation."""
    return jnp.square(jax.nn.relu(h))


def check_sparsity(sparsity: float, where: str) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"{where} must lie in [0, 1), got {sparsity!r}")


def kept_count(sparsity: float, hidden: int) -> int:
    """Channels kept at ``sparsity``: round((1 - sparsity) * hidden), at least one."""
    return max(1, round((1.0 - sparsity) * hidden))


def check_rank(rank: int, d_in: int, d_hidden: int) -> None:
    if not 1 <= rank <= min(d_in, d_hidden):
        raise UserError(f"svd_rank must be in [1, {min(d_in, d_hidden)}] (the rank of a {d_in}x{d_hidden} "
                        f"up-projection), got {rank}")


def svd_factors(w_DF: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """(U_r [.., D, r], S_r V_rᵀ [.., r, F]) of the rank-r truncated SVD, batched over leading axes, in float32."""
    check_rank(rank, w_DF.shape[-2], w_DF.shape[-1])
    u, s, vt = jnp.linalg.svd(w_DF.astype(jnp.float32), full_matrices=False)
    return u[..., :rank], s[..., :rank, None] * vt[..., :rank, :]


def channel_scores(h_NF: jax.Array) -> jax.Array:
    """L2 norm of each hidden channel over all tokens (every leading axis), in float32."""
    h = h_NF.reshape(-1, h_NF.shape[-1]).astype(jnp.float32)
    return jnp.sqrt(jnp.sum(h * h, axis=0))


def predicted_scores(x_ND: jax.Array, u_DR: jax.Array, sv_RF: jax.Array,
                     activation: Callable[[jax.Array], jax.Array] = relu_squared) -> jax.Array:
    """The estimator: channel scores of act(x U_r (S_r V_rᵀ)), computed in x's dtype, no gradient."""
    x_ND = jax.lax.stop_gradient(x_ND)
    return channel_scores(activation((x_ND @ u_DR.astype(x_ND.dtype)) @ sv_RF.astype(x_ND.dtype)))


def top_channels(score_F: jax.Array, keep: int) -> jax.Array:
    """Indices of the ``keep`` highest scores, ascending (contiguous-ish gathers)."""
    return jnp.sort(jax.lax.top_k(score_F, keep)[1])


def random_channels(key: jax.Array, hidden: int, keep: int) -> jax.Array:
    """A uniformly random set of ``keep`` channels, ascending: the control the estimator must beat."""
    return jnp.sort(jax.random.permutation(key, hidden)[:keep])


def sparse_mlp(x_ND: jax.Array, fc, proj, idx_K: jax.Array,
               activation: Callable[[jax.Array], jax.Array] = relu_squared) -> jax.Array:
    """proj(act(fc(x))) over the hidden channels ``idx_K`` only: two smaller dense matmuls (plus the adapters').
    ``fc``/``proj``: LoRALinear or bias-free nnx.Linear."""
    h = activation(restricted_linear(fc, x_ND, out_idx=idx_K))
    return restricted_linear(proj, h, in_idx=idx_K)


def recall(selected_K: jax.Array, score_F: jax.Array) -> jax.Array:
    """Fraction of the true top-|selected| channels (by ``score_F``) that ``selected_K`` contains."""
    true_F = jnp.zeros(score_F.shape, bool).at[top_channels(score_F, selected_K.shape[0])].set(True)
    return jnp.mean(true_F[selected_K])


def estimator_flops(d_in: int, d_hidden: int, rank: int) -> float:
    """Matmul FLOPs per token of the estimator (forward only): 2r(D + F)."""
    return 2.0 * rank * (d_in + d_hidden)
