"""Partial updates: train only a top suffix of a block stack, keeping the optimizer state of frozen blocks.

Freezing has two halves, and only the model's half saves compute:

* **Model (saves FLOPs).** The model must cut the graph below the first active block with
  ``jax.lax.stop_gradient`` -- on the activation entering it and on the frozen blocks' parameters -- so autodiff
  never builds the backward of the frozen prefix. Masking the optimizer alone saves nothing: the full backward
  is still computed and then thrown away. ``suffix_scan`` does this for scan-over-layers models and also peels
  the first active block out of the loop, because a scan transposes every trip alike and would otherwise compute
  the activation-gradient of the first active block, whose input needs none. For models with per-block
  subtrees, apply ``stop_gradient`` to the hidden state before block ``n_blocks - n_active``.
* **Optimizer (keeps frozen weights and their state bitwise).** ``freeze_prefix_rows(inner, labels)`` runs any
  optax transformation on the trainable rows only and returns an exact no-op update for the frozen ones.

Labels are a pytree shaped like the params whose leaves count the frozen leading rows of each leaf along axis 0:
0 = trainable, the leaf's row count = frozen, anything between = the frozen prefix of a leaf that stacks all
blocks along axis 0 (scan-over-layers). ``suffix_labels`` builds them for a top-``n_active`` suffix and
``predicate_labels`` from any predicate on the leaf path.

Why not ``optax.multi_transform`` with ``optax.set_to_zero()`` for frozen leaves: it keeps one inner state per
label holding only that label's leaves, so the state's structure changes with the active depth and the moments of
a block that is frozen and later unfrozen would be dropped and restarted. It cannot freeze part of a stacked leaf
either. And ``optax.masked`` is wrong outright: masked-out leaves receive the raw gradient as their update.

``freeze_prefix_rows`` builds the inner state for ALL params, and ``init`` does not depend on the labels, so one
state serves every active depth: rebuild the transformation per depth (one compiled step per depth) and hand it
the same state. Frozen rows' moments stay bitwise unchanged and resume from where they were once unfrozen. Scalar
state such as Adam's step count is shared and keeps counting while rows are frozen, so the bias correction of a
row that was frozen for a while is slightly weaker than for a never-frozen row (the correction is ~1 after a few
hundred steps). Weight decay inside ``inner`` sees only trainable rows, so it never touches frozen ones.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgr.errors import UserError
from mgr.methods.schedule import RELEVANCE_KINDS

Path = tuple[str, ...]
Labels = Any  # a pytree shaped like the params with int leaves: frozen leading rows along axis 0


def leaf_path(keypath: tuple) -> Path:
    """A jax key path as plain strings, e.g. ('blocks', '3', 'attn', 'kernel', 'value')."""
    parts = []
    for key in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return tuple(parts)


def _n_rows(leaf) -> int:
    # A scalar is one row: frozen or not as a whole.
    return leaf.shape[0] if leaf.ndim else 1


def _as_rows(x: jax.Array) -> jax.Array:
    return x[None] if x.ndim == 0 else x


def _block_slot(path: Path, leaf, n_blocks: int, block_axis_path: Path) -> int | Literal["stacked"] | None:
    """Where a leaf sits in the block stack: None (outside), 'stacked' (axis 0 indexes blocks) or a block index."""
    prefix = tuple(str(p) for p in block_axis_path)
    if path[: len(prefix)] != prefix:
        return None
    rest = path[len(prefix):]
    if rest and rest[0].isdigit():
        index = int(rest[0])
        if index >= n_blocks:
            raise UserError(f"block index {index} at {'/'.join(path)} is outside n_blocks={n_blocks}")
        return index
    if leaf.ndim == 0 or leaf.shape[0] != n_blocks:
        raise UserError(f"leaf {'/'.join(path)} of shape {tuple(leaf.shape)} is not stacked along axis 0 "
                        f"over n_blocks={n_blocks}")
    return "stacked"


def predicate_labels(params, trainable: Callable[[Path], bool]) -> Labels:
    """Labels freezing every leaf whose path fails ``trainable`` (whole leaves only)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: 0 if trainable(leaf_path(kp)) else _n_rows(leaf), params)


