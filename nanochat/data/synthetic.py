"""A synthetic language whose entropy rate is known exactly, so training can report its distance from the floor.

The language is a first-order Markov chain over a small vocabulary of made-up lowercase words. Every word has a few
successors with Dirichlet weights; one successor of each word lies on a fixed random cycle through all words, which
makes the chain irreducible, so its stationary distribution is unique. A document is a run of the chain started from
the stationary distribution and written as words joined by single spaces.

Entropy rate: per word it is H = sum_i pi_i * H(P_i.) (stationary start, so every position has this conditional
entropy). Words are distinct and contain no space, so the text determines the word sequence; the rate per byte is
therefore H divided by the mean bytes per word, counting the separating space.

Document floor: whole documents cost more per byte than the rate, because the first word has entropy H(pi) and the
model cannot know when a document ends (it can count words, so it pays -log2 P(N > n | N >= n) on every space; the
BOS target itself is left out of bits per byte, as in nanochat). doc_bits_per_byte is that exact expectation, the best
bits per byte a model can reach on uncropped documents; packing crops a few documents, which raises it slightly.

A small GPT learns it in a few hundred steps: a few dozen words to spell and ~n_words*n_successors transitions.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass

import numpy as np

from mgr.errors import UserError


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0  # the language's own seed; the training seed only changes which documents are sampled
    n_words: int = 48
    n_successors: int = 3
    concentration: float = 1.0  # Dirichlet parameter of each word's successor weights (smaller = lower entropy)
    min_word_len: int = 2
    max_word_len: int = 6
    min_doc_words: int = 8
    max_doc_words: int = 48

    @classmethod
    def parse(cls, text: str) -> SyntheticConfig:
        """'synthetic' or 'synthetic:n_words=32,seed=3' (the --data spelling) -> config."""
        _, _, options = text.partition(":")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for item in filter(None, options.split(",")):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in types:
                raise UserError(f"bad synthetic data option {item!r}; known options: {', '.join(types)}")
            try:
                kwargs[key] = float(value) if types[key] == "float" else int(value)
            except ValueError:
                raise UserError(f"synthetic data option {key} needs a number, got {value!r}") from None
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        if not 2 <= self.n_successors <= self.n_words:
            raise UserError(f"synthetic language needs 2 <= n_successors <= n_words, "
                            f"got {self.n_successors} and {self.n_words}")
        if not 1 <= self.min_word_len <= self.max_word_len or not 1 <= self.min_doc_words <= self.max_doc_words:
            raise UserError("synthetic language needs 1 <= min_word_len <= max_word_len "
                            "and 1 <= min_doc_words <= max_doc_words")
        if self.concentration <= 0:
            raise UserError(f"synthetic language concentration must be > 0, got {self.concentration}")
        n_strings = sum(26**n for n in range(self.min_word_len, self.max_word_len + 1))
        if self.n_words > n_strings // 2:
            raise UserError(f"synthetic language: {self.n_words} distinct words do not fit in word lengths "
                            f"{self.min_word_len}..{self.max_word_len}")


@dataclass(frozen=True)
class EntropyRate:
    bits_per_token: float  # a token here is a word of the synthetic language, not a model token
    bits_per_byte: float
    bytes_per_token: float  # stationary mean of word length + 1 separating space
    doc_bits_per_byte: float  # whole documents, boundaries included: the floor for bits per byte (module docstring)


class SyntheticLanguage:
    def __init__(self, config: SyntheticConfig = SyntheticConfig()):
        config.validate()
        self.config = config
        rng = np.random.default_rng([config.seed, 0x5EED])
        self.words = _distinct_words(rng, config)
        V, K = config.n_words, config.n_successors
        cycle_V = rng.permutation(V)
        next_on_cycle_V = np.empty(V, np.int64)
        next_on_cycle_V[cycle_V] = np.roll(cycle_V, -1)
        probs_VV = np.zeros((V, V))
        for i in range(V):
            others = np.delete(np.arange(V), next_on_cycle_V[i])
            successors = np.concatenate([[next_on_cycle_V[i]], rng.choice(others, K - 1, replace=False)])
            probs_VV[i, successors] = rng.dirichlet(np.full(K, config.concentration))
        self.transition_probs = probs_VV
        self.stationary = _stationary(probs_VV)
        cdf_VV = np.cumsum(probs_VV, axis=1)
        cdf_VV[:, -1] = 1.0  # so a uniform draw in [0, 1) always lands on a word, whatever the rounding
        self._cdf_VV = cdf_VV
        self._stationary_cdf = np.cumsum(self.stationary)
        self._stationary_cdf[-1] = 1.0

    def entropy_rate(self) -> EntropyRate:
        c, pi_V, probs_VV = self.config, self.stationary, self.transition_probs
        bits_per_word = float(-(pi_V @ (probs_VV * _log2(probs_VV)).sum(axis=1)))
        bytes_per_word = float(pi_V @ np.array([len(w) + 1 for w in self.words]))
        # document length N is uniform on [min, max]; survive[n-1] = P(N >= n) for n = 1 .. max+1
        n = np.arange(1, c.max_doc_words + 2)
        n_lengths = c.max_doc_words + 1 - c.min_doc_words
        survive = np.clip((c.max_doc_words + 1 - np.maximum(n, c.min_doc_words)) / n_lengths, 0.0, 1.0)
        # after word n the next byte is a space with probability P(N > n | N >= n): sum of P(N > n) * -log2 of it
        continue_bits = float(-(survive[1:] * _log2(survive[1:] / survive[:-1])).sum())
        mean_words = 0.5 * (c.min_doc_words + c.max_doc_words)
        doc_bits = float(-(pi_V * _log2(pi_V)).sum()) + (mean_words - 1) * bits_per_word + continue_bits
        doc_bytes = mean_words * bytes_per_word - 1  # no space after the last word; the BOS target has no bytes
        return EntropyRate(bits_per_word, bits_per_word / bytes_per_word, bytes_per_word, doc_bits / doc_bytes)

    def mean_doc_bytes(self) -> float:
        return 0.5 * (self.config.min_doc_words + self.config.max_doc_words) * self.entropy_rate().bytes_per_token

    def sample_word_ids(self, rng: np.random.Generator, n_docs: int) -> list[np.ndarray]:
        """n_docs independent runs of the chain, each started from the stationary distribution."""
        c = self.config
        lengths_N = rng.integers(c.min_doc_words, c.max_doc_words + 1, n_docs)
        ids_NL = np.empty((n_docs, int(lengths_N.max(initial=0))), np.int64)
        state_N = _draw(self._stationary_cdf[None, :], rng.random(n_docs))
        for t in range(ids_NL.shape[1]):
            ids_NL[:, t] = state_N
            state_N = _draw(self._cdf_VV[state_N], rng.random(n_docs))
        return [ids_NL[n, :length] for n, length in enumerate(lengths_N)]

    def render(self, word_ids: np.ndarray) -> str:
        return " ".join(self.words[i] for i in word_ids)

    def documents(self, rng: np.random.Generator, n_docs: int) -> list[str]:
        return [self.render(ids) for ids in self.sample_word_ids(rng, n_docs)]


def _log2(p: np.ndarray) -> np.ndarray:
    return np.log2(np.where(p > 0, p, 1.0))  # 0 log 0 = 0


def _draw(cdf_NV: np.ndarray, uniform_N: np.ndarray) -> np.ndarray:
    # inverse-CDF sampling, vectorised over documents: index of the first cdf entry above u
    return (uniform_N[:, None] >= cdf_NV).sum(axis=1)


def _stationary(probs_VV: np.ndarray) -> np.ndarray:
    V = probs_VV.shape[0]
    # pi (P - I) = 0 with sum(pi) = 1; unique because the chain is irreducible
    system = np.vstack([probs_VV.T - np.eye(V), np.ones((1, V))])
    rhs = np.zeros(V + 1)
    rhs[-1] = 1.0
    pi_V = np.clip(np.linalg.lstsq(system, rhs, rcond=None)[0], 0.0, None)
    return pi_V / pi_V.sum()


def _distinct_words(rng: np.random.Generator, config: SyntheticConfig) -> list[str]:
    letters = np.array(list(string.ascii_lowercase))
    words: dict[str, None] = {}
    while len(words) < config.n_words:
        length = int(rng.integers(config.min_word_len, config.max_word_len + 1))
        words.setdefault("".join(rng.choice(letters, length)), None)
    return list(words)
