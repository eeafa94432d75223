"""Data for nanochat: a synthetic language with a known entropy rate (the default), text files, parquet shards and
pre-tokenised .bin files, packed into BOS-aligned rows by a resumable loader. See spec.py for the --data flags."""

from nanochat.data.download import DEFAULT_BASE_URL, DEFAULT_DATA_DIR, download_shards, ensure_shards, shard_name
from nanochat.data.loader import Loader, make_data
from nanochat.data.packing import pack_rows
from nanochat.data.sources import iter_texts, open_source
from nanochat.data.spec import FORMATS, DataSpec, resolve_data
from nanochat.data.synthetic import EntropyRate, SyntheticConfig, SyntheticLanguage

__all__ = [
    "DEFAULT_BASE_URL", "DEFAULT_DATA_DIR", "FORMATS", "DataSpec", "EntropyRate", "Loader", "SyntheticConfig",
    "SyntheticLanguage", "download_shards", "ensure_shards", "iter_texts", "make_data", "open_source", "pack_rows",
    "resolve_data", "shard_name",
]