def suffix_labels(params, n_blocks: int, n_active: int, *, block_axis_path: Path = ("blocks",),
                  below_blocks: tuple[Path, ...] = ()) -> Labels:
    """Labels training only the top ``n_active`` of ``n_blocks`` blocks.

    Leaves under ``block_axis_path`` are either stacked along axis 0 over the blocks (scan-over-layers) or live in
    per-block subtrees whose next path element is the block index (``blocks/3/...``). Leaves whose path starts
    with one of ``below_blocks`` (embeddings: everything feeding block 0) are frozen whenever any block is, since
    no gradient reaches them through the stop_gradient; all other leaves (final norm, head) stay trainable.
    """
    if not 1 <= n_active <= n_blocks:
        raise UserError(f"n_active must be in [1, {n_blocks}], got {n_active}")
    n_frozen = n_blocks - n_active
    below = [tuple(str(p) for p in prefix) for prefix in below_blocks]

    def label(keypath, leaf) -> int:
        path = leaf_path(keypath)
        slot = _block_slot(path, leaf, n_blocks, block_axis_path)
        if slot is None:
            is_below = any(path[: len(prefix)] == prefix for prefix in below)
            return _n_rows(leaf) if is_below and n_frozen else 0
        if slot == "stacked":
            return n_frozen
        return _n_rows(leaf) if slot < n_frozen else 0

    return jax.tree_util.tree_map_with_path(label, params)


class FreezePrefixRowsState(NamedTuple):
    inner: optax.OptState


_NOT_A_PARAM = -1


def freeze_prefix_rows(inner: optax.GradientTransformation, labels: Labels) -> optax.GradientTransformation:
    """Apply ``inner`` to the trainable rows only; frozen rows get an exact no-op update and keep their state.

    ``inner`` must keep per-parameter state as trees shaped like the params (true of optax's optimizers), which
    ``optax.tree_map_params`` uses to slice that state alongside the params. The frozen row counts are static,
    so the inner update runs on genuinely smaller arrays.
    """

    def init_fn(params):
        return FreezePrefixRowsState(inner.init(params))

    def update_fn(updates, state, params=None):
        def trainable(x, n_frozen):
            return _as_rows(x)[n_frozen:]

        inner_state = state.inner
        sliced_state = optax.tree_map_params(inner, trainable, inner_state, labels)
        sliced_params = None if params is None else jax.tree.map(trainable, params, labels)
        sliced_updates, new_sliced_state = inner.update(
            jax.tree.map(trainable, updates, labels), sliced_state, sliced_params)

        # Per state leaf: its param's frozen row count, or _NOT_A_PARAM for scalars such as the step count.
        state_labels = optax.tree_map_params(inner, lambda _, n: n, inner_state, labels,
                                             transform_non_params=lambda _: _NOT_A_PARAM)

        def merge_state(n_frozen, full, new):
            if n_frozen == _NOT_A_PARAM:
                return new
            if n_frozen == _n_rows(full):
                return full
            return _as_rows(full).at[n_frozen:].set(new).reshape(full.shape)

        def merge_update(grad, new, n_frozen):
            # -0.0 is the exact additive identity (p + -0.0 == p bitwise, -0.0 included), unlike +0.0.
            frozen = jnp.full((n_frozen, *_as_rows(grad).shape[1:]), -0.0, new.dtype)
            return jnp.concatenate([frozen, new]).reshape(grad.shape)

        new_inner = jax.tree.map(merge_state, state_labels, inner_state, new_sliced_state)
        return jax.tree.map(merge_update, updates, sliced_updates, labels), FreezePrefixRowsState(new_inner)

    return optax.GradientTransformation(init_fn, update_fn)


def suffix_scan(block_fn: Callable[[Any, Any], Any], carry, xs, n_active: int):
    """``carry = block_fn(carry, xs[l])`` for every block l, training only the top ``n_active`` blocks.

    ``xs`` is a pytree whose leaves stack the blocks along axis 0 (block params plus any per-layer inputs).
    The frozen prefix runs as one ``lax.scan`` on stop_gradient'ed inputs, so autodiff builds no backward for it;
    the first active block runs outside the loop so its (unneeded) activation-gradient is never computed; the rest
    of the suffix is a second scan. With nothing frozen it is a single scan.
    """
    lengths = {leaf.shape[0] for leaf in jax.tree.leaves(xs)}
    if len(lengths) != 1:
        raise UserError(f"suffix_scan needs every xs leaf stacked over the same block count, got {sorted(lengths)}")
    (n_blocks,) = lengths
    if not 1 <= n_active <= n_blocks:
        raise UserError(f"n_active must be in [1, {n_blocks}], got {n_active}")
    n_frozen = n_blocks - n_active

    def body(c, x):
        return block_fn(c, x), None

    def rows(lo, hi):
        return jax.tree.map(lambda leaf: leaf[lo:hi], xs)

    if n_frozen == 0:
        return jax.lax.scan(body, carry, xs)[0]
    carry = jax.lax.scan(body, jax.lax.stop_gradient(carry), jax.lax.stop_gradient(rows(0, n_frozen)))[0]
    carry = block_fn(carry, jax.tree.map(lambda leaf: leaf[n_frozen], xs))
    if n_active > 1:
        carry = jax.lax.scan(body, carry, rows(n_frozen + 1, n_blocks))[0]
    return carry


