"""Fetching nanochat's parquet shards (shard_00000.parquet, ...) over HTTP with retries and atomic writes."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

from mgr.errors import UserError

DEFAULT_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
DEFAULT_DATA_DIR = "~/.cache/nanochat/base_data"
OFFLINE_HINT = "pass --data FILE (a local text, parquet or .bin file) instead of downloading shards"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def first_line(e: BaseException) -> str:
    """A library's error message, cut to one line for a UserError."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def parquet_problem(path: Path) -> str | None:
    """Why `path` is not a usable text shard (None when it is): it must open with pyarrow and have a `text` column."""
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...) for unreadable files
        return f"not a readable parquet file ({first_line(e)})"
    if "text" not in names:
        return f"no 'text' column (columns: {', '.join(names) or 'none'})"
    return None


class _Transient(Exception):
    """A failure worth retrying: 5xx/408/429, a dropped connection, a timeout, a truncated body."""


def _fetch(url: str, dest: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
            expected = response.headers.get("Content-Length")
            if expected is not None and f.tell() != int(expected):
                raise _Transient(f"truncated body ({f.tell()} of {expected} bytes)")
    except urllib.error.HTTPError as e:
        if e.code in (408, 429) or e.code >= 500:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise UserError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.gaierror, ConnectionRefusedError)):  # offline or no server: retrying won't help
            raise UserError(f"cannot reach {url} ({e.reason}); offline? {OFFLINE_HINT}") from None
        raise _Transient(str(e.reason) or type(e).__name__) from None
    except (http.client.HTTPException, OSError) as e:  # OSError covers timeouts and resets
        raise _Transient(str(e) or type(e).__name__) from None


def _download_one(url: str, final: Path, retries: int, backoff: float, timeout: float) -> bool:
    """Returns True when it downloaded, False when a valid file was already there."""
    if final.exists() and parquet_problem(final) is None:
        return False
    # a unique temporary name in the same directory: concurrent downloaders never see a half-written shard
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=final.name + ".", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    last_error: Exception | None = None
    try:
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                _fetch(url, tmp, timeout)
                break
            except _Transient as e:
                last_error = e
        else:
            raise UserError(f"could not download {url} after {retries + 1} attempts: {last_error}; {OFFLINE_HINT}")
        problem = parquet_problem(tmp)
        if problem is not None:
            raise UserError(f"downloaded shard {final.name} from {url} is corrupt: {problem}")
        os.replace(tmp, final)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def download_shards(base_url: str, dest_dir: str | os.PathLike, n: int, *, retries: int = 5, backoff: float = 1.0,
                    timeout: float = 60.0, workers: int = 4,
                    log: Callable[[str], None] | None = None) -> list[Path]:
    """Make sure shard_00000 .. shard_{n-1} exist and are valid parquet text shards in dest_dir.

    A shard is fetched from `<base_url>/<name>` unless a valid copy is already present (an invalid one is replaced).
    Transient failures are retried `retries` times, sleeping backoff * 2**k seconds before retry k+1. A missing shard
    (HTTP 4xx), a shard that keeps failing or one that is not valid parquet raises UserError; nothing partial is left.
    """
    if n < 0 or retries < 0 or backoff < 0 or timeout <= 0 or workers < 1:
        raise UserError(f"bad download settings: n={n} retries={retries} backoff={backoff} timeout={timeout} "
                        f"workers={workers}")
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    base = base_url.rstrip("/")

    def one(index: int) -> Path:
        final = dest / shard_name(index)
        if _download_one(f"{base}/{final.name}", final, retries, backoff, timeout) and log is not None:
            log(f"downloaded {final} ({final.stat().st_size / 1e6:.1f} MB)")
        return final

    with ThreadPoolExecutor(max_workers=min(workers, max(n, 1))) as pool:
        return list(pool.map(one, range(n)))


def ensure_shards(data_dir: str | os.PathLike, n: int, *, base_url: str, download: bool,
                  log: Callable[[str], None] | None = None) -> list[Path]:
    """The parquet files of data_dir, at least n of them, downloading shard_00000.. when allowed."""
    directory = Path(data_dir).expanduser()
    present = sorted(directory.glob("*.parquet")) if directory.is_dir() else []
    if len(present) >= n:
        return present
    if not download:
        raise UserError(f"{directory} holds {len(present)} parquet shards but {n} are needed; "
                        f"pass --auto-download-data to fetch them from {base_url}")
    download_shards(base_url, directory, n, log=log)
    return sorted(directory.glob("*.parquet"))
