"""mgr sweep: spec expansion, resume after a configuration is killed mid-run, shards, checked flags; mgr report
tables from synthetic run directories."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats as sp

from mgr.cli import main
from mgr.report import build, register_columns, COLUMNS
from mgr.sweep import load_spec
from tests.conftest import REPO, one_error_line, read_json

SPEC = """
demo = "toy"
[flags]
max_iterations = 3
eval_every = 0
variants = ["baseline"]
[[config]]
name = "slow"
lr = 0.01
[[config]]
name = "fast"
lr = 0.1
init = "normal"
[grid]
seed = [0, 1]
"""


def test_spec_expands_named_configs_across_the_grid(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(SPEC)
    sweep = load_spec(str(path), None, ["--width", "8"])
    assert sweep.name == "study" and sweep.demo == "toy"
    assert [c.name for c in sweep.configs] == ["slow_seed=0", "slow_seed=1", "fast_seed=0", "fast_seed=1"]
    assert sweep.argv(sweep.configs[3]) == ["--max-iterations", "3", "--eval-every", "0", "--variants", "baseline",
                                            "--width", "8", "--lr", "0.1", "--init", "normal", "--seed", "1"]


def test_bad_specs_are_one_error_line(toy, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    for text, expected in (('demo = "toy"\n[grid]\nlr = []\n', "non-empty list"),
                           ('demo = "toy"\n[[config]]\nlr = 1\n', "needs a name"),
                           ('demo = "toy"\n[flags]\nrun_id = "x"\n[grid]\nlr = [1]\n', "may not set --run-id"),
                           ('demo = "toy"\n[grid]\nlr = ["a"]\n', "configuration lr=a: "),
                           ("demo = \n", "not valid TOML")):
        path.write_text(text)
        assert main(["sweep", "--spec", str(path), "--artifacts-dir", str(tmp_path / "a")]) == 2
        assert expected in one_error_line(capsys)
    assert not (tmp_path / "a").exists()  # every configuration is checked before anything is made


def _sweep_argv(tmp_path, *extra):
    return ["sweep", "toy", "--grid", "lr=0.01,0.02,0.03", "--max-iterations", "30", "--eval-every", "0",
            "--variants", "baseline", "--name", "resume", "--artifacts-dir", str(tmp_path), *extra]


def test_resume_after_a_configuration_is_killed(toy, tmp_path, capsys):
    code = ("import sys, demos; demos.REGISTRY['toy'] = 'tests.toy_demo'; from mgr.cli import main; "
            f"sys.exit(main({_sweep_argv(tmp_path, '--sleep-ms', '100')!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sweep_dir = tmp_path / "sweeps" / "resume"
    second = sweep_dir / "lr=0.02" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (second.exists() and len(second.read_text().splitlines()) >= 3):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"interrupted in lr=0.02: rerun the same command to resume" in out
    record = {c["name"]: c for c in read_json(sweep_dir / "sweep.json")["configs"]}
    assert [record[n]["status"] for n in ("lr=0.01", "lr=0.02", "lr=0.03")] == ["completed", "interrupted",
                                                                                 "pending"]
    assert read_json(sweep_dir / "lr=0.02" / "summary.json")["status"] == "interrupted"

    assert main(_sweep_argv(tmp_path, "--sleep-ms", "1")) == 0
    out = capsys.readouterr().out
    assert "skip lr=0.01: completed" in out
    assert "rerun lr=0.02: the previous attempt was interrupted; kept as lr=0.02.attempt1" in out
    assert "run lr=0.03" in out
    record = read_json(sweep_dir / "sweep.json")["configs"]
    assert [c["status"] for c in record] == ["completed"] * 3 and record[1]["attempts"] == 2
    assert read_json(sweep_dir / "lr=0.02.attempt1" / "summary.json")["status"] == "interrupted"
    assert read_json(sweep_dir / "lr=0.02" / "summary.json")["results"]["train"]["baseline"]["steps"] == 30


def test_shards_split_the_configurations(toy, tmp_path, capsys):
    argv = ["sweep", "toy", "--grid", "lr=0.01,0.02", "--grid", "init=zeros,normal", "--max-iterations", "2",
            "--variants", "baseline", "--name", "sharded", "--artifacts-dir", str(tmp_path)]
    assert main([*argv, "--shard", "1/2"]) == 0
    sweep_dir = tmp_path / "sweeps" / "sharded"
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["lr=0.01_init=normal", "lr=0.02_init=normal"]
    statuses = [c["status"] for c in read_json(sweep_dir / "sweep.json")["configs"]]
    assert statuses == ["pending", "completed", "pending", "completed"]
    build(sweep_dir)  # a partly finished sweep reports what it has
    assert "4 configurations, 2 completed; not completed: lr=0.01_init=zeros (pending)" in \
        (sweep_dir / "README.md").read_text()
    assert main([*argv, "--shard", "2/2"]) == 2
    assert "K/N with 0 <= K < N" in one_error_line(capsys)


def test_dry_run_plans_without_training(toy, tmp_path, capsys):
    assert main(["sweep", "toy", "--grid", "hidden=32,64", "--max-iterations", "7", "--variants", "baseline",
                 "--artifacts-dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # baseline's dot FLOPs per step are 2*2*B*D*H (tests/toy_demo.py); XLA adds the elementwise ops
    assert "hidden=32: --max-iterations 7 --variants baseline --hidden 32; planned 7 steps" in out
    assert "hidden=64:" in out and not (tmp_path / "sweeps").exists()


# --- mgr report on synthetic run directories ----------------------------------------------------------------

def _run(sweep_dir, name, lr, finals, *, steps=(10, 20), tokens=1000.0):
    """A --seeds run of one variant: eval losses at `steps`, linear in seconds, ending at finals[seed]."""
    run_dir = sweep_dir / name
    run_dir.mkdir(parents=True)
    per_seed = {}
    for seed, final in finals.items():
        points = [{"step": s, "flops": 10.0 * s, "train_s": s / 10 * (1 + lr), "wall_s": s / 5, "value": v}
                  for s, v in zip(steps, (2 * final, final))]
        per_seed[str(seed)] = {"tokens_per_second": tokens,
                               "train": {"nanochat": {"steps": steps[-1], "flops_per_step": 10.0,
                                                      "eval_points": points}}}
    (run_dir / "config.json").write_text(json.dumps({"demo": "nanochat", "config": {"lr": lr, "depth": 2},
                                                     "seed": 0, "seeds": list(finals)}))
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "results": {
        "seeds": list(finals), "per_seed": per_seed}}))


def _rows(table_text):
    lines = [l for l in table_text.splitlines() if l.startswith("| ") and not l.startswith("| configuration")
             and not l.startswith("| step")]
    return {l.split(" | ")[0][2:]: [c.strip() for c in l.strip("| ").split(" | ")] for l in lines}


def test_report_tables_from_run_directories(tmp_path):
    sweep_dir = tmp_path / "sweeps" / "lr"
    base, cand = {0: 1.0, 1: 1.2, 2: 1.1}, {0: 0.9, 1: 1.1, 2: 1.02}
    _run(sweep_dir, "base", 1.0, base)
    _run(sweep_dir, "cand", 0.5, cand)
    register_columns("nanochat", lambda run: {"density": 0.5 if run.name == "cand" else 1.0})
    try:
        text = build(sweep_dir, baseline="base")
    finally:
        COLUMNS.pop("nanochat")
    summary, steps = text.split("### val_loss at every eval step")
    rows = _rows(summary)
    # key parameters: only what differs; then status, steps, FLOPs/step, final, Δ, tokens/s, times, density
    assert "| configuration | lr | status | steps | FLOPs/step | final val_loss | Δ vs baseline |" in summary
    diffs = np.array([cand[s] - base[s] for s in base])
    lo, hi = sp.t.interval(0.95, 2, loc=diffs.mean(), scale=sp.sem(diffs))
    mean_base = np.mean(list(base.values()))
    assert rows["cand"][6] == (f"{100 * diffs.mean() / mean_base:+.2g}% [{100 * lo / mean_base:+.2g}%, "
                               f"{100 * hi / mean_base:+.2g}%] (n=3)")
    assert rows["cand"][-1] == "0.5" and rows["base"][-1] == "1"
    # time to the same seed's baseline final loss: cand crosses between its evals, in log-loss
    cand_t = []
    for s in base:
        f = (np.log(2 * cand[s]) - np.log(base[s])) / (np.log(2 * cand[s]) - np.log(cand[s]))
        assert 0 <= f <= 1
        cand_t.append(1.5 + f * 1.5)  # train_s = step / 10 * (1 + lr) between steps 10 and 20
    assert rows["cand"][8].startswith(f"{np.mean(cand_t):.4g} [")
    base_t = [2 * (1 + 1.0)] * 3  # the baseline reaches its own final at its last eval, step 20
    speedup = np.exp(np.mean(np.log(np.array(base_t) / cand_t)))
    assert rows["cand"][9].startswith(f"{speedup:.4g} [") and rows["base"][9].startswith("1 [")
    assert rows["base"][3] == "20" and rows["base"][4] == "10" and rows["base"][7] == "1000"
    assert "| 10 | 2.2 | 2.013 |" in steps and "| 20 | 1.1 | 1.007 |" in steps
    for plot in ("loss_vs_step.png", "loss_vs_flops.png", "loss_vs_time.png"):
        assert (sweep_dir / plot).stat().st_size > 0 and f"![{plot}]({plot})" in text
    assert main(["report", str(sweep_dir), "--baseline", "nope"]) == 2


# --- shared_init: one --init-only run, --init-from for every configuration ----------------------------------

TINY_SHARED_INIT = """
demo = "nanochat"
shared_init = true
[flags]
depth = 1
sequence-len = 16
batch-size = 2
max-iterations = 2
eval-every = 2
eval-tokens = 64
device = "cpu"
[[config]]
name = "baseline"
[[config]]
name = "fc1-64"
fc1-bandwidth = 64
"""


def test_shared_init_is_made_once_and_reused_on_resume(toy, tmp_path, capsys):
    spec = tmp_path / "init.toml"
    spec.write_text('demo = "toy"\nshared_init = true\n[flags]\nmax_iterations = 2\nvariants = ["baseline"]\n'
                    '[grid]\nlr = [0.01, 0.02]\n')
    argv = ["sweep", "--spec", str(spec), "--artifacts-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "sweeps" / "init"
    assert out.index("run _init: the shared initial model (--init-only)") < out.index("run lr=0.01")
    assert read_json(sweep_dir / "_init" / "summary.json")["results"]["init_only"] is True
    for name in ("lr=0.01", "lr=0.02"):
        assert read_json(sweep_dir / name / "summary.json")["results"]["init_from"] == str(sweep_dir / "_init")
        assert read_json(sweep_dir / name / "summary.json")["meta"]["argv"][-2:] == ["--init-from",
                                                                                   str(sweep_dir / "_init")]
    assert main(argv) == 0
    assert "skip _init: completed (the shared initial model)" in capsys.readouterr().out
    (sweep_dir / "_init" / "summary.json").write_text('{"status": "interrupted"}')
    (sweep_dir / "lr=0.02" / "summary.json").unlink()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "rerun _init: the previous attempt was interrupted; kept as _init.attempt1" in out
    assert "skip lr=0.01: completed" in out and "rerun lr=0.02" in out
    assert "_init" not in build(sweep_dir).split("Generated by")[0]  # the init run is no configuration


@pytest.mark.slow
def test_shared_init_runs_once_and_every_configuration_starts_from_it(tmp_path, capsys):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SHARED_INIT)
    argv = ["sweep", "--spec", str(spec), "--artifacts-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "sweeps" / "tiny"
    init = sweep_dir / "_init"
    assert out.index("run _init: the shared initial model (--init-only)") < out.index("run baseline")
    assert read_json(init / "summary.json")["status"] == "completed" and (init / "checkpoints" / "0").is_dir()
    for name in ("baseline", "fc1-64"):
        summary = read_json(sweep_dir / name / "summary.json")
        assert summary["status"] == "completed" and summary["results"]["init_from"] == str(init)
    assert read_json(sweep_dir / "fc1-64" / "summary.json")["results"]["mlp"]["fc1"]["bandwidth"] == 64
    # Resume: a completed init is reused; a cut-off one is set aside and made again.
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "skip _init: completed" in out and "skip baseline: completed" in out and "skip fc1-64: completed" in out
    (sweep_dir / "fc1-64" / "summary.json").unlink()
    (init / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "rerun _init: the previous attempt was interrupted; kept as _init.attempt1" in out
    assert "skip baseline: completed" in out and "rerun fc1-64" in out
    assert read_json(init / "summary.json")["status"] == "completed"


def test_shared_init_spec_keys_and_the_banded_specs_load(tmp_path, capsys):
    from mgr.cli import parse_demo_args
    path = tmp_path / "bad.toml"
    for text, expected in (('demo = "toy"\nshared_init = "yes"\n[grid]\nlr = [1]\n', "shared_init must be true"),
                           ('demo = "toy"\nshared = true\n[grid]\nlr = [1]\n', "unknown keys shared"),
                           ('demo = "toy"\nshared_init = true\n[flags]\ninit_from = "x"\n[grid]\nlr = [1]\n',
                            "may not set --init-from")):
        path.write_text(text)
        assert main(["sweep", "--spec", str(path), "--artifacts-dir", str(tmp_path / "a")]) == 2
        assert expected in one_error_line(capsys)
    assert not (tmp_path / "a").exists()
    for preset, bws in (("cpu", (256, 128, 64)), ("gpu", (1024, 512, 256))):
        sweep = load_spec(str(REPO / "experiments" / f"banded_fc_{preset}.toml"), None, [])
        assert sweep.shared_init and sweep.report["sections"] == ["mgr.banded_report:section"]
        assert [c.name for c in sweep.configs] == ["baseline", *(f"{k}-{b}" for k in ("fc1", "fc2", "both")
                                                                 for b in bws)]
        for c in sweep.configs:  # every flag of the spec is a nanochat flag
            _, config, args, budget = parse_demo_args("nanochat", sweep.argv(c))
            assert (config.fc1_bandwidth, config.fc2_bandwidth) == (c.flags["fc1-bandwidth"],
                                                                    c.flags["fc2-bandwidth"])
        _, config, args, _ = parse_demo_args("nanochat", sweep.init_argv())
        assert config.init_only and (args.device == "cpu") == (preset == "cpu")
