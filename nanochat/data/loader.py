"""Batches for training and eval: BOS-aligned packed rows, deterministic given the seed, resumable from a few ints.

Order: the train split visits its units (see sources.py) in a fresh permutation every epoch and shuffles the rows
packed from each unit; val walks units in order, unshuffled, so every eval sees the same rows. Leftovers: packing
(packing.py) crops documents to fill rows and drops the tokens at the end of a unit that cannot fill a whole row.

Use make_data(...) for one split, or open_source(...) once and build Loader(source, ...) per split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from mgr.errors import UserError
from nanochat.data.packing import pack_rows
from nanochat.data.sources import Source, open_source
from nanochat.data.spec import DataSpec
from nanochat.data.split import SPLITS
from nanochat.data.tokenfiles import BinSource

_STATE_KEYS = ("epoch", "unit", "row", "batches", "seq_len", "batch_size", "seed")


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    token_bytes: np.ndarray  # int32 [vocab_size]: UTF-8 bytes each token decodes to, 0 for special tokens

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...


class Loader:
    def __init__(self, source: Source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                 split: str, fill: slice | None = None):
        """``fill``: the rows of each batch this process copies out (one of several processes, mgr.mesh); the
        others stay zero, as only other processes' devices read them. Every process walks the same global order,
        so a batch does not depend on how many processes share it."""
        if split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        self.source, self.tokenizer, self.split = source, tokenizer, split
        self.seq_len, self.batch_size = seq_len, batch_size
        self.fill = slice(0, batch_size) if fill is None else fill
        self.row_len = seq_len + 1
        self.seed = seed % 2**64  # numpy seed sequences take non-negative ints only
        self._n_units = source.num_units(split)  # None: endless (synthetic)
        self._bin = isinstance(source, BinSource)
        if self._bin:
            if source.row_len != self.row_len:
                raise ValueError(f"BinSource was opened for rows of {source.row_len} tokens, not {self.row_len}")
            # outside token ids: the model needs room for all of them, and their byte lengths are unknown
            self.vocab_size = max(tokenizer.vocab_size, source.max_token + 1)
            self.token_bytes = None
        else:
            self.vocab_size = tokenizer.vocab_size
            self.token_bytes = np.asarray(tokenizer.token_bytes, np.int32)
        self.entropy_rate = source.entropy_rate  # the synthetic language's floor, else None
        self._order: tuple[int, np.ndarray] | None = None
        self._cached: tuple[tuple[int, int], np.ndarray] | None = None
        self.reset()
        self._check_fillable()

    def reset(self) -> None:
        self._epoch = self._unit = self._row = self.batches = 0
        self._last: dict[str, np.ndarray] | None = None

    def next_batch(self) -> dict[str, np.ndarray]:
        """{"inputs_BT", "targets_BT"} int32 [batch_size, seq_len]; val adds "target_bytes_BT" (UTF-8 bytes of each
        target, 0 for special tokens) unless the data is pre-tokenised."""
        rows = np.zeros((self.batch_size, self.row_len), np.int32)
        self._take_rows(rows)
        self.batches += 1
        batch = {"inputs_BT": np.ascontiguousarray(rows[:, :-1]), "targets_BT": np.ascontiguousarray(rows[:, 1:])}
        if self.split == "val" and self.token_bytes is not None:
            batch["target_bytes_BT"] = self.token_bytes[batch["targets_BT"]]
        self._last = batch
        return batch

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """batch_fn for ctx.train: batch number `step` counted from the loader's start. Sequential calls are cheap,
        repeating the last step returns the same batch, other steps replay the loader to get there."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self._last is not None and step == self.batches - 1:
            return self._last
        if step < self.batches:
            self.reset()
        while self.batches < step:
            self._take_rows(None)
            self.batches += 1
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "unit": self._unit, "row": self._row, "batches": self.batches,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(state, dict) or set(state) != set(_STATE_KEYS) or \
                not all(isinstance(state[k], int) and state[k] >= 0 for k in _STATE_KEYS):
            raise UserError(f"bad data loader state {state!r}; expected non-negative ints {', '.join(_STATE_KEYS)}")
        mine = self.state_dict()
        for key in ("seq_len", "batch_size", "seed"):
            if state[key] != mine[key]:
                raise UserError(f"data loader state was saved with {key}={state[key]}, this run has {mine[key]}")
        if self._n_units is not None and state["unit"] >= self._n_units:
            raise UserError(f"data loader state points at unit {state['unit']} but the {self.split} split has "
                            f"{self._n_units}; was the data changed?")
        self._epoch, self._unit, self._row, self.batches = (state[k] for k in ("epoch", "unit", "row", "batches"))
        self._last = None

    def _take_rows(self, out: np.ndarray | None) -> None:
        """Advance by one batch of rows, copying them into `out` unless it is None."""
        filled = 0
        while filled < self.batch_size:
            rows = self._unit_rows(self._epoch, self._unit)
            take = min(self.batch_size - filled, len(rows) - self._row)
            if out is not None:
                lo, hi = max(filled, self.fill.start), min(filled + take, self.fill.stop)
                if lo < hi:
                    out[lo:hi] = rows[self._row + lo - filled:self._row + hi - filled]
            filled += take
            self._row += take
            if self._row >= len(rows):
                self._row = 0
                self._unit += 1
                if self._unit == self._n_units:
                    self._unit = 0
                    self._epoch += 1

    def _unit_rows(self, epoch: int, slot: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != (epoch, slot):
            unit = slot if self._n_units is None else self._unit_order(epoch)[slot]
            rows = self.source.rows(self.split, unit) if self._bin else pack_rows(self._unit_docs(unit), self.row_len)
            if self.split == "train":
                rows = rows[np.random.default_rng([self.seed, epoch, unit]).permutation(len(rows))]
            self._cached = ((epoch, slot), rows)
        return self._cached[1]

    def _unit_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self._n_units) if self.split == "train"
                     else np.arange(self._n_units))
            self._order = (epoch, order)
        return self._order[1]

    def _unit_docs(self, unit: int) -> list[np.ndarray]:
        bos = np.array([self.tokenizer.bos_id], np.int32)
        return [np.concatenate([bos, ids]) for ids in self.tokenizer.encode_batch(self.source.texts(self.split, unit))]

    def _check_fillable(self) -> None:
        n_scan = 1 if self._n_units is None else self._n_units
        if any(len(self._unit_rows(0, slot)) for slot in range(n_scan)):
            return
        raise UserError(f"the {self.split} split ({self.source.size(self.split)}) cannot fill a single row of "
                        f"seq_len+1 = {self.row_len} tokens; use a shorter sequence length or more data")


def make_data(spec: DataSpec | str | None, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
              split: str, log: Callable[[str], None] | None = None) -> Loader:
    """One split's loader from the data flags (a DataSpec; a plain string is --data; None is the default)."""
    if not isinstance(spec, DataSpec):
        spec = DataSpec(data=spec)
    source = open_source(spec, seed=seed % 2**64, row_len=seq_len + 1, log=log)
    return Loader(source, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, split=split)
