"""Block-banded FC1/FC2: a relu² MLP whose up- and down-projection keep only a band around the stretched diagonal,
stored and executed as dense blocks, so the FLOPs and the parameters really fall with the density.

Definition. Let the narrow axis have C entries and the wide one F = 4C. A layer of bandwidth b (0 = dense) is
tiled along the wide axis into K = F / W blocks of W = b·C/F (= b/4) consecutive units; wide block k is connected to
the W consecutive narrow units centred on the stretched diagonal, start_k = clip(⌊(k + ½)·W·C/F - W/2 + ½⌋, 0,
C - W). FC1 (C → 4C, kernel [C, F]) reads those windows of its input; FC2 (4C → C, kernel [F, C]) is the same
pattern transposed and writes (adds) into those windows of its output. Every wide unit has exactly W narrow
neighbours, and each interior narrow unit is connected to 4 blocks = b wide units, so the band is b entries wide
measured along the 4C axis and the density is exactly W/C = b/(4C) (C = 768: 1024 → 1/3, 512 → 1/6, 256 → 1/12).

The earlier llm.c experiment masked a dense weight with |j - 4i| <= b/2 (element-wise band, truncated at the
corners, executed dense). Here the band is a staircase of W×W blocks (each block's window is the element band's
window at the block centre, off by at most W/8 at the block edges) and clipped instead of truncated at the
corners, which is what lets it execute as one batched matmul with no dead weight: the element band's own density
is slightly below b/4C (``element_band_density``); ours is exactly b/4C.

Execution: FC1 gathers the K input windows (x_BTD → x_BTKW, static indices) and runs one batched matmul against
the [K, W, W] blocks; FC2 runs the batched matmul and scatter-adds the K output windows. Matmul FLOPs are
2·tokens·F·W = density × dense, priced by mgr.flops on the real step (the gather/scatter are memory traffic, not
matmul FLOPs). Only the blocks are parameters: nothing outside the band exists in the optimizer state or the
checkpoint. The blocks are initialised as the band of the dense layer nanochat would draw from the same key, so a
banded model and the dense model built with the same seed agree on every weight inside the band.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgr.errors import UserError
from nanochat.mlp import ReluSquaredMLP, kernel_init, linear


@dataclasses.dataclass(frozen=True)
class Band:
    """The block band of a narrow×wide matrix (see the module docstring); bandwidth > 0."""

    narrow: int
    wide: int
    bandwidth: int

    @property
    def window(self) -> int:
        return self.bandwidth * self.narrow // self.wide

    @property
    def blocks(self) -> int:
        return self.wide // self.window

    @property
    def density(self) -> float:
        return self.window / self.narrow

    @property
    def params(self) -> int:
        return self.blocks * self.window * self.window

    @functools.cached_property
    def indices(self) -> np.ndarray:
        """[K, W] narrow indices of each wide block's window."""
        W, K = self.window, self.blocks
        centre = (np.arange(K) + 0.5) * W * self.narrow / self.wide
        start = np.clip(np.floor(centre - W / 2 + 0.5).astype(np.int64), 0, self.narrow - W)
        return start[:, None] + np.arange(W)[None, :]

    def mask(self) -> np.ndarray:
        """[narrow, wide] bool: True inside the band."""
        m = np.zeros((self.narrow, self.wide), bool)
        for k, rows in enumerate(self.indices):
            m[rows, k * self.window:(k + 1) * self.window] = True
        return m

    def from_dense(self, kernel: jax.Array, *, transposed: bool) -> jax.Array:
        """The band of a dense kernel [..., narrow, wide] (FC1) or [..., wide, narrow] (FC2, ``transposed``) as
        blocks [..., K, W(narrow), W(wide)] resp. [..., K, W(wide), W(narrow)]."""
        K, W, idx = self.blocks, self.window, self.indices
        if transposed:
            kernel = jnp.swapaxes(kernel, -1, -2)
        lead = kernel.shape[:-2]
        by_block = kernel.reshape(*lead, self.narrow, K, W)                   # [..., C, K, Wwide]
        take = jnp.asarray(idx.T).reshape((1,) * len(lead) + (W, K, 1))
        rows = jnp.take_along_axis(by_block, take, axis=-3)                  # [..., Wn, K, Wwide]
        blocks = jnp.moveaxis(rows, -2, -3)                                   # [..., K, Wn, Wwide]
        return jnp.swapaxes(blocks, -1, -2) if transposed else blocks

    def to_dense(self, blocks: jax.Array, *, transposed: bool) -> jax.Array:
        """Inverse of from_dense: the dense kernel with zeros outside the band."""
        if transposed:
            blocks = jnp.swapaxes(blocks, -1, -2)
        lead = blocks.shape[:-3]
        K, W = self.blocks, self.window
        dense = jnp.zeros((*lead, self.narrow, K, W), blocks.dtype)
        dense = dense.at[..., self.indices, jnp.arange(K)[:, None], :].set(blocks)
        dense = dense.reshape(*lead, self.narrow, self.wide)
        return jnp.swapaxes(dense, -1, -2) if transposed else dense


