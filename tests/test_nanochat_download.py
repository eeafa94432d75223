import io
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mgr.errors import UserError
from nanochat.data import DataSpec, download_shards, make_data, shard_name
from nanochat.tokenizer import ByteTokenizer


def parquet_bytes(texts, column="text") -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({column: texts}), buffer, row_group_size=4)
    return buffer.getvalue()


class Server:
    """Serves `files` by name; `failures[name]` lists how the first requests for it misbehave (500 or truncate)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.failures: dict[str, list[str]] = {}
        self.requests: Counter = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests[name] += 1
                failure = server.failures.get(name, []).pop(0) if server.failures.get(name) else None
                body = server.files.get(name)
                if failure == "500" or body is None:
                    self.send_error(500 if failure == "500" else 404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if failure == "truncate" else body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def add_shards(self, n):
        for i in range(n):
            self.files[shard_name(i)] = parquet_bytes([f"shard {i} document {j} " * 3 for j in range(12)])


@pytest.fixture
def server(monkeypatch):
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".parquet"))


def test_downloads_verifies_and_skips_present_shards(server, tmp_path):
    server.add_shards(3)
    paths = download_shards(server.url, tmp_path / "shards", 3, backoff=0.001)
    assert [p.name for p in paths] == [shard_name(i) for i in range(3)]
    assert all(p.read_bytes() == server.files[p.name] for p in paths)
    assert pq.read_table(paths[2]).column("text")[0].as_py().startswith("shard 2 document 0")
    download_shards(server.url + "/", tmp_path / "shards", 3, backoff=0.001)
    assert sum(server.requests.values()) == 3  # second call found all of them valid
    assert leftovers(tmp_path / "shards") == []


def test_a_500_and_a_truncated_body_are_retried(server, tmp_path):
    server.add_shards(2)
    server.failures = {shard_name(0): ["500"], shard_name(1): ["truncate", "500"]}
    download_shards(server.url, tmp_path, 2, retries=5, backoff=0.001)
    assert server.requests == {shard_name(0): 2, shard_name(1): 3}
    assert pq.read_table(tmp_path / shard_name(1)).num_rows == 12


def test_persistent_failure_gives_up_after_the_retries(server, tmp_path):
    server.add_shards(1)
    server.failures = {shard_name(0): ["500"] * 10}
    with pytest.raises(UserError, match=r"shard_00000.parquet after 3 attempts: HTTP 500") as info:
        download_shards(server.url, tmp_path, 1, retries=2, backoff=0.001)
    assert server.requests[shard_name(0)] == 3
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_shard_is_a_user_error_without_retries(server, tmp_path):
    server.add_shards(2)
    with pytest.raises(UserError, match=r"could not download .*shard_00002.parquet: HTTP 404") as info:
        download_shards(server.url, tmp_path, 3, backoff=0.001, workers=1)
    assert "\n" not in str(info.value)
    assert server.requests[shard_name(2)] == 1
    assert leftovers(tmp_path) == [] and not (tmp_path / shard_name(2)).exists()


@pytest.mark.parametrize("body, message", [
    (b"PAR1 garbage that is not parquet", "not a readable parquet file"),
    (parquet_bytes(["x"], column="content"), "no 'text' column"),
], ids=["garbage", "no-text-column"])
def test_a_corrupt_shard_is_a_user_error_and_is_not_kept(server, tmp_path, body, message):
    server.files[shard_name(0)] = body
    with pytest.raises(UserError, match=f"shard_00000.parquet .* is corrupt: {message}") as info:
        download_shards(server.url, tmp_path, 1, backoff=0.001)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_an_invalid_local_shard_is_downloaded_again(server, tmp_path):
    server.add_shards(1)
    (tmp_path / shard_name(0)).write_bytes(b"half a file")
    download_shards(server.url, tmp_path, 1, backoff=0.001)
    assert (tmp_path / shard_name(0)).read_bytes() == server.files[shard_name(0)]


def test_data_flags_download_into_the_data_dir(server, tmp_path):
    server.add_shards(2)
    spec = DataSpec(auto_download=True, min_parquet_files=2, data_url=server.url, data_dir=str(tmp_path / "base"))
    loader = make_data(spec, ByteTokenizer(), seq_len=32, batch_size=2, seed=0, split="train")
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == [shard_name(0), shard_name(1)]
    assert loader.source.n_rows == 24
    assert loader.next_batch()["inputs_BT"].shape == (2, 32)
    # present shards are enough without --auto-download-data; asking for more is not
    make_data(DataSpec(min_parquet_files=2, data_dir=str(tmp_path / "base")), ByteTokenizer(), seq_len=32,
              batch_size=2, seed=0, split="train")
    with pytest.raises(UserError, match="holds 2 parquet shards but 3 are needed"):
        make_data(DataSpec(min_parquet_files=3, data_dir=str(tmp_path / "base")), ByteTokenizer(), seq_len=32,
                  batch_size=2, seed=0, split="train")
