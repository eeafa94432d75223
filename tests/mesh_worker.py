"""The 4-device half of tests/test_mesh.py: run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4
(JAX fixes its device count at start-up, and the other tests keep one device). Computes, writes OUT/results.json.

usage: python -m tests.mesh_worker OUT SINGLE_RUN_DIR TARGET_FLOPS
(SINGLE_RUN_DIR: a 1-device run with a checkpoint at step 3; TARGET_FLOPS: the FSDP run's budget)
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from mgr.mesh import make_mesh
from nanochat import train as nt
from tests.test_nanochat_train import TINY

SEED = 0


def _max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                     jax.tree.leaves(b)))


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


def step_equivalence(grad_accum: int, layouts: dict[str, bool]) -> dict:
    """Two AdamW steps of the d1 model on one global batch: one device vs ``layouts`` (name -> fsdp)."""
    config = nt.Config(depth=1, sequence_len=32, batch_size=8, grad_accum=grad_accum, recipe="classic")
    cfg = nt.model_config(config, 257)
    graphdef, params = nnx.split(nt.build_model(config, cfg, SEED), nnx.Param)
    tx = nt.make_optimizer(config, params)
    state = nt.init_state(params, tx)
    rng = np.random.default_rng(SEED)
    batches = [{k: rng.integers(0, 257, (8 * grad_accum, 32), dtype=np.int32) for k in ("inputs_BT", "targets_BT")}
               for _ in range(2)]

    single = jax.jit(nt.make_train_step(graphdef, tx, config))
    ref, ref_losses = _copy(state), []
    for batch in batches:
        ref, m = single(ref, batch)
        ref_losses.append(float(m["loss"]))

    out, finals = {"single_losses": ref_losses}, {}
    for name, fsdp in layouts.items():
        mesh = make_mesh(4, fsdp)
        step = nt.make_train_step(graphdef, tx, config, mesh=mesh)
        _, exe = mesh.compile_and_count(step, state, batches[0])
        st, losses = mesh.put_state(_copy(state)), []
        specs_in = jax.tree.map(lambda x: str(x.sharding.spec), st)
        for batch in batches:
            st, m = exe(st, mesh.put_batch(batch))
            losses.append(float(m["loss"]))
        finals[name] = st
        out[name] = {
            "losses": losses,
            "param_diff_vs_single": _max_abs_diff(st["params"], ref["params"]),
            "opt_diff_vs_single": _max_abs_diff(st["opt"], ref["opt"]),
            "params_out_sharded_like_in": jax.tree.map(lambda x: str(x.sharding.spec), st) == specs_in,
            "specs": {jax.tree_util.keystr(p): [list(np.shape(x)), str(x.sharding.spec)]
                      for p, x in jax.tree_util.tree_leaves_with_path(st)},
            "metrics_replicated": m["loss"].sharding.is_fully_replicated,
        }
    if len(finals) == 2:
        out["fsdp_vs_dp_param_diff"] = _max_abs_diff(finals["fsdp"]["params"], finals["dp"]["params"])
    return out


def cli(out: Path, run_id: str, *flags: str) -> dict:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = nt.main([*TINY, *flags, "--artifacts-dir", str(out), "--run-id", run_id])
    return {"code": code, "stderr": err.getvalue(), "run_dir": str(out / "nanochat" / "train" / run_id)}


def main(out: Path, single_run: Path, target_flops: str) -> None:
    results = {"devices": jax.device_count(), "steps": step_equivalence(1, {"dp": False, "fsdp": True}),
               "steps_accum2": step_equivalence(2, {"fsdp": True})}
    # A known peak, so the MFU's units are checked on CPU too.
    nt.peak_flops_per_s = lambda dtype: 1e12
    results["fsdp_run"] = cli(out, "four", "--fsdp", "--target-flops", target_flops, "--checkpoint-every", "3")
    results["resume_single_on_four"] = cli(out, "resumed", "--max-iterations", "6",
                                           "--resume", str(single_run / "checkpoints" / "3"))
    results["bad_batch"] = cli(out, "bad", "--batch-size", "6", "--max-iterations", "2")
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
