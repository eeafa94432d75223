"""nanochat.export and `--from-checkpoint RUN_DIR`: a tiny trained run's MLP weights come back exactly as stored,
the captured inputs are those the block's MLP really reads, and the benches run on them end to end."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mgr import structured_inputs as S
from mgr.cli import main as mgr_main
from mgr.errors import UserError
from nanochat import export as E
from nanochat import train
from nanochat.mlp import ReluSquaredMLP
from nanochat.model import GPT, GPTConfig
from tests.conftest import one_error_line, read_json

D = 64  # depth 1: width 64, MLP hidden 256
BENCH = ["--tokens", "64", "--tokens-val", "48", "--tokens-train", "128", "--iters", "2", "--warmup", "1",
         "--rank-fracs", "0.25,1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nanochat")
    assert train.main(["--depth", "1", "--sequence-len", "32", "--batch-size", "4", "--max-iterations", "2",
                       "--checkpoint-every", "2", "--eval-tokens", "128", "--artifacts-dir", str(tmp),
                       "--run-id", "r"]) == 0
    return tmp / "nanochat" / "train" / "r"


def stored_mlp(run_dir):
    """The MLP kernels as orbax stored them, read without any template (independent of nanochat.export)."""
    arrays = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / "2" / "arrays")
    mlp = arrays["params"]["blocks"]["mlp"]
    # an nnx.Param is stored as {"value": array}
    return tuple(np.asarray(mlp[name]["kernel"]["value"]) for name in ("c_fc", "c_proj"))


def test_layer_arrays_are_the_stored_weights_and_normed_inputs(run_dir):
    w1, w2, x = E.layer_arrays(run_dir, layer=0, n_tokens=300, seed=0)  # 300: not a whole number of 32-token rows
    assert w1.shape == (D, 4 * D) and w2.shape == (4 * D, D) and x.shape == (300, D)
    assert w1.dtype == w2.dtype == x.dtype == np.float32
    c_fc, c_proj = stored_mlp(run_dir)
    np.testing.assert_array_equal(w1, c_fc[0])
    np.testing.assert_array_equal(w2, c_proj[0])
    assert np.abs(w2).max() > 0  # trained: c_proj has left its zero init, so the MLP matters
    np.testing.assert_allclose(np.sqrt(np.mean(x**2, axis=1)), 1.0, atol=1e-4)  # RMS-normed per token
    assert len(np.unique(x.round(4), axis=0)) > 250  # varied tokens and contexts (each row's BOS repeats)
    # the same checkpoint through its step directory, and the seed choosing other tokens
    same = E.layer_arrays(run_dir / "checkpoints" / "2", layer=0, n_tokens=300, seed=0)
    np.testing.assert_array_equal(same[2], x)
    assert not np.array_equal(E.layer_arrays(run_dir, layer=0, n_tokens=300, seed=1)[2], x)


_seen = []


class RecordingMLP(ReluSquaredMLP):
    """The real MLP, noting its input: run eagerly and unscanned, it sees each layer's concrete array in turn."""

    def __call__(self, x_BTD):
        _seen.append(np.asarray(x_BTD))
        return super().__call__(x_BTD)


@pytest.mark.slow
def test_mlp_inputs_match_what_each_block_mlp_reads():
    cfg = GPTConfig.from_depth(2, vocab_size=50, sequence_len=16)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    # random everything: the zero-init projections would make every block the identity and hide a wrong layer
    graphdef, params = nnx.split(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda p: 0.3 * jax.random.normal(next(keys), p.shape), params)
    model = nnx.merge(graphdef, params)
    idx_BT = jax.random.randint(jax.random.key(2), (3, 16), 0, 50)
    reference = GPT(cfg, rngs=nnx.Rngs(0), mlp=RecordingMLP, scan_layers=False)
    nnx.update(reference, params)
    _seen.clear()
    reference(idx_BT)
    assert len(_seen) == 2
    for layer in (0, 1):
        np.testing.assert_allclose(np.asarray(model.mlp_input(idx_BT, layer)), _seen[layer], atol=1e-5)
    assert not np.allclose(_seen[0], _seen[1], atol=1e-2)


def test_export_cli_writes_the_bench_npz(run_dir, tmp_path, capsys):
    out = tmp_path / "layer.npz"
    assert E.main(["--run", str(run_dir), "--layer", "0", "--tokens", "100", "--out", str(out)]) == 0
    for got, want in zip(S.load_layer_arrays(out), E.layer_arrays(run_dir, layer=0, n_tokens=100, seed=0)):
        np.testing.assert_array_equal(got, want)
    capsys.readouterr()
    assert E.main(["--run", str(run_dir), "--layer", "1", "--tokens", "100", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "layer 1 out of range" in line and "has 1 layer(s)" in line
    assert E.main(["--run", str(tmp_path), "--out", str(out)]) == 2
    assert "no checkpoint found" in one_error_line(capsys)


def test_structured_inputs_read_a_run_directory(run_dir):
    spec = S.InputSpec(tokens_train=40, tokens_val=10, tokens=10, from_checkpoint=str(run_dir))
    c_fc, c_proj = stored_mlp(run_dir)
    mlp = S.make_mlp_problem(0, 999, 999, spec)  # sizes come from the checkpoint
    np.testing.assert_array_equal(mlp.w1_DH, c_fc[0])
    np.testing.assert_array_equal(mlp.w2_HD, c_proj[0])
    assert [a.shape for a in mlp.x] == [(40, D), (10, D), (10, D)]
    lin = S.make_linear_problem(0, 999, 999, spec)
    np.testing.assert_array_equal(lin.w_IO, c_fc[0])
    np.testing.assert_array_equal(np.concatenate(lin.x), np.concatenate(mlp.x))
    with pytest.raises(UserError, match="out of range"):
        S.make_mlp_problem(0, 8, 16, S.InputSpec(from_checkpoint=str(run_dir), checkpoint_layer=-1))


@pytest.mark.slow
def test_bench_runs_on_the_checkpoint_layer(run_dir, tmp_path, capsys):
    code = mgr_main(["run", "matrix-approx", "--from-checkpoint", str(run_dir), "--artifacts-dir", str(tmp_path),
                     "--run-id", "ck", *BENCH])
    assert code == 0
    summary = read_json(next(tmp_path.glob("benches/*/ck")) / "summary.json")
    res = summary["results"]
    assert res["dmodel"] == D and res["hidden"] == 4 * D
    assert res["ranks"] == [16, 64]
    full = {r["name"]: r for r in res["mlp"]["rows"]}["exact r=64"]
    assert full["rel_err"] < 1e-4  # full rank reproduces the real layer
    capsys.readouterr()
    code = mgr_main(["run", "matrix-approx", "--from-checkpoint", str(run_dir), "--checkpoint-layer", "3",
                     "--artifacts-dir", str(tmp_path), "--run-id", "bad", *BENCH])
    assert code == 2
    assert "layer 3 out of range" in one_error_line(capsys)
