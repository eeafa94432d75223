"""Document sources. Each one serves a split as a sequence of "units" (a batch of documents read together: a chunk of
text documents, a parquet row group, a freshly sampled batch of synthetic documents), addressable by index so that a
loader position is a few ints. Sources of text implement texts(split, unit); BinSource (tokenfiles.py) serves rows.

Text files: every file is split on blank lines; each non-empty paragraph is a document (a file without blank lines is
one document). All text is read into memory at open: use parquet for big corpora, which is streamed a row group at a
time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mgr.errors import UserError
from nanochat.data.download import first_line, parquet_problem
from nanochat.data.spec import DataSpec, resolve_data
from nanochat.data.split import SPLITS, in_split, split_fraction
from nanochat.data.synthetic import SyntheticConfig, SyntheticLanguage
from nanochat.data.tokenfiles import BinSource

DOCS_PER_UNIT = 1024
_VAL_STREAM = 2**63 + 1  # any fixed seed works: the content split keeps val documents out of train
_BLANK_LINES = re.compile(r"\n\s*\n")


def split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _BLANK_LINES.split(text) if p.strip()]


class TextSource:
    entropy_rate = None

    def __init__(self, files: list[Path], docs_per_unit: int = DOCS_PER_UNIT):
        self.files = files
        self.docs_per_unit = docs_per_unit
        docs = []
        for f in files:
            try:
                docs += split_paragraphs(f.read_text(encoding="utf-8", errors="replace"))
            except OSError as e:
                raise UserError(f"cannot read text file {f}: {e.strerror or e}") from None
        if not docs:
            raise UserError(f"empty corpus: no text in {len(files)} file(s) ({files[0]}...)")
        self.docs = {split: [d for d in docs if in_split(d, split)] for split in SPLITS}

    def num_units(self, split: str) -> int:
        return math.ceil(len(self.docs[split]) / self.docs_per_unit)

    def texts(self, split: str, unit: int) -> list[str]:
        return self.docs[split][unit * self.docs_per_unit:(unit + 1) * self.docs_per_unit]

    def size(self, split: str) -> str:
        return f"{len(self.docs[split])} documents"

    def describe(self) -> str:
        return f"{len(self.files)} text file(s) ({self.files[0]}...), {sum(map(len, self.docs.values()))} documents"


class ParquetSource:
    """Parquet shards with a `text` column; a unit is one row group (both splits walk all row groups, each keeping
    its own documents)."""

    entropy_rate = None

    def __init__(self, files: list[Path]):
        self.files = files
        self._row_groups: list[tuple[Path, int]] = []
        n_rows = 0
        for f in files:
            problem = parquet_problem(f)
            if problem is not None:
                raise UserError(f"cannot use parquet file {f}: {problem}")
            metadata = pq.ParquetFile(f).metadata
            self._row_groups += [(f, g) for g in range(metadata.num_row_groups)]
            n_rows += metadata.num_rows
        if n_rows == 0:
            raise UserError(f"empty corpus: no rows in {len(files)} parquet file(s) ({files[0]}...)")
        self.n_rows = n_rows

    def num_units(self, split: str) -> int:
        return len(self._row_groups)

    def texts(self, split: str, unit: int) -> list[str]:
        path, group = self._row_groups[unit]
        try:
            column = pq.ParquetFile(path).read_row_group(group, columns=["text"]).column("text")
        except Exception as e:  # pyarrow raises several types for a damaged row group
            raise UserError(f"cannot read row group {group} of {path}: {first_line(e)}") from None
        return [t for t in column.to_pylist() if t and in_split(t, split)]

    def size(self, split: str) -> str:
        return f"about {round(self.n_rows * split_fraction(split))} of {self.n_rows} documents"

    def describe(self) -> str:
        return f"{len(self.files)} parquet file(s) ({self.files[0]}...), {self.n_rows} rows"


class SyntheticSource:
    """Endless documents of the synthetic language. Unit k of a split is sampled from a stream fixed by the language
    seed, k and (train only) the training seed, then filtered by the same content split as real data."""

    def __init__(self, config: SyntheticConfig, *, seed: int, row_len: int):
        self.language = SyntheticLanguage(config)
        self.entropy_rate = self.language.entropy_rate()
        self.seed = seed
        # enough documents per unit for best-fit to choose from and for a few dozen rows, so crops stay rare
        self.docs_per_unit = max(256, math.ceil(32 * row_len / self.language.mean_doc_bytes()))

    def num_units(self, split: str) -> None:
        return None

    def texts(self, split: str, unit: int) -> list[str]:
        # val ignores the training seed so that every run is evaluated on the same documents
        stream = [self.language.config.seed, self.seed if split == "train" else _VAL_STREAM, unit]
        n_docs = math.ceil(self.docs_per_unit / split_fraction(split))
        return [d for d in self.language.documents(np.random.default_rng(stream), n_docs) if in_split(d, split)]

    def size(self, split: str) -> str:
        return f"units of about {self.docs_per_unit} sampled documents"

    def describe(self) -> str:
        c, rate = self.language.config, self.entropy_rate
        return (f"synthetic language (seed {c.seed}, {c.n_words} words, {c.n_successors} successors; "
                f"entropy {rate.bits_per_token:.4f} bits/word, {rate.bits_per_byte:.4f} bits/byte)")


Source = TextSource | ParquetSource | SyntheticSource | BinSource


def build_source(kind: str, target: SyntheticConfig | list[Path], *, seed: int, row_len: int) -> Source:
    if kind == "synthetic":
        return SyntheticSource(target, seed=seed, row_len=row_len)
    if kind == "bin":
        return BinSource(target, row_len)
    return TextSource(target) if kind == "text" else ParquetSource(target)


def open_source(spec: DataSpec, *, seed: int, row_len: int, log: Callable[[str], None] | None = None) -> Source:
    return build_source(*resolve_data(spec, log), seed=seed, row_len=row_len)


def iter_texts(source: TextSource | ParquetSource | SyntheticSource, split: str) -> Iterator[str]:
    """All documents of a split in unit order (endless for the synthetic language)."""
    n_units = source.num_units(split)
    unit = 0
    while n_units is None or unit < n_units:
        yield from source.texts(split, unit)
        unit += 1