def valid_bandwidths(narrow: int, wide: int) -> list[int]:
    """Every bandwidth that tiles a narrow×wide matrix, widest first."""
    return [b for b in range(wide, 0, -1) if (b * narrow) % wide == 0 and wide % (b * narrow // wide) == 0]


def check_band(bandwidth, narrow: int, wide: int, flag: str) -> Band | None:
    """The Band of ``bandwidth`` (None for 0 = dense); a UserError naming ``flag`` if it does not fit."""
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, np.integer)):
        raise UserError(f"{flag} must be a whole number, got {bandwidth!r}")
    if bandwidth < 0:
        raise UserError(f"{flag} must be >= 0 (0 = dense), got {bandwidth}")
    if bandwidth == 0:
        return None
    if bandwidth not in valid_bandwidths(narrow, wide):
        ok = ", ".join(map(str, valid_bandwidths(narrow, wide)[:8]))
        raise UserError(f"{flag} {bandwidth} does not tile the {narrow}x{wide} MLP matrix: it must be at most "
                        f"{wide} with bandwidth·{narrow}/{wide} dividing {wide} (valid: {ok}, ...)")
    return Band(narrow, wide, int(bandwidth))


def density(bandwidth: int, narrow: int, wide: int) -> float:
    """Exact density of a layer of this bandwidth (1.0 for 0 = dense)."""
    band = check_band(bandwidth, narrow, wide, "bandwidth")
    return 1.0 if band is None else band.density


def element_band_density(bandwidth: int, narrow: int, wide: int) -> float:
    """Density of the earlier llm.c experiment's element-wise mask |j - i·wide/narrow| <= b/2 (0 = dense)."""
    if bandwidth == 0:
        return 1.0
    i = np.arange(narrow)[:, None] * (wide / narrow)
    return float((np.abs(np.arange(wide)[None, :] - i) <= bandwidth / 2).mean())


class BandedLinear(nnx.Module):
    """Bias-free linear layer whose kernel is a Band; maps [..., fan_in] -> [..., fan_out].

    fan_in < fan_out (FC1): gathers input windows. fan_in > fan_out (FC2): scatter-adds output windows.
    ``kernel`` holds only the blocks [K, W, W] (in-axis first, as nnx.Linear's [in, out]).
    """

    def __init__(self, fan_in: int, fan_out: int, bandwidth: int, *, rngs: nnx.Rngs, zero: bool = False):
        self.transposed = fan_in > fan_out
        self.band = check_band(bandwidth, min(fan_in, fan_out), max(fan_in, fan_out), "bandwidth")
        if self.band is None:
            raise ValueError("BandedLinear needs a bandwidth > 0; use nanochat.mlp.linear for dense")
        # The same key and initialiser as the dense layer, restricted to the band.
        dense = kernel_init(fan_in, fan_out, zero=zero)(rngs.params(), (fan_in, fan_out), jnp.float32)
        self.kernel = nnx.Param(self.band.from_dense(dense, transposed=self.transposed))

    def __call__(self, x: jax.Array) -> jax.Array:
        idx = self.band.indices
        w = self.kernel[...]
        if not self.transposed:
            return jnp.einsum("...kw,kwf->...kf", x[..., idx], w).reshape(*x.shape[:-1], -1)
        K, W = idx.shape
        # Overlapping windows are summed in fp32, so a bf16 step rounds once, as a dense matmul's output does.
        out = jnp.einsum("...kf,kfw->...kw", x.reshape(*x.shape[:-1], K, W), w, preferred_element_type=jnp.float32)
        y = jnp.zeros((*x.shape[:-1], self.band.narrow), jnp.float32)
        return y.at[..., idx.reshape(-1)].add(out.reshape(*x.shape[:-1], K * W)).astype(x.dtype)

    def dense_kernel(self) -> jax.Array:
        """The equivalent dense kernel [fan_in, fan_out], zero outside the band."""
        return self.band.to_dense(self.kernel[...], transposed=self.transposed)


