"""Train/val assignment. A document's split is a function of its text alone, so the two splits can never share a
document (duplicates land together) and the val set does not move with the training seed, the shard count or the
file order."""

from __future__ import annotations

import hashlib

VAL_FRACTION = 0.1
SPLITS = ("train", "val")


def split_fraction(split: str) -> float:
    return VAL_FRACTION if split == "val" else 1.0 - VAL_FRACTION


def in_split(text: str, split: str) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    is_val = int.from_bytes(digest, "little") < VAL_FRACTION * 2**64
    return is_val == (split == "val")
