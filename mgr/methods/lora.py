"""LoRA: low-rank adapters on a frozen model's linear layers, for any Flax NNX model built from ``nnx.Linear``.

``add_adapters(model, paths, rank=r, alpha=a)`` replaces each bias-free ``nnx.Linear`` found at one of the
attribute ``paths`` (e.g. ``("attn", "c_q")``) by a ``LoRALinear`` computing ``x W + (alpha / r) · (x A) B`` with the
base kernel W untouched, A [d_in, r] random and B [r, d_out] zero (so the adapted model starts as the base). Stacked
kernels (``nnx.vmap``-built layers, [L, d_in, d_out]) get stacked adapters [L, d_in, r] / [L, r, d_out].

Freezing is by differentiation, not by masking the optimizer: adapters are ``Adapter`` variables (a subclass of
``nnx.Param``), a step splits ``nnx.split(model, Adapter, ...)`` and takes the gradient of the adapters only, and the
optimizer's state holds adapters only. The base kernels are then constants of the step: autodiff builds the input
gradients of the base matmuls (needed to reach earlier adapters) but never their weight gradients, which is why a
LoRA step costs about 4N FLOPs per token instead of 6N (``lora_step_matmul_flops`` has the exact count). No
``optax.set_to_zero``/``freeze`` partition is needed: the frozen weights are not in the optimizer's tree at all.

``merge_adapters(model)`` folds every adapter into its base kernel (W + (alpha / r) A B) for inference.

Dropout on the adapter input is not implemented: it would need a per-step key inside every adapted layer; the
demos fine-tune on fresh batches, where LoRA dropout matters little.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from mgr.errors import UserError


class Adapter(nnx.Param):
    """A LoRA factor: the only variables a LoRA step differentiates and optimises."""


class LoRALinear(nnx.Module):
    """``x W + scale · (x A) B`` over a frozen bias-free ``nnx.Linear`` (kept as ``.base``)."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        if base.use_bias:
            raise UserError("LoRA adapters support bias-free linear layers only")
        w = base.kernel[...]
        *lead, d_in, d_out = w.shape
        if not 1 <= rank <= min(d_in, d_out):
            raise UserError(f"LoRA rank must be in [1, {min(d_in, d_out)}] for a {d_in}x{d_out} layer, got {rank}")
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        # Kaiming-style A and zero B, as in the LoRA paper: the adapted model starts exactly as the base.
        self.lora_a = Adapter(jax.random.normal(rngs.params(), (*lead, d_in, rank), w.dtype) * d_in ** -0.5)
        self.lora_b = Adapter(jnp.zeros((*lead, rank, d_out), w.dtype))

    def __call__(self, x: jax.Array, *, out_idx: jax.Array | None = None, in_idx: jax.Array | None = None):
        """``out_idx`` keeps only those output channels, ``in_idx`` reads only those input channels (x then holds
        just them): the base kernel and the adapter factor on that side are gathered, so the matmuls are smaller
        and dense; the rank-r product x·A stays whole."""
        w = restrict(self.base.kernel[...], out_idx, in_idx)
        a, b = restrict(self.lora_a[...], None, in_idx), restrict(self.lora_b[...], out_idx, None)
        return x @ w + self.scale * ((x @ a) @ b)


def restrict(w: jax.Array, out_idx: jax.Array | None, in_idx: jax.Array | None) -> jax.Array:
    """The columns ``out_idx`` and rows ``in_idx`` of a kernel [.., d_in, d_out] (None: all of them)."""
    if out_idx is not None:
        w = jnp.take(w, out_idx, axis=-1)
    if in_idx is not None:
        w = jnp.take(w, in_idx, axis=-2)
    return w


def restricted_linear(layer: nnx.Module, x: jax.Array, *, out_idx: jax.Array | None = None,
                      in_idx: jax.Array | None = None) -> jax.Array:
    """A LoRALinear or bias-free nnx.Linear applied to the channels ``out_idx`` / ``in_idx`` only."""
    if isinstance(layer, LoRALinear):
        return layer(x, out_idx=out_idx, in_idx=in_idx)
    return x @ restrict(layer.kernel[...], out_idx, in_idx)


def _find(module: nnx.Module, path: tuple[str, ...]):
    parent = module
    for name in path[:-1]:
        parent = getattr(parent, name, None)
        if parent is None:
            raise UserError(f"no module at {'.'.join(path)}")
    layer = getattr(parent, path[-1], None)
    if not isinstance(layer, nnx.Linear):
        raise UserError(f"{'.'.join(path)} is not an nnx.Linear (got {type(layer).__name__})")
    return parent, layer


def add_adapters(module: nnx.Module, paths: Iterable[tuple[str, ...]], *, rank: int, alpha: float,
                 rngs: nnx.Rngs) -> nnx.Module:
    """Replace the linear layer at every attribute path under ``module`` by a LoRALinear (in place; returned)."""
    for path in paths:
        parent, layer = _find(module, tuple(path))
        setattr(parent, path[-1], LoRALinear(layer, rank, alpha, rngs=rngs))
    return module


def merge_adapters(module: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel: the LoRALinear layers become plain nnx.Linear (in place)."""
    for path, sub in list(nnx.iter_modules(module)):
        if isinstance(sub, LoRALinear):
            delta = sub.scale * (sub.lora_a[...] @ sub.lora_b[...])
            sub.base.kernel[...] = sub.base.kernel[...] + delta.astype(sub.base.kernel.dtype)
            parent = module
            for name in path[:-1]:
                parent = getattr(parent, name)
            setattr(parent, path[-1], sub.base)
    return module


# --- the exact matmul FLOPs of a step ----------------------------------------------------------------------------

def linear_step_flops(d_in: int, d_out: int, *, input_grad: bool, weight_grad: bool, rank: int = 0) -> float:
    """Matmul FLOPs per token of one linear layer in a training step (forward + backward), optionally adapted.

    Base: forward 2·d_in·d_out, input gradient 2·d_in·d_out when the input carries a gradient, weight gradient
    2·d_in·d_out when W is trained. Adapter of rank r: forward 2r(d_in + d_out); backward dB = (xA)^T dy
    (2r·d_out), d(xA) = dy B^T (2r·d_out), dA = x^T d(xA) (2r·d_in), and dx through A (2r·d_in) only when the
    input carries a gradient. So a frozen base with an adapter costs 4·d_in·d_out + 6r(d_in + d_out) per token,
    a fully trained layer 6·d_in·d_out.
    """
    flops = 2.0 * d_in * d_out * (1 + input_grad + weight_grad)
    if rank:
        flops += 2.0 * rank * (d_in + d_out) + 4.0 * rank * d_out + 2.0 * rank * d_in * (1 + input_grad)
    return flops