def _layer(fan_in: int, fan_out: int, bandwidth: int, *, rngs: nnx.Rngs, zero: bool = False):
    return linear(fan_in, fan_out, rngs=rngs, zero=zero) if bandwidth == 0 else \
        BandedLinear(fan_in, fan_out, bandwidth, rngs=rngs, zero=zero)


class BandedMLP(nnx.Module):
    """nanochat's relu² MLP (D -> 4D -> D) with a banded FC1 (``c_fc``) and/or FC2 (``c_proj``); 0 = dense."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, fc1_bandwidth: int = 0, fc2_bandwidth: int = 0):
        D = cfg.n_embd
        self.c_fc = _layer(D, 4 * D, fc1_bandwidth, rngs=rngs)
        self.c_proj = _layer(4 * D, D, fc2_bandwidth, rngs=rngs, zero=True)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return self.c_proj(jnp.square(jax.nn.relu(self.c_fc(x_BTD))))


def banded_mlp(fc1_bandwidth: int, fc2_bandwidth: int):
    """The MLP factory GPT(cfg, mlp=...) takes; (0, 0) is nanochat's dense MLP itself."""
    if fc1_bandwidth == fc2_bandwidth == 0:
        return ReluSquaredMLP
    return functools.partial(BandedMLP, fc1_bandwidth=fc1_bandwidth, fc2_bandwidth=fc2_bandwidth)


def mlp_bands(n_embd: int, fc1_bandwidth: int, fc2_bandwidth: int) -> dict:
    """Checked bandwidths and the exact per-layer densities and parameter counts of one MLP (per block)."""
    D, F = n_embd, 4 * n_embd
    out = {}
    for name, bw in (("fc1", fc1_bandwidth), ("fc2", fc2_bandwidth)):
        band = check_band(bw, D, F, f"--{name}-bandwidth")
        out[name] = {"bandwidth": bw, "density": 1.0 if band is None else band.density,
                     "params": D * F if band is None else band.params,
                     "window": D if band is None else band.window, "blocks": 1 if band is None else band.blocks}
    out["mlp_density"] = (out["fc1"]["params"] + out["fc2"]["params"]) / (2 * D * F)
    return out


def params_from_dense(dense_params, banded_params, n_embd: int, fc1_bandwidth: int, fc2_bandwidth: int):
    """Banded params from a dense model's (e.g. a shared initial checkpoint): every leaf copied, except the MLP
    kernels of banded layers, which take the band of the dense kernel. Shapes must otherwise match."""
    bands = {"c_fc": (fc1_bandwidth, False), "c_proj": (fc2_bandwidth, True)}

    def convert(path, dense, like):
        keys = [getattr(k, "key", None) for k in path]
        layer = next((k for k in keys if k in bands), None) if "mlp" in keys else None
        if layer is not None and bands[layer][0]:
            bw, transposed = bands[layer]
            dense = Band(n_embd, 4 * n_embd, bw).from_dense(dense, transposed=transposed)
        if dense.shape != like.shape:
            raise UserError(f"--init-from: parameter {'/'.join(map(str, keys))} has shape {dense.shape}, this run "
                            f"needs {like.shape}")
        return dense.astype(like.dtype)

    return jax.tree_util.tree_map_with_path(convert, dense_params, banded_params)