def value_and_half_grads(grad_fn: Callable, params, *batch):
    """``grad_fn(params, *batch)`` (a ``jax.value_and_grad``) on the two halves of the batch (axis 0), as one
    vmapped call: (mean loss, mean gradient, (g_a, g_b)). For mean losses the mean of the halves is the full
    batch's loss and gradient, at the same FLOPs; the halves are what the ``snr`` relevance compares."""
    rows = {x.shape[0] for x in batch}
    if len(rows) != 1 or next(iter(rows)) % 2:
        raise UserError(f"the snr relevance splits the batch in halves: need one even batch size, got {rows}")
    halves = [x.reshape(2, x.shape[0] // 2, *x.shape[1:]) for x in batch]
    loss_2, grads_2 = jax.vmap(grad_fn, in_axes=(None, *[0] * len(batch)))(params, *halves)
    mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), (loss_2, grads_2))
    return mean[0], mean[1], (jax.tree.map(lambda g: g[0], grads_2), jax.tree.map(lambda g: g[1], grads_2))


def block_relevance(grads, params, n_blocks: int, *, kind: str = "grad_ratio", updates=None, half_grads=None,
                    block_axis_path: Path = ("blocks",), eps: float = 1e-12) -> jax.Array:
    """Per-block relevance [n_blocks] from a full gradient (pure jnp, for use inside a jitted probe step).

    ``grad_ratio``: ||g_l|| / (||W_l|| + eps), norms over all of block l's leaves together.
    ``saliency``: sum over block l of |g * W| (first-order estimate of the loss change from zeroing the block).
    ``update``: max(0, -g_l . dW_l) with ``updates`` the step's applied update dW: the first-order loss decrease
    this step's update of block l bought (how much the loss moves with that block's update).
    ``snr``: max(0, cos(g_a, g_b)) per block, with ``half_grads`` = (g_a, g_b) the gradients of the two halves of
    the batch. E[g_a . g_b] = |G|^2 while E[|g|^2] = |G|^2 + noise, so the cosine estimates the gradient's signal
    share: near 1 while the block still descends, near 0 once its gradient is mostly minibatch noise.
    """
    if kind not in RELEVANCE_KINDS:
        raise UserError(f"relevance kind must be one of {', '.join(RELEVANCE_KINDS)}, got {kind!r}")
    if kind == "update" and updates is None:
        raise UserError("relevance 'update' needs the step's updates")
    if kind == "snr" and half_grads is None:
        raise UserError("relevance 'snr' needs the gradients of the two batch halves")

    def per_block(fn, *trees) -> jax.Array:
        """sum over each block's leaves of fn(leaves...), as an [n_blocks] fp32 vector."""
        total_L = jnp.zeros((n_blocks,), jnp.float32)
        found = False
        leaves = [jax.tree.leaves(t) for t in trees[1:]]
        for i, (keypath, first) in enumerate(jax.tree_util.tree_leaves_with_path(trees[0])):
            slot = _block_slot(leaf_path(keypath), first, n_blocks, block_axis_path)
            if slot is None:
                continue
            found = True
            value = fn(first.astype(jnp.float32), *(t[i].astype(jnp.float32) for t in leaves))
            if slot == "stacked":
                total_L += jnp.sum(value, axis=tuple(range(1, value.ndim)))
            else:
                total_L = total_L.at[slot].add(jnp.sum(value))
        if not found:
            raise UserError(f"no parameter under block path {'/'.join(map(str, block_axis_path))}")
        return total_L

    if kind == "saliency":
        return per_block(lambda g, p: jnp.abs(g * p), grads, params)
    if kind == "update":
        return jnp.maximum(-per_block(jnp.multiply, grads, updates), 0.0)
    if kind == "snr":
        g_a, g_b = half_grads
        dot_L = per_block(jnp.multiply, g_a, g_b)
        norms_L = jnp.sqrt(per_block(jnp.square, g_a) * per_block(jnp.square, g_b))
        return jnp.maximum(dot_L / (norms_L + eps), 0.0)
    return jnp.sqrt(per_block(jnp.square, grads)) / (jnp.sqrt(per_block(jnp.square, params)) + eps)
