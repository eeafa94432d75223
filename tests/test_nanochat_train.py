"""nanochat training end to end through `python -m nanochat.train` (== `mgr run nanochat`), on tiny CPU configs:
the FLOPs budget, the report's fields, measured vs analytic FLOPs, real data, exact resume, and bad input."""

import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.checkpoint import read_meta
from nanochat.train import main
from tests.conftest import one_error_line, read_json, read_metrics

# vocab 257 (bytes + <|bos|>), width 64, one head of 64, the classic recipe; the dense "xla" attention, whose FLOPs
# are the analytic full-T² count (auto's probed choice is tested on its own)
TINY = ["--depth", "1", "--sequence-len", "32", "--batch-size", "4", "--eval-tokens", "256", "--recipe", "classic",
        "--attention-type", "xla"]
B, T, V = 4, 32, 257
UNROLLED = ["--no-scan-layers"]


def train(root, run_id, *flags):
    """Run `python -m nanochat.train TINY flags` in-process; later flags override TINY's."""
    code = main([*TINY, *flags, "--artifacts-dir", str(root), "--run-id", run_id])
    return code, Path(root) / "nanochat" / "train" / run_id


def step_records(run_dir):
    """metrics.jsonl lines of training steps (evals and logged samples are other lines)."""
    return [r for r in read_metrics(run_dir) if r.get("variant") == "nanochat" and "loss" in r]


def analytic_flops_per_token(depth: int) -> float:
    """6·N + 12·L·D·T by hand: per layer q, k, v, proj (4·D²) and the 4x relu² MLP (8·D²), plus the head D·V."""
    n_matmul = depth * 12 * (64 * depth) ** 2 + 64 * depth * V
    return 6 * n_matmul + 12 * depth * 64 * depth * T


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(Path(directory).rglob("*"))
            if p.is_file()}


def write_corpus(path, n_docs=300):
    # ~300 paragraphs so the content-hash val split (~10%) still holds enough rows of 33 tokens.
    path.write_text("\n\n".join(f"document {i}: the quick brown fox jumps over {i % 7} lazy dogs, then rests."
                                for i in range(n_docs)))
    return path


@pytest.fixture(scope="module")
def flops_run(tmp_path_factory):
    """Synthetic default data, budget in FLOPs, an eval every 2 steps."""
    root = tmp_path_factory.mktemp("flops")
    code, run_dir = train(root, "f", "--target-flops", "3e8", "--eval-every", "2")
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """6 steps with checkpoints kept at steps 3 and 6; unrolled layers, so that path is priced too."""
    root = tmp_path_factory.mktemp("ckpt")
    code, run_dir = train(root, "full", *UNROLLED, "--max-iterations", "6", "--checkpoint-every", "3")
    assert code == 0
    return run_dir


def test_target_flops_run_reports_nanochat_fields(flops_run):
    summary = read_json(flops_run / "summary.json")
    r = summary["results"]
    assert summary["status"] == "completed" and summary["budget"]["stopped_by"] == "target_flops"
    flops_per_step = r["flops_per_step_measured"]
    assert flops_per_step == summary["budget"]["flops_per_step_est"] > 0
    steps = math.ceil(3e8 / flops_per_step)
    assert summary["budget"]["steps"] == r["train"]["nanochat"]["steps"] == steps
    assert summary["budget"]["spent_flops"] == pytest.approx(steps * flops_per_step)

    assert r["tokens_per_step"] == B * T and r["tokens_trained"] == steps * B * T
    assert r["flops_per_token_analytic"] == analytic_flops_per_token(1)
    assert r["matmul_flops_per_step_measured"] / (B * T) == pytest.approx(r["flops_per_token_analytic"], rel=1e-2)
    step_s = r["train"]["nanochat"]["step_ms"]["median_ms"] / 1e3
    assert r["tokens_per_second"] == pytest.approx(B * T / step_s, rel=1e-9)
    assert r["tflops_per_second_est"] == pytest.approx(flops_per_step / step_s / 1e12, rel=1e-9)
    assert "peak_memory_allocated_gb" in r and "mfu" in r
    if jax.default_backend() == "cpu":
        assert r["mfu"] is None and r["peak_memory_allocated_gb"] is None

    losses = [rec["loss"] for rec in step_records(flops_run)]
    assert len(losses) == steps and r["final_loss"] == losses[-1]
    expected_evals = sorted({*range(2, steps + 1, 2), steps})
    assert [e["step"] for e in r["val_bpb_series"]] == expected_evals
    assert all(0 < e["val_bpb"] < 9 and 0 < e["val_loss"] < 6 for e in r["val_bpb_series"])
    assert r["val_bpb"] == r["val_bpb_series"][-1]["val_bpb"]
    assert 0 < r["entropy_floor_bpb"] < r["val_bpb"]

    assert (flops_run / "plots" / "loss_vs_flops.png").stat().st_size > 0
    assert "plots/loss_vs_flops.png" in r["plots"]
    assert f"samples at step {steps}:" in (flops_run / "run.md").read_text()


