"""BOS-aligned best-fit packing of documents into rows: nanochat's bos_bestfit loader, applied to one unit at a time."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def pack_rows(docs: Sequence[np.ndarray], row_len: int) -> np.ndarray:
    """Pack token documents (each starting with BOS) into int32 rows of exactly row_len tokens, no padding.

    Each row is filled by repeatedly placing the longest remaining document that fits in the space left; when none
    fits, the shortest remaining document is cropped to fill the row exactly and the rest of it is dropped. So every
    row starts at a document start, and only crops lose tokens. Tokens too few to fill a last row are dropped too.
    Deterministic: ties go to the later document.
    """
    by_length = sorted((len(d), i) for i, d in enumerate(docs) if len(d))
    lengths = [n for n, _ in by_length]
    tokens_left = sum(lengths)
    rows = []
    while tokens_left >= row_len:
        row = np.empty(row_len, np.int32)
        pos = 0
        while pos < row_len:
            space = row_len - pos
            j = max(bisect.bisect_right(lengths, space) - 1, 0)  # longest that fits, else the shortest (cropped)
            n, i = by_length.pop(j)
            lengths.pop(j)
            tokens_left -= n
            take = min(n, space)
            row[pos:pos + take] = docs[i][:take]
            pos += take
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, row_len), np.int32)
