"""The GPT's MLP as a replaceable part, and the nanochat linear-layer initialisation it shares with the model.

An MLP factory is anything callable as `factory(cfg, rngs=rngs) -> nnx.Module` (an nnx.Module class with
`__init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs)` is one) whose module maps `x_BTD -> y_BTD`. `GPT(cfg,
mlp=factory)` builds one per layer and stacks them, so a banded / low-rank / sparse MLP plugs in without touching
model.py. The model casts every floating-point variable to the compute dtype before calling the module, so the
module computes in whatever dtype its inputs and variables arrive in. Non-float variables (e.g. sparse index
tables as `nnx.Variable`) are passed through untouched; only `nnx.Param` leaves are trained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

if TYPE_CHECKING:
    from nanochat.model import GPTConfig


def kernel_init(fan_in: int, fan_out: int, *, zero: bool = False, std: float | None = None,
                uniform: bool = False):
    """nanochat's initialiser of a [fan_in, fan_out] kernel (see `linear`); structured layers (banded,
    low-rank) draw their dense counterpart with it so they start from the same weights."""
    if std is None:
        std = fan_in ** -0.5 * min(1.0, (fan_out / fan_in) ** 0.5)
    if zero:
        return nnx.initializers.zeros_init()
    return uniform_init(-3 ** 0.5 * std, 3 ** 0.5 * std) if uniform else nnx.initializers.normal(std)


def uniform_init(low: float, high: float):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, low, high)


def linear(fan_in: int, fan_out: int, *, rngs: nnx.Rngs, zero: bool = False, std: float | None = None,
           uniform: bool = False) -> nnx.Linear:
    """Bias-free linear layer, kernel [fan_in, fan_out], initialised as nanochat does.

    Default std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)) (arXiv:2310.17813) from a normal; `uniform=True`
    draws from U(-sqrt(3) std, sqrt(3) std) instead (the current recipe's init: same std, no outliers). `zero=True`
    for output projections, so every residual block starts as the identity.
    """
    return nnx.Linear(fan_in, fan_out, use_bias=False,
                      kernel_init=kernel_init(fan_in, fan_out, zero=zero, std=std, uniform=uniform), rngs=rngs)


class ReluSquaredMLP(nnx.Module):
    """nanochat's MLP: D -> 4D -> D with relu(x)^2 in between. Under cfg.init == "current", c_fc is uniform with
    std 0.4/sqrt(D) (the reference's scaled fc init)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        if cfg.init == "current":
            self.c_fc = linear(cfg.n_embd, 4 * cfg.n_embd, rngs=rngs, std=0.4 * cfg.n_embd ** -0.5, uniform=True)
        else:
            self.c_fc = linear(cfg.n_embd, 4 * cfg.n_embd, rngs=rngs)
        self.c_proj = linear(4 * cfg.n_embd, cfg.n_embd, rngs=rngs, zero=True)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        h_BTF = jnp.square(jax.nn.relu(self.c_fc(x_BTD)))
        return self.c_proj(h_BTF)