@pytest.mark.parametrize("run", ["flops_run", "checkpointed_run"], ids=["scan_layers", "unrolled_layers"])
def test_measured_matmul_flops_match_analytic(request, run):
    r = read_json(request.getfixturevalue(run) / "summary.json")["results"]
    assert r["matmul_flops_per_step_measured"] == analytic_flops_per_token(1) * r["tokens_per_step"]


def test_grad_accum_scan_is_priced_per_micro_batch(tmp_path, flops_run):
    code, run_dir = train(tmp_path, "accum", "--max-iterations", "1", "--grad-accum", "2")
    assert code == 0
    r = read_json(run_dir / "summary.json")["results"]
    assert r["tokens_per_step"] == 2 * B * T
    assert r["matmul_flops_per_step_measured"] == analytic_flops_per_token(1) * r["tokens_per_step"]
    single = read_json(flops_run / "summary.json")["results"]
    # Twice the matmuls of one micro-batch step; the whole count nearly doubles too, only the once-per-step
    # optimizer update is not repeated. Priced without the trip count, the scan body would count once (ratio ~1).
    assert r["matmul_flops_per_step_measured"] == 2 * single["matmul_flops_per_step_measured"]
    assert r["flops_per_step_measured"] == pytest.approx(2 * single["flops_per_step_measured"], rel=0.03)


@pytest.mark.parametrize("kind", ["text", "parquet"])
def test_real_data_trains_and_reports_bits_per_byte(tmp_path, kind):
    corpus = write_corpus(tmp_path / "corpus.txt")
    if kind == "parquet":
        shards = tmp_path / "shards"
        shards.mkdir()
        docs = corpus.read_text().split("\n\n")
        pq.write_table(pa.table({"text": docs}), shards / "shard_00000.parquet", row_group_size=100)
        data = shards
    else:
        data = corpus
    code, run_dir = train(tmp_path, kind, "--max-iterations", "2", "--data", str(data))
    assert code == 0
    r = read_json(run_dir / "summary.json")["results"]
    assert r["tokens_trained"] == 2 * B * T and r["entropy_floor_bpb"] is None
    assert np.isfinite(r["val_bpb"]) and r["val_bpb_series"][-1]["step"] == 2
    # ASCII under the byte tokenizer: one byte per counted token, so bits/byte is the loss in bits up to the
    # <|bos|> targets (no bytes, excluded from bpb, ~1 target in 60).
    assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=0.05)


