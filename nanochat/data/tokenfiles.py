"""Pre-tokenised .bin token files: nanoGPT's header-less uint16 arrays and llm.c's files (a header of 256 int32:
magic 20240520, version 1, token count; then uint16 tokens). llm.c files are recognised by the magic.

These hold ids of some outside tokenizer with no document boundaries we could trust, so rows are plain consecutive
windows of seq_len+1 tokens (no BOS alignment) and per-token byte lengths are unknown (no bits per byte).
Split: if any file name contains "val", those files are the val split and the rest train (nanoGPT's train.bin /
val.bin, llm.c's *_val_*.bin); otherwise the last VAL_FRACTION of every file's tokens is val.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mgr.errors import UserError
from nanochat.data.split import SPLITS, VAL_FRACTION

LLMC_MAGIC = 20240520
LLMC_VERSION = 1
LLMC_HEADER_BYTES = 256 * 4
ROWS_PER_UNIT = 1024


def read_token_file(path: Path) -> np.ndarray:
    """The uint16 tokens of a nanoGPT or llm.c .bin file, memory-mapped."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(LLMC_HEADER_BYTES)
    except OSError as e:
        raise UserError(f"cannot read token file {path}: {e.strerror or e}") from None
    if len(head) >= 4 and int(np.frombuffer(head[:4], "<i4")[0]) == LLMC_MAGIC:
        if len(head) < LLMC_HEADER_BYTES:
            raise UserError(f"{path}: truncated llm.c header ({size} bytes)")
        _, version, count = (int(v) for v in np.frombuffer(head, "<i4")[:3])
        if version != LLMC_VERSION:
            raise UserError(f"{path}: llm.c token file version {version} is not supported "
                            f"(only {LLMC_VERSION}: uint16 tokens)")
        if count < 0 or size != LLMC_HEADER_BYTES + 2 * count:
            raise UserError(f"{path}: llm.c header says {count} tokens but the file holds "
                            f"{(size - LLMC_HEADER_BYTES) / 2:g} after the header")
        offset = LLMC_HEADER_BYTES
    else:
        if size % 2:
            raise UserError(f"{path}: {size} bytes is not a whole number of uint16 tokens (nor an llm.c file)")
        count, offset = size // 2, 0
    if count == 0:
        return np.zeros(0, np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=offset, shape=(count,))


class BinSource:
    entropy_rate = None

    def __init__(self, files: list[Path], row_len: int, rows_per_unit: int = ROWS_PER_UNIT):
        self.files = files
        self.row_len = row_len
        self._tokens = [read_token_file(f) for f in files]
        n_tokens = sum(len(t) for t in self._tokens)
        if n_tokens == 0:
            raise UserError(f"empty corpus: no tokens in {len(files)} .bin file(s) ({files[0]}...)")
        self.max_token = max(int(t.max()) for t in self._tokens if len(t))
        named_val = ["val" in f.name.lower() for f in files]
        regions: dict[str, list[tuple[int, int, int]]] = {s: [] for s in SPLITS}  # (file, first token, end token)
        for i, tokens in enumerate(self._tokens):
            if any(named_val):
                regions["val" if named_val[i] else "train"].append((i, 0, len(tokens)))
            else:
                cut = len(tokens) - round(len(tokens) * VAL_FRACTION)
                regions["train"].append((i, 0, cut))
                regions["val"].append((i, cut, len(tokens)))
        # a unit is up to rows_per_unit consecutive rows of one region: (file, first token, n_rows)
        self._units = {split: [(i, start + r * row_len, min(rows_per_unit, (end - start) // row_len - r))
                               for i, start, end in regions[split]
                               for r in range(0, (end - start) // row_len, rows_per_unit)]
                       for split in SPLITS}
        self._region_tokens = {s: sum(end - start for _, start, end in regions[s]) for s in SPLITS}

    def num_units(self, split: str) -> int:
        return len(self._units[split])

    def rows(self, split: str, unit: int) -> np.ndarray:
        i, start, n_rows = self._units[split][unit]
        return np.asarray(self._tokens[i][start:start + n_rows * self.row_len], np.int32).reshape(n_rows, self.row_len)

    def size(self, split: str) -> str:
        return f"{self._region_tokens[split]} tokens"

    def describe(self) -> str:
        return f"{len(self.files)} .bin token file(s) ({self.files[0]}...)"
