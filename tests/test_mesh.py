"""Training on a device mesh (mgr.mesh): the partitioning rule and flags on one device here; data parallel and FSDP
on 4 host CPU devices in a subprocess (tests/mesh_worker.py, so this process keeps one device); a run of two
processes joined over a loopback coordinator; checkpoints moving between 4 devices and 1."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mgr.errors import UserError
from mgr.mesh import fsdp_spec, init_distributed, make_mesh
from nanochat.data import DataSpec, open_source
from nanochat.data.loader import Loader
from nanochat.tokenizer import load_tokenizer
from tests.conftest import REPO, one_error_line, read_json
from tests.test_nanochat_train import TINY, B, T, step_records, train

FP32 = dict(rel=1e-4, abs=1e-5)  # reduction order differs between layouts; nothing else does


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MGR_", "SLURM_"))}
    return {**env, "PYTHONPATH": str(REPO), **extra}


# --- one device ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, spec", [
    ((257, 64), P(None, "data")),  # the vocab axis is largest but 4 does not divide it
    ((1, 64, 256), P(None, None, "data")),
    ((8, 8), P("data", None)),  # equals: the first
    ((3,), P()), ((), P()), ((2, 6), P()),
])
def test_fsdp_shards_the_largest_divisible_axis(shape, spec):
    assert fsdp_spec(shape, 4) == spec


def test_one_device_keeps_the_single_device_loop(run_toy):
    assert make_mesh(None, False) is None and make_mesh(1, True) is None
    code, run_dir = run_toy("one", "--fsdp")
    assert code == 0
    summary = read_json(run_dir / "summary.json")
    assert summary["meta"]["mesh"] == {"axes": {"data": 1}, "devices": 1, "fsdp": False, "processes": 1,
                                       "local_devices": 1}
    assert summary["results"]["train"]["baseline"]["devices"] == 1
    assert "**mesh**" not in (run_dir / "run.md").read_text()


@pytest.mark.parametrize("flags, expected", [
    (["--mesh", "model=2"], "expected data=N with N >= 1"),
    (["--mesh", "data=0"], "expected data=N with N >= 1"),
    (["--mesh", "data=8"], "--mesh data=8: only 1 cpu device(s) are visible"),
])
def test_bad_mesh_is_one_error_line_before_a_run_dir(run_toy, capsys, flags, expected):
    if jax.device_count() != 1:
        pytest.skip("written for one device")
    code, run_dir = run_toy("bad", *flags)
    assert code == 2 and expected in one_error_line(capsys)
    assert not run_dir.exists()


@pytest.mark.parametrize("env, expected", [
    ({"MGR_COORDINATOR": "127.0.0.1:1"}, "set all of MGR_COORDINATOR"),
    ({"MGR_COORDINATOR": "x:1", "MGR_NUM_PROCESSES": "2", "MGR_PROCESS_ID": "2"}, "must lie in [0"),
    ({"MGR_COORDINATOR": "x:1", "MGR_NUM_PROCESSES": "two", "MGR_PROCESS_ID": "0"}, "whole numbers"),
])
def test_bad_process_env_is_refused(env, expected):
    with pytest.raises(UserError, match=expected.replace("[", r"\[")):
        init_distributed(env)


def test_one_process_env_needs_no_coordinator():
    assert init_distributed({}) is False
    assert init_distributed({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1"}) is False
    assert init_distributed({"MGR_COORDINATOR": "x:1", "MGR_NUM_PROCESSES": "1", "MGR_PROCESS_ID": "0"}) is False


def test_loader_fills_only_the_process_rows():
    source = open_source(DataSpec(), seed=0, row_len=T + 1)
    tok = load_tokenizer("byte")
    full = Loader(source, tok, seq_len=T, batch_size=8, seed=0, split="train")
    part = Loader(source, tok, seq_len=T, batch_size=8, seed=0, split="train", fill=slice(2, 6))
    for step in range(3):
        a, b = full(step), part(step)
        for key in a:
            np.testing.assert_array_equal(b[key][2:6], a[key][2:6])
            assert not b[key][:2].any() and not b[key][6:].any()
    assert part.state_dict() == full.state_dict()


# --- 4 devices (subprocess) ------------------------------------------------------------------------------------

# A minute or more of compiling in subprocesses: kept out of the default run (pytest -m slow tests/test_mesh.py).
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One device: 6 steps, checkpoints at 3 and 6."""
    code, run_dir = train(tmp_path_factory.mktemp("single"), "single", "--max-iterations", "6",
                          "--checkpoint-every", "3")
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def four(tmp_path_factory, single_run):
    out = tmp_path_factory.mktemp("four")
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    # 5.5 steps of the one-device program: the FSDP run must count the same global FLOPs to stop at 6.
    target = 5.5 * read_json(single_run / "summary.json")["results"]["flops_per_step_measured"]
    proc = subprocess.run([sys.executable, "-m", "tests.mesh_worker", str(out), str(single_run), str(target)],
                          cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["devices"] == 4
    return results


@pytest.mark.parametrize("which", ["steps", "steps_accum2"])  # accum 2: micro-batches split over the devices
@slow
def test_data_parallel_and_fsdp_steps_equal_the_single_device_step(four, which):
    r = four[which]
    # Adam divides by sqrt(v): reduction-order noise in a near-zero gradient moves its update by up to ~1% of
    # the LR (3e-3), hence parameters to 1e-4; the moments themselves agree to 1e-7.
    for name in ("dp", "fsdp") if which == "steps" else ("fsdp",):
        assert r[name]["losses"] == pytest.approx(r["single_losses"], **FP32)
        assert r[name]["param_diff_vs_single"] < 1e-4 and r[name]["opt_diff_vs_single"] < 1e-7
        assert r[name]["params_out_sharded_like_in"] and r[name]["metrics_replicated"]
    if which == "steps":
        assert r["fsdp_vs_dp_param_diff"] < 1e-4
    assert r["single_losses"][1] != r["single_losses"][0]  # the second step saw updated parameters


@slow
def test_parameter_shardings_are_what_fsdp_says(four):
    specs = four["steps"]
    for key, (shape, spec) in specs["dp"]["specs"].items():
        assert spec == str(P()), key
    sharded = 0
    for key, (shape, spec) in specs["fsdp"]["specs"].items():
        assert spec == str(fsdp_spec(tuple(shape), 4)), key
        sharded += spec != str(P())
    fsdp = specs["fsdp"]["specs"]
    # Optimizer moments are laid out like their parameter; the embedding [V=257, D=64] splits D.
    wte = [k for k in fsdp if "wte" in k]
    assert len(wte) == 3 and all(fsdp[k][1] == str(P(None, "data")) for k in wte)
    assert sharded > 4


@slow
def test_checkpoints_move_between_four_devices_and_one(tmp_path, four, single_run):
    fsdp_run = Path(four["fsdp_run"]["run_dir"])
    assert four["fsdp_run"]["code"] == 0
    full_single = [r["loss"] for r in step_records(single_run)]
    # 4 devices (FSDP) trains like 1 device ...
    assert [r["loss"] for r in step_records(fsdp_run)] == pytest.approx(full_single, **FP32)
    # ... a 1-device checkpoint resumes on 4 devices and the losses continue ...
    assert four["resume_single_on_four"]["code"] == 0
    resumed4 = step_records(Path(four["resume_single_on_four"]["run_dir"]))
    assert [r["step"] for r in resumed4] == [3, 4, 5]
    assert [r["loss"] for r in resumed4] == pytest.approx(full_single[3:], **FP32)
    # ... and the FSDP checkpoint resumes on this process's one device.
    code, resumed1 = train(tmp_path, "resumed1", "--max-iterations", "6",
                           "--resume", str(fsdp_run / "checkpoints" / "3"))
    assert code == 0
    assert [r["loss"] for r in step_records(resumed1)] == pytest.approx(full_single[3:], **FP32)
    assert read_json(resumed1 / "summary.json")["meta"]["mesh"]["devices"] == 1


@slow
def test_budgets_are_global_flops_and_mfu_is_per_device(four, single_run):
    run = four["fsdp_run"]
    assert run["code"] == 0
    summary = read_json(Path(run["run_dir"]) / "summary.json")
    r, t = summary["results"], summary["results"]["train"]["nanochat"]
    assert summary["meta"]["mesh"] == {"axes": {"data": 4}, "devices": 4, "fsdp": True, "processes": 1,
                                       "local_devices": 4}
    assert "**mesh**: data=4, FSDP" in (Path(run["run_dir"]) / "run.md").read_text()
    # Global FLOPs: the same per step as the one-device program on the same global batch; the budget counts them.
    one = read_json(single_run / "summary.json")["results"]
    assert r["flops_per_step_measured"] == pytest.approx(one["flops_per_step_measured"], rel=0.05)
    assert r["matmul_flops_per_step_measured"] == one["matmul_flops_per_step_measured"]
    assert summary["budget"]["stopped_by"] == "target_flops" and summary["budget"]["steps"] == 6
    assert r["devices"] == t["devices"] == 4
    assert r["flops_per_step_measured_per_device"] == pytest.approx(r["flops_per_step_measured"] / 4)
    assert t["flops_per_step_per_device"] == pytest.approx(t["flops_per_step"] / 4)
    assert r["tokens_per_second_per_device"] == pytest.approx(r["tokens_per_second"] / 4)
    assert r["tokens_per_step"] == B * T  # the batch is global
    assert r["tflops_per_second_per_device_est"] == pytest.approx(r["tflops_per_second_est"] / 4)
    assert r["mfu"] == pytest.approx(r["tflops_per_second_per_device_est"] * 1e12 / 1e12)  # the worker's peak


@slow
def test_batch_not_divisible_by_the_mesh_is_one_error_line(four):
    bad = four["bad_batch"]
    lines = bad["stderr"].splitlines()
    assert bad["code"] == 2 and len(lines) == 1, bad["stderr"]
    assert lines[0] == "error: --batch-size 6 is the global batch and must divide by the mesh's data=4"
    summary = read_json(Path(bad["run_dir"]) / "summary.json")
    assert summary["status"] == "failed" and summary["budget"]["variants"] == {}


# --- two processes ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@slow
def test_two_processes_train_and_write_one_run_dir(tmp_path, single_run):
    port = _free_port()
    cmd = [sys.executable, "-m", "nanochat.train", *TINY, "--max-iterations", "6",
           "--artifacts-dir", str(tmp_path)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(MGR_COORDINATOR=f"127.0.0.1:{port}", MGR_NUM_PROCESSES="2",
                                       MGR_PROCESS_ID=str(i), JAX_PLATFORMS="cpu"))
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    # No --run-id: the processes agree on process 0's clock-based one.
    runs = list((tmp_path / "nanochat" / "train").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in tmp_path.rglob("summary.json")) == ["summary.json"]
    summary = read_json(runs[0] / "summary.json")
    assert summary["status"] == "completed"
    assert summary["meta"]["mesh"] == {"axes": {"data": 2}, "devices": 2, "fsdp": False, "processes": 2,
                                       "local_devices": 1}
    # Metrics are the global ones, reduced across processes: the same as one device on the same global batch.
    assert [r["loss"] for r in step_records(runs[0])] == pytest.approx(
        [r["loss"] for r in step_records(single_run)], **FP32)
    assert "samples at step 6" in outs[0][0] and "samples at step" not in outs[1][0]  # only process 0 reports
