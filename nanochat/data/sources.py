"""Document sources. Each one serves a split as a sequence of "units" (a batch of documents read together: a chunk of
text documents, a parquet row group, a freshly sampled batch of synthetic documents), addressable by index so that a
loader position is a few ints. Sources of text implement texts(split, unit); BinSource (tokenfiles.py) serves rows.

Text files: every file is split on blank lines; each non-empty paragraph is a document. A file without blank lines
(one long document would leave the content-hashed val split empty) is cut at line ends into documents of about
DOC_CHARS characters, and the source says so in `notes`, as it does for bytes that are not UTF-8 (replaced by U+FFFD;
a file that is mostly such bytes is refused as binary). All text is read into memory at open: use parquet for big
corpora, which is streamed a row group at a time.
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
DOC_CHARS = 2048  # documents cut from a text file without blank lines
BINARY_FRACTION = 0.1  # undecodable share above which a "text" file is taken for binary
_VAL_STREAM = 2**63 + 1  # any fixed seed works: the content split keeps val documents out of train
_BLANK_LINES = re.compile(r"\n\s*\n")


def split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _BLANK_LINES.split(text) if p.strip()]


def split_lines(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Consecutive lines joined into documents of at most max_chars (a longer line is cut into pieces)."""
    docs, current = [], ""
    for line in text.splitlines():
        while len(line) > max_chars:
            docs.append(line[:max_chars])
            line = line[max_chars:]
        if current and len(current) + 1 + len(line) > max_chars:
            docs.append(current)
            current = ""
        current = f"{current}\n{line}" if current else line
    docs.append(current)
    return [d.strip() for d in docs if d.strip()]


def read_text(path: Path, notes: list[str]) -> str:
    """The file as text; undecodable bytes become U+FFFD and are counted in `notes`; binary files are refused."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read text file {path}: {e.strerror or e}") from None
    binary = f"{path} does not look like text ({{}}); token files need the .bin extension or --data-format bin"
    if b"\0" in data:
        raise UserError(binary.format(f"it holds {data.count(0)} NUL bytes"))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if bad > BINARY_FRACTION * max(len(text), 1):
        raise UserError(binary.format(f"{bad} of its {len(data)} bytes are not UTF-8"))
    notes.append(f"{path}: replaced {bad} byte sequence(s) that are not UTF-8 by U+FFFD")
    return text


class TextSource:
    entropy_rate = None

    def __init__(self, files: list[Path], docs_per_unit: int = DOCS_PER_UNIT):
        self.files = files
        self.docs_per_unit = docs_per_unit
        self.notes: list[str] = []
        docs = []
        for f in files:
            text = read_text(f, self.notes)
            paragraphs = split_paragraphs(text)
            if len(paragraphs) == 1 and len(paragraphs[0]) > DOC_CHARS:
                paragraphs = split_lines(paragraphs[0])
                self.notes.append(f"{f} has no blank lines: cut at line ends into {len(paragraphs)} documents of "
                                  f"up to {DOC_CHARS} characters (one document would leave no val split)")
            docs += paragraphs
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
