"""What the data flags mean: --data, --data-format, --auto-download-data, --min-parquet-files, --data-url, --data-dir.

--data unset            the synthetic language (or, with --auto-download-data / --min-parquet-files N, the parquet
                        shards of --data-dir, at least N of them, downloaded from --data-url when allowed)
--data synthetic[:k=v]  the synthetic language with options, e.g. synthetic:n_words=32,seed=1
--data FILE|DIR|GLOB    files; a directory means its *.parquet, else *.bin, else *.txt files. With --data-format
                        auto the format comes from the extension: .parquet, .bin, anything else is text.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mgr.errors import UserError
from nanochat.data.download import DEFAULT_BASE_URL, DEFAULT_DATA_DIR, ensure_shards
from nanochat.data.synthetic import SyntheticConfig

FORMATS = ("auto", "text", "parquet", "bin")
_SUFFIX_FORMATS = {".parquet": "parquet", ".bin": "bin"}
_DIR_PATTERNS = {"parquet": "*.parquet", "bin": "*.bin", "text": "*.txt"}


@dataclass(frozen=True)
class DataSpec:
    data: str | None = None
    data_format: str = "auto"
    auto_download: bool = False
    min_parquet_files: int = 0
    data_url: str = DEFAULT_BASE_URL
    data_dir: str = DEFAULT_DATA_DIR


def resolve_data(spec: DataSpec, log: Callable[[str], None] | None = None) -> tuple[str, SyntheticConfig | list[Path]]:
    """(kind, what to open): ("synthetic", config) or (format, sorted files)."""
    if spec.data_format not in FORMATS:
        raise UserError(f"--data-format must be one of {', '.join(FORMATS)}, got {spec.data_format!r}")
    if spec.min_parquet_files < 0:
        raise UserError(f"--min-parquet-files must be >= 0, got {spec.min_parquet_files}")
    wants_shards = spec.auto_download or spec.min_parquet_files > 0
    if spec.data is None:
        if not wants_shards:
            return "synthetic", SyntheticConfig()
        return "parquet", ensure_shards(spec.data_dir, max(spec.min_parquet_files, 1), base_url=spec.data_url,
                                        download=spec.auto_download, log=log)
    if wants_shards:
        raise UserError("--auto-download-data and --min-parquet-files use the shards in --data-dir; drop --data")
    if spec.data == "synthetic" or spec.data.startswith("synthetic:"):
        return "synthetic", SyntheticConfig.parse(spec.data)
    files = _expand(spec.data, spec.data_format)
    if spec.data_format != "auto":
        return spec.data_format, files
    formats = sorted({_SUFFIX_FORMATS.get(f.suffix.lower(), "text") for f in files})
    if len(formats) > 1:
        raise UserError(f"--data {spec.data!r} mixes formats ({', '.join(formats)}); narrow it or pass --data-format")
    return formats[0], files


def _expand(data: str, data_format: str) -> list[Path]:
    pattern = os.path.expanduser(data)
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not files:
            raise UserError(f"--data glob {data!r} matched no files")
        return files
    path = Path(pattern)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"data path not found: {data}")
    formats = (data_format,) if data_format != "auto" else ("parquet", "bin", "text")
    for fmt in formats:
        files = sorted(p for p in path.glob(_DIR_PATTERNS[fmt]) if p.is_file())
        if files:
            return files
    raise UserError(f"--data directory {path} holds no {' / '.join(_DIR_PATTERNS[f] for f in formats)} files")