def test_resume_from_a_step_continues_exactly(tmp_path, checkpointed_run):
    before = snapshot(checkpointed_run)
    code, resumed = train(tmp_path, "resumed", *UNROLLED, "--max-iterations", "6",
                          "--resume", str(checkpointed_run / "checkpoints" / "3"))
    assert code == 0
    full_lines = step_records(checkpointed_run)
    resumed_lines = step_records(resumed)
    assert [rec["step"] for rec in full_lines] == list(range(6))
    assert [rec["step"] for rec in resumed_lines] == [3, 4, 5]
    # Same planned total (6) => same LR schedule, including the warm-down that starts at step 4.8.
    assert [rec["lr_mult"] for rec in resumed_lines] == [rec["lr_mult"] for rec in full_lines[3:]]
    assert full_lines[5]["lr_mult"] < full_lines[4]["lr_mult"] * 6 / 5  # warm-down bent the warm-up ramp
    for a, b in zip(resumed_lines, full_lines[3:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)

    full = read_json(checkpointed_run / "summary.json")
    summary = read_json(resumed / "summary.json")
    assert summary["results"]["final_loss"] == pytest.approx(full["results"]["final_loss"], rel=1e-5)
    assert summary["budget"]["steps"] == 6 and summary["budget"]["max_steps"] == full["budget"]["max_steps"] == 6
    assert summary["results"]["val_bpb"] == pytest.approx(full["results"]["val_bpb"], rel=1e-5)
    assert "samples at step 6:" in (resumed / "run.md").read_text()
    assert snapshot(checkpointed_run) == before  # resuming reads the source run, never writes to it


def test_resume_path_picks_newest_or_named_step(checkpointed_run):
    root, step, meta = read_meta(checkpointed_run)
    assert (root, step, meta["step"]) == (checkpointed_run / "checkpoints", 6, 6)
    assert read_meta(checkpointed_run / "checkpoints")[1] == 6
    _, step, meta = read_meta(checkpointed_run / "checkpoints" / "3")
    assert step == meta["step"] == 3 and meta["data"]["batches"] == 3


def _empty_corpus(tmp_path, _run):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    return ["--data", str(tmp_path / "empty.txt")]


def _garbage_checkpoint(tmp_path, _run):
    step_dir = tmp_path / "garbage" / "checkpoints" / "3"
    step_dir.mkdir(parents=True)
    (step_dir / "_CHECKPOINT_METADATA").write_text("not json {")
    (step_dir / "meta").write_text("garbage")
    return ["--resume", str(tmp_path / "garbage")]


def _corrupt_arrays(tmp_path, run):
    # Readable metadata, damaged arrays: a copy of a real checkpoint whose array files are overwritten.
    copy = tmp_path / "corrupt"
    shutil.copytree(run, copy)
    for f in (copy / "checkpoints" / "6" / "arrays").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")
    return ["--resume", str(copy), "--max-iterations", "8"]


BAD_INPUT = {
    "missing_data": (lambda p, _: ["--data", str(p / "nope.txt")], "data path not found"),
    "empty_corpus": (_empty_corpus, "empty corpus"),
    "sequence_too_long": (lambda p, _: ["--data", str(write_corpus(p / "c.txt", n_docs=20)), "--sequence-len",
                                        "4096"], "cannot fill a single row"),
    "no_checkpoint": (lambda p, _: ["--resume", str(p)], "no checkpoint found"),
    "garbage_checkpoint": (_garbage_checkpoint, "unreadable checkpoint"),
    "corrupt_arrays": (_corrupt_arrays, "arrays in"),
    "other_model": (lambda _, run: ["--depth", "2", "--resume", str(run), "--max-iterations", "8"],
                    "differs from this run's in n_embd 64 vs 128; n_head 1 vs 2; n_kv_head 1 vs 2; n_layer 1 vs 2"),
    "past_budget": (lambda _, run: ["--resume", str(run)], "at step 6, already at or past --max-iterations 2"),
    "depth_0": (lambda p, _: ["--depth", "0"], "--depth must be >= 1"),
    "cudnn_on_cpu": (lambda p, _: ["--attention-type", "cudnn"], "needs a GPU"),
}
# Checked before the run starts: these leave no run directory. The others need the data or the arrays read.
UP_FRONT = {"missing_data", "no_checkpoint", "garbage_checkpoint", "other_model", "past_budget", "depth_0",
            "cudnn_on_cpu"}


def test_auto_attention_probes_and_records_its_choice(tmp_path):
    """--attention-type auto times every kernel available here at the model's shape (fwd+bwd), keeps the fastest
    within tolerance of the fp32 reference, and says so in summary.json; MFU fields exist (None without a peak)."""
    code, run_dir = train(tmp_path, "auto", "--attention-type", "auto", "--max-iterations", "2")
    assert code == 0
    r = read_json(run_dir / "summary.json")["results"]
    att = r["attention"]
    assert att["requested"] == "auto" and att["source"].startswith("in-process probe")
    assert att["shape"] == {"B": B, "T": T, "H": 1, "G": 1, "K": 64, "dtype": "float32", "window": None}
    probe = att["probe"]
    assert set(probe) == {"xla", "jax", "cudnn", "chunked", "pallas-triton", "pallas-mosaic"}
    ran = {n: p for n, p in probe.items() if "fwd_bwd_ms" in p}
    assert set(ran) == ({"xla", "jax", "chunked"} if jax.default_backend() == "cpu" else set(ran))
    assert all(p["rel_err"] <= att["tolerance"] for p in ran.values())
    assert att["chosen"] == min(ran, key=lambda n: ran[n]["fwd_bwd_ms"])
    if jax.default_backend() == "cpu":
        assert "needs a CUDA GPU" in probe["cudnn"]["unavailable"]
        assert r["mfu_analytic"] is None and r["peak_flops_per_s"] is None
    assert "attention kernel" in (run_dir / "run.md").read_text()
    # an explicit kernel is recorded as such
    code, run_dir = train(tmp_path, "chunked", "--attention-type", "chunked", "--max-iterations", "2")
    assert code == 0
    assert read_json(run_dir / "summary.json")["results"]["attention"] == {
        "requested": "chunked", "chosen": "chunked", "source": "explicit"}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_error_line(tmp_path, capsys, checkpointed_run, case):
    if case == "cudnn_on_cpu" and jax.default_backend() == "gpu":
        pytest.skip("cudnn attention is valid on a GPU")
    make_flags, expected = BAD_INPUT[case]
    flags = make_flags(tmp_path, checkpointed_run)
    source = snapshot(checkpointed_run)
    capsys.readouterr()
    code, run_dir = train(tmp_path / "runs", "bad", "--max-iterations", "2", *flags)
    assert code == 2
    assert expected in one_error_line(capsys)
    if case in UP_FRONT:
        assert not run_dir.exists()
    else:
        summary = read_json(run_dir / "summary.json")
        assert summary["status"] == "failed" and summary["budget"]["variants"] == {}
        assert not any((run_dir / "checkpoints").glob("[0-9]*"))
    assert snapshot(checkpointed_run) == source


@pytest.mark.parametrize("module, flags, expected", [
    ("nanochat_throughput", ["--depths", "2,2"], "--depths needs distinct depths >= 1, got 2,2"),
    ("nanochat_throughput", ["--depths", "0"], "--depths needs distinct depths >= 1, got 0"),
    ("nanochat_throughput", ["--steps", "0"], "--steps must be >= 1"),
    ("harness_overhead", ["--rounds", "0"], "--rounds must be >= 1"),
    ("harness_overhead", ["--warmup-steps", "-1"], "--warmup-steps: must be a whole number >= 0"),
])
def test_bench_bad_input_is_one_error_line(tmp_path, capsys, module, flags, expected):
    import importlib
    bench = importlib.import_module(f"bench.{module}")
    capsys.readouterr()
    assert bench.main([*flags, "--artifacts-dir", str(tmp_path)]) == 2
    assert expected in one_error_line(capsys)


def test_lr_scale_in_the_state_equals_a_scaled_learning_rate():
    """A traced lr_scale (what a vmapped LR sweep varies) is the same step as a config with that LR."""
    import dataclasses

    from flax import nnx

    from nanochat import train as nc
    from nanochat.tokenizer import load_tokenizer
    config = nc.Config(depth=1, sequence_len=16, batch_size=2, eval_tokens=32, weight_decay=0.1, recipe="classic")
    loader, _ = nc.build_data(config, 0, load_tokenizer("byte"))
    graphdef, params = nnx.split(nc.build_model(config, nc.model_config(config, loader.vocab_size), 0), nnx.Param)
    outs = []
    for cfg, scale in ((config, 2.0), (dataclasses.replace(config, lr=2 * config.lr), None)):
        tx = nc.make_optimizer(cfg, params)
        state = nc.init_state(params, tx) | ({"lr_scale": jax.numpy.float32(scale)} if scale else {})
        step = jax.jit(nc.make_train_step(graphdef, tx, cfg))
        for s in range(2):
            state, _ = step(state, loader(s))
        outs.append(state["params"])
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
