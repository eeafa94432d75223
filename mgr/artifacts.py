"""The run directory: artifacts/<kind>/<topic>/<run_id>/{summary.json, run.md, metrics.jsonl, config.json, plots/}.

Every file but the streamed metrics is written atomically (temp file + rename), and a run directory that already
exists is never reused, so a crash or a second run can never leave a half-written or mixed-up record.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mgr.errors import UserError
from mgr.results import to_jsonable

SCHEMA_VERSION = "mgr.telemetry.v1"


def default_run_id() -> str:
    """YYYYMMDD_HHMMSS_mmm: sortable, and two runs started in the same second still get different directories."""
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d_%H%M%S_") + f"{now.microsecond // 1000:03d}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file + rename. The file gets the user's umask like any other (mkstemp alone makes it 0600, which
    would keep a colleague from reading the run)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Make the directory of an output file the user named, or say in one line why it cannot be written there."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # FileExistsError / NotADirectoryError when a parent is a file
        raise UserError(f"{flag} {path}: cannot create its directory {path.parent} "
                        f"({e.strerror or e.__class__.__name__})") from None
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"{flag} {path}: directory {path.parent} is not writable")
    return path


def check_topic(topic: str) -> list[str]:
    """A topic is one or more /-separated directory names (fixed_flops/nanochat); never absolute, empty or `..`."""
    parts = topic.split("/") if topic else [""]
    if topic.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UserError(f"invalid topic {topic!r} for the run directory: use /-separated names, no empty, "
                        "'.' or '..' segments, not an absolute path")
    return parts


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e.__class__.__name__})") from None


def read_summary(path: str | os.PathLike) -> dict:
    """A run's summary from its directory or its summary.json; one line for anything that is not one."""
    path = Path(path)
    file = path / "summary.json" if path.is_dir() or not path.exists() else path
    if path.is_file() and path.name != "summary.json":
        raise UserError(f"{path} is a file, not a run directory (or its summary.json)")
    summary = read_json(file)
    problem = _summary_problem(summary)
    if problem:
        raise UserError(f"{file} is not a run summary: {problem}")
    return summary


def _summary_problem(summary: Any) -> str | None:
    if not isinstance(summary, dict):
        return f"expected a JSON object, got {type(summary).__name__}"
    if summary.get("schema_version") != SCHEMA_VERSION:
        return f"schema_version {summary.get('schema_version')!r}, expected {SCHEMA_VERSION!r}"
    if not isinstance(summary.get("results"), dict):
        return f"'results' should be an object, got {type(summary.get('results')).__name__}"
    for key, kind in (("status", str), ("error", str), ("meta", dict), ("budget", dict), ("run_dir", str)):
        if summary.get(key) is not None and not isinstance(summary[key], kind):
            return f"{key!r} should be a {kind.__name__}, got {type(summary[key]).__name__}"
    tables = summary["results"].get("tables", [])
    if not isinstance(tables, list) or not all(
            isinstance(t, dict) and isinstance(t.get("columns"), list) and isinstance(t.get("rows"), list)
            and all(isinstance(r, list) for r in t["rows"]) for t in tables):
        return "results.tables should be a list of {title, columns, rows} tables"
    if not isinstance(summary["results"].get("train", {}), dict):
        return "results.train should be an object"
    return None


class RunWriter:
    """Owns one run directory; creating it fails if it exists."""

    def __init__(self, root: str | os.PathLike, kind: str, topic: str, run_id: str):
        for label, part in (("kind", kind), ("run id", run_id)):
            if not part or "/" in part or part in (".", ".."):
                raise UserError(f"invalid {label} {part!r} for the run directory")
        self.run_dir = Path(root) / kind / Path(*check_topic(topic)) / run_id
        try:
            self.run_dir.parent.mkdir(parents=True, exist_ok=True)
            self.run_dir.mkdir()
        except FileExistsError:
            raise UserError(f"run directory {self.run_dir} already exists; pass another --run-id") from None
        except OSError as e:
            raise UserError(f"cannot create run directory {self.run_dir}: {e.strerror}") from None
        self.plots_dir = self.run_dir / "plots"
        self.plots_dir.mkdir()
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        try:
            self._metrics.write(json.dumps(to_jsonable(record), allow_nan=False) + "\n")
        except OSError as e:  # a full disk: the run fails in one line and still tries to write its summary
            raise UserError(f"cannot write {self.run_dir / 'metrics.jsonl'}: {e.strerror or e}") from None

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.run_dir / name, obj)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.run_dir / name, text)

    def plot_path(self, name: str) -> Path:
        return self.plots_dir / name

    def close(self) -> None:
        self._metrics.close()
