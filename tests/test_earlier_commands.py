"""The earlier fixed-FLOPs harness's nanochat command line runs verbatim: offline it fails in one line before any
run directory exists; with the shards served (a loopback server) it trains into the nested topic directory."""

import socket

import pytest

from nanochat.data import shard_name
from nanochat.train import main
from tests.conftest import one_error_line, read_json
from tests.test_nanochat_download import parquet_bytes, server  # noqa: F401 (server: the loopback fixture)

EARLIER = ("--device cpu --auto-download-data --min-parquet-files 2 --attention-type standard --optimizer-type adamw "
           "--batch-size 8 --sequence-len 256 --target-flops 1e11 --warmup-steps 2 --artifacts-dir artifacts "
           "--artifacts-kind bench --artifacts-topic fixed_flops/nanochat --run-id 20251218_flops_smoke").split()
RUN_DIR = "artifacts/bench/fixed_flops/nanochat/20251218_flops_smoke"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/data"


def test_offline_the_download_fails_in_one_line_before_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = closed_port_url()
    assert main([*EARLIER, "--data-url", url, "--data-dir", str(tmp_path / "shards")]) == 2
    line = one_error_line(capsys)
    assert f"{url}/{shard_name(0)}" in line and "--data" in line
    assert not (tmp_path / "artifacts").exists()


def serve_shards(server):
    for i in range(2):  # enough documents that the ~10% val split fills a batch of 8 rows of 257 tokens
        server.files[shard_name(i)] = parquet_bytes([f"shard {i} document {j}: " + "the quick brown fox " * 20
                                                     for j in range(150)])


def check_trained(tmp_path):
    s = read_json(tmp_path / RUN_DIR / "summary.json")
    assert s["status"] == "completed" and s["meta"]["topic"] == "fixed_flops/nanochat"
    assert s["budget"]["stopped_by"] == "target_flops" and s["budget"]["warmup_steps"] == 2
    assert s["results"]["val_bpb"] is not None
    assert (tmp_path / RUN_DIR / "checkpoints").is_dir()  # saved at the end by default
    return s


@pytest.mark.slow
def test_with_the_shards_served_it_trains_into_the_nested_topic(tmp_path, monkeypatch, server):
    """The command with smaller sizes appended (later flags win), so the default suite stays fast."""
    monkeypatch.chdir(tmp_path)
    serve_shards(server)
    assert main([*EARLIER, "--data-url", server.url, "--data-dir", str(tmp_path / "shards"), "--depth", "1",
                 "--sequence-len", "32", "--target-flops", "5e8", "--eval-tokens", "256", "--sample-tokens", "4"]) == 0
    assert check_trained(tmp_path)["budget"]["steps"] >= 3


@pytest.mark.slow
def test_the_verbatim_command_trains(tmp_path, monkeypatch, server):
    monkeypatch.chdir(tmp_path)
    serve_shards(server)
    assert main([*EARLIER, "--data-url", server.url, "--data-dir", str(tmp_path / "shards")]) == 0
    check_trained(tmp_path)
