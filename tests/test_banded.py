"""Banded FC1/FC2 (mgr/methods/banded.py): equal to a dense layer that is zero outside the band (values and
gradients), exact density, FLOPs of the real nanochat step falling with density, the dense special case, the
shared initial model, and bad bandwidths as one error line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgr.flops import count_flops
from mgr.methods.banded import Band, BandedLinear, BandedMLP, banded_mlp, check_band, density, element_band_density
from mgr.errors import UserError
from nanochat import train as nanochat
from nanochat.checkpoint import read_meta, restore_arrays
from nanochat.mlp import ReluSquaredMLP
from nanochat.model import GPT, estimate_flops
from tests.conftest import one_error_line, read_json
from tests.test_nanochat_train import TINY, train

C = 32  # narrow axis; wide = 128


def _random_blocks(layer, key):
    layer.kernel[...] = jax.random.normal(key, layer.kernel.shape)
    return layer


@pytest.mark.parametrize("fan_in, fan_out", [(C, 4 * C), (4 * C, C)], ids=["fc1", "fc2"])
@pytest.mark.parametrize("bandwidth", [128, 64, 32, 16])
def test_banded_equals_dense_zero_outside_band_values_and_grads(fan_in, fan_out, bandwidth):
    layer = _random_blocks(BandedLinear(fan_in, fan_out, bandwidth, rngs=nnx.Rngs(0)), jax.random.key(1))
    band = layer.band
    dense = layer.dense_kernel()
    mask = band.mask() if fan_in < fan_out else band.mask().T
    assert dense.shape == (fan_in, fan_out)
    assert bool(jnp.all(dense[~mask] == 0)) and bool(jnp.all(dense[mask] != 0))
    x = jax.random.normal(jax.random.key(2), (3, 5, fan_in))
    dy = jax.random.normal(jax.random.key(3), (3, 5, fan_out))

    def banded(blocks, x):
        return jnp.vdot(dy, _apply(layer, blocks, x))

    def masked_dense(w, x):
        return jnp.vdot(dy, x @ w)

    np.testing.assert_allclose(_apply(layer, layer.kernel[...], x), x @ dense, rtol=1e-5, atol=1e-5)
    g_blocks, g_x = jax.grad(banded, argnums=(0, 1))(layer.kernel[...], x)
    g_dense, g_x_ref = jax.grad(masked_dense, argnums=(0, 1))(dense, x)
    np.testing.assert_allclose(g_x, g_x_ref, rtol=1e-5, atol=1e-4)
    # The banded gradient is the dense gradient inside the band; outside it there is no parameter at all.
    np.testing.assert_allclose(g_blocks, band.from_dense(g_dense, transposed=fan_in > fan_out), rtol=1e-5,
                               atol=1e-4)
    assert layer.kernel.size == int(mask.sum()) < fan_in * fan_out or bandwidth == 4 * C


def _apply(layer, blocks, x):
    """The layer as a pure function of its blocks (its only parameter)."""
    graphdef, state = nnx.split(layer)
    return nnx.merge(graphdef, jax.tree.map(lambda _: blocks, state))(x)


@pytest.mark.parametrize("narrow", [32, 192, 768])
def test_density_formula_matches_counted_nonzeros(narrow):
    wide = 4 * narrow
    for bw in [b for b in (1024, 512, 256, 128, 64) if b <= wide]:
        band = check_band(bw, narrow, wide, "--fc1-bandwidth")
        mask = band.mask()
        assert mask.sum() == band.params == round(bw / wide * narrow * wide)
        assert density(bw, narrow, wide) == mask.mean() == bw / wide
        assert np.all(mask.sum(axis=0) == bw // 4)                 # every wide unit reads W = bw/4 narrow units
        interior = mask.sum(axis=1)[bw // 2: narrow - bw // 2]
        assert np.all(interior == bw)                              # band bw wide along 4C away from the corners
    assert density(1024, 768, 3072) == pytest.approx(1 / 3) and density(256, 768, 3072) == pytest.approx(1 / 12)
    # The earlier experiment's truncated element band is a little sparser than bw/4C.
    assert element_band_density(1024, 768, 3072) == pytest.approx(0.3058, abs=1e-4)


def test_bandwidth_zero_is_nanochats_dense_mlp_and_banded_init_is_the_dense_band():
    from nanochat.model import GPTConfig
    cfg = GPTConfig.from_depth(1, vocab_size=257, sequence_len=16)
    assert banded_mlp(0, 0) is ReluSquaredMLP
    half = BandedMLP(cfg, rngs=nnx.Rngs(0), fc1_bandwidth=0, fc2_bandwidth=64)
    assert isinstance(half.c_fc, nnx.Linear) and isinstance(half.c_proj, BandedLinear)
    dense = nnx.split(GPT(cfg, rngs=nnx.Rngs(3)), nnx.Param)[1]
    banded = nnx.split(GPT(cfg, rngs=nnx.Rngs(3), mlp=banded_mlp(128, 64)), nnx.Param)[1]
    band1, band2 = Band(64, 256, 128), Band(64, 256, 64)
    d, b = dense["blocks"]["mlp"], banded["blocks"]["mlp"]
    np.testing.assert_array_equal(b["c_fc"]["kernel"][...], band1.from_dense(d["c_fc"]["kernel"][...],
                                                                             transposed=False))
    np.testing.assert_array_equal(b["c_proj"]["kernel"][...], 0)  # zero-initialised output projection, as dense
    assert b["c_proj"]["kernel"].shape == (1, band2.blocks, band2.window, band2.window)
    np.testing.assert_array_equal(banded["blocks"]["attn"]["c_q"]["kernel"][...],
                                  dense["blocks"]["attn"]["c_q"]["kernel"][...])


def test_flops_of_the_real_training_step_fall_with_density():
    nc = nanochat.Config(depth=2, sequence_len=32, batch_size=2, recipe="classic")  # the analytic count's model
    cfg = nanochat.model_config(nc, vocab_size=257)
    x = jnp.zeros((2, 32), jnp.int32)
    batch = {"inputs_BT": x, "targets_BT": x}
    tokens = 2 * 32
    records = {}
    for fc1, fc2 in [(0, 0), (256, 0), (0, 256), (128, 128), (64, 64)]:
        graphdef, params = nnx.split(nanochat.build_model(nc, cfg, 0, mlp=banded_mlp(fc1, fc2)), nnx.Param)
        tx = nanochat.make_optimizer(nc, params)
        records[fc1, fc2] = count_flops(nanochat.make_train_step(graphdef, tx, nc),
                                        nanochat.init_state(params, tx), batch)
    D = cfg.n_embd
    for (fc1, fc2), r in records.items():
        mlp_density = (density(fc1, D, 4 * D) + density(fc2, D, 4 * D)) / 2
        assert r.matmul_flops == pytest.approx(tokens * estimate_flops(cfg, mlp_density=mlp_density), rel=1e-3)
        saved = records[0, 0].matmul_flops - r.matmul_flops
        assert saved == pytest.approx(6 * tokens * cfg.n_layer * 2 * D * 4 * D * (1 - mlp_density), rel=1e-3)
    xla = [records[k].flops for k in [(0, 0), (128, 128), (64, 64)]]
    assert xla == sorted(xla, reverse=True) and xla[-1] < 0.8 * xla[0]
    assert records[256, 0].flops < records[0, 0].flops and records[0, 256].flops < records[0, 0].flops


@pytest.mark.slow
def test_init_only_then_init_from_gives_every_run_the_same_band_of_one_model(tmp_path):
    code, init_dir = train(tmp_path, "init", "--init-only", "--seed", "5")
    assert code == 0
    summary = read_json(init_dir / "summary.json")
    assert summary["status"] == "completed" and summary["budget"]["variants"] == {}
    root, step, meta = read_meta(init_dir)
    assert step == 0 and meta["init_only"] and meta["mlp"] == {"fc1_bandwidth": 0, "fc2_bandwidth": 0}

    code, run_dir = train(tmp_path, "banded", "--init-from", str(init_dir), "--fc1-bandwidth", "64",
                          "--fc2-bandwidth", "128", "--max-iterations", "1")
    assert code == 0
    r = read_json(run_dir / "summary.json")["results"]
    assert r["mlp"]["fc1"]["density"] == 0.25 and r["mlp"]["fc2"]["density"] == 0.5
    assert r["mlp"]["mlp_density"] == 0.375 and r["init_from"] == str(init_dir)
    assert r["matmul_flops_per_step_measured"] / r["tokens_per_step"] == pytest.approx(
        r["flops_per_token_analytic"], rel=1e-3)

    nc = nanochat.Config(depth=1, sequence_len=32, batch_size=4, fc1_bandwidth=64, fc2_bandwidth=128, recipe="classic",
                         init_from=str(init_dir))
    cfg = nanochat.model_config(nc, vocab_size=257)
    fresh = nnx.split(nanochat.build_model(nc, cfg, 0, mlp=banded_mlp(64, 128)), nnx.Param)[1]
    loaded = nanochat._init_from(nc, cfg, fresh)
    dense = restore_arrays(root, 0, {"params": nnx.split(nanochat.build_model(nc, cfg, 0), nnx.Param)[1]})["params"]
    np.testing.assert_array_equal(loaded["blocks"]["mlp"]["c_fc"]["kernel"][...], Band(64, 256, 64).from_dense(
        dense["blocks"]["mlp"]["c_fc"]["kernel"][...], transposed=False))
    np.testing.assert_array_equal(loaded["wte"]["embedding"][...], dense["wte"]["embedding"][...])
    # A seed-5 model is what was saved, so it differs from this run's own (seed 0) initialisation.
    assert not np.array_equal(loaded["wte"]["embedding"][...], fresh["wte"]["embedding"][...])


@pytest.mark.parametrize("flags, expected", [
    (["--fc1-bandwidth", "-4"], "--fc1-bandwidth must be >= 0 (0 = dense), got -4"),
    (["--fc2-bandwidth", "wide"], "--fc2-bandwidth: expects int, got 'wide'"),
    (["--fc1-bandwidth", "100"], "--fc1-bandwidth 100 does not tile the 64x256 MLP matrix"),
    (["--fc2-bandwidth", "512"], "--fc2-bandwidth 512 does not tile the 64x256 MLP matrix"),
    (["--init-from", "x", "--resume", "y"], "--init-from and --resume exclude each other"),
])
def test_bad_bandwidth_is_one_error_line(tmp_path, capsys, flags, expected):
    from nanochat.train import main
    capsys.readouterr()
    assert main([*TINY, *flags, "--max-iterations", "1", "--artifacts-dir", str(tmp_path)]) == 2
    assert expected in one_error_line(capsys)


def test_check_band_rejects_non_integers():
    with pytest.raises(UserError, match="whole number"):
        check_band(2.5, 64, 256, "--fc1-bandwidth")
