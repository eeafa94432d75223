"""Tokenizers: the byte-level default (256 byte tokens + <|bos|>) and byte-level BPE trained with HuggingFace
`tokenizers`. Both expose token_bytes (UTF-8 bytes per token id, 0 for special tokens) so eval can report bits per
byte, which does not depend on the tokenizer.

    python -m nanochat.tokenizer train --data <file/glob/dir/parquet> --vocab-size 4096 --out DIR
    load_tokenizer("byte") / load_tokenizer(DIR)
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mgr.artifacts import atomic_write_text
from mgr.errors import UserError
from nanochat.data import DataSpec, iter_texts, resolve_data
from nanochat.data.download import first_line
from nanochat.data.sources import build_source

BOS = "<|bos|>"
SPECIAL_TOKENS = (BOS,)
TOKENIZER_FILE = "tokenizer.json"
GPT2_FILES = ("vocab.json", "merges.txt")  # GPT-2's own byte-level BPE, e.g. for nanoGPT's train.bin
GPT2_EOT = "<|endoftext|>"  # GPT-2 separates documents with it: it plays the part of <|bos|>
MAX_VOCAB = 2**20


def bits_per_byte(loss_sum_nats, n_bytes):
    """Bits per byte from summed cross-entropy (nats) and summed target byte lengths. Sum the loss only over targets
    with byte length > 0 (special tokens such as <|bos|> carry no text), as nanochat does. Works on floats, numpy
    and jax values alike."""
    return loss_sum_nats / (math.log(2) * n_bytes)


class ByteTokenizer:
    def __init__(self):
        self.bos_id = 256
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.token_bytes = np.array([1] * 256 + [0] * len(SPECIAL_TOKENS), np.int32)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the byte tokenizer's vocabulary of {self.vocab_size}")
            out += bytes([i]) if i < 256 else SPECIAL_TOKENS[i - 256].encode()
        return out.decode("utf-8", errors="replace")


class BpeTokenizer:
    def __init__(self, hf: HFTokenizer, name: str):
        hf.encode_special_tokens = True  # the text "<|bos|>" inside a document is text, not the BOS token
        self.hf = hf
        self.vocab_size = hf.get_vocab_size()
        bos_id = hf.token_to_id(BOS)
        if bos_id is None:
            bos_id = hf.token_to_id(GPT2_EOT)
        if bos_id is None:
            raise UserError(f"tokenizer {name} has no {BOS} token; train it with `python -m nanochat.tokenizer train`")
        self.bos_id = bos_id
        special = {hf.token_to_id(t) for t in (*SPECIAL_TOKENS, GPT2_EOT)} - {None}
        # the byte-level alphabet spells every byte as one character, so a token's length is its byte count
        self.token_bytes = np.array([0 if i in special else len(hf.id_to_token(i)) for i in range(self.vocab_size)],
                                    np.int32)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise UserError(f"BPE vocab size must be at least {minimum} (bytes + special tokens), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer)
        return cls(hf, f"bpe-{hf.get_vocab_size()}")

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / TOKENIZER_FILE, self.hf.to_str())  # never half a tokenizer after a crash
        return directory

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.array(e.ids, np.int32) for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def _gpt2(directory: Path) -> HFTokenizer:
    """GPT-2's tokenizer from its vocab.json + merges.txt, offline (the encoder nanoGPT's prepare.py uses)."""
    vocab, merges = (str(directory / f) for f in GPT2_FILES)
    hf = HFTokenizer(models.BPE.from_file(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    if hf.token_to_id(GPT2_EOT) is not None:
        hf.add_special_tokens([GPT2_EOT])
    return hf


def load_tokenizer(name: str) -> ByteTokenizer | BpeTokenizer:
    """"byte", a directory written by `python -m nanochat.tokenizer train` (or its tokenizer.json), or a directory
    holding GPT-2's vocab.json and merges.txt."""
    if name == "byte":
        return ByteTokenizer()
    path = Path(name).expanduser()
    file = path / TOKENIZER_FILE if path.is_dir() else path
    gpt2 = path.is_dir() and not file.is_file() and all((path / f).is_file() for f in GPT2_FILES)
    if not file.is_file() and not gpt2:
        raise UserError(f"tokenizer {name!r} not found: pass 'byte', a directory made by "
                        f"`python -m nanochat.tokenizer train`, or one with GPT-2's {' + '.join(GPT2_FILES)}")
    try:
        hf = _gpt2(path) if gpt2 else HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"cannot load tokenizer {path if gpt2 else file}: {first_line(e)}") from None
    return BpeTokenizer(hf, str(path))


def _train_command(args: argparse.Namespace) -> None:
    if not 256 + len(SPECIAL_TOKENS) <= args.vocab_size <= MAX_VOCAB:
        raise UserError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens) and at "
                        f"most {MAX_VOCAB} (2^20), got {args.vocab_size}")
    out = _check_out(args)
    kind, target = resolve_data(DataSpec(data=args.data, data_format=args.data_format))
    if kind == "bin":
        raise UserError("cannot train a tokenizer on pre-tokenised .bin data; pass text or parquet files")
    source = build_source(kind, target, seed=0, row_len=1)  # row_len only sizes synthetic units here

    def capped(texts: Iterable[str]) -> Iterable[str]:
        chars = 0
        for text in texts:
            if chars >= args.max_chars:
                return
            chars += len(text)
            yield text

    tokenizer = BpeTokenizer.train(capped(iter_texts(source, "train")), args.vocab_size)
    tokenizer.save(out)
    sample = "\n\n".join(itertools.islice(iter_texts(source, "val"), 200))
    ratio = len(sample.encode()) / max(len(tokenizer.encode(sample)), 1)
    short = (f" (asked for {args.vocab_size}: the text has no more merges to learn)"
             if tokenizer.vocab_size < args.vocab_size else "")
    print(f"trained BPE tokenizer with vocab {tokenizer.vocab_size}{short} on {source.describe()}; "
          f"{ratio:.2f} bytes/token on val text; saved to {out}")
    for note in getattr(source, "notes", []):
        print(f"note: {note}")


def _check_out(args: argparse.Namespace) -> Path:
    """--out is a directory for tokenizer.json; an existing tokenizer is kept unless --force: runs trained with it
    could no longer resume or export once it changed."""
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a directory for {TOKENIZER_FILE}")
    if (out / TOKENIZER_FILE).exists() and not args.force:
        raise UserError(f"--out {out} already holds a {TOKENIZER_FILE}; runs trained with it need it unchanged: "
                        "choose another directory or pass --force to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a file, or not writable
        raise UserError(f"--out {out}: cannot create the directory ({e.strerror or e.__class__.__name__})") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from mgr.cli import OneLineParser, guarded

    parser = OneLineParser(prog="python -m nanochat.tokenizer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    train = commands.add_parser("train", help="train a byte-level BPE tokenizer on the train split of --data")
    train.add_argument("--data", required=True, help="text file/glob/dir, parquet shards, or synthetic[:options]")
    train.add_argument("--data-format", default="auto", choices=("auto", "text", "parquet"),
                       help="data format (default: auto, from the file extension)")
    train.add_argument("--vocab-size", type=int, default=4096,
                       help="tokens including the 256 bytes and <|bos|> (default: 4096)")
    train.add_argument("--max-chars", type=int, default=100_000_000, help="stop reading text after this many chars")
    train.add_argument("--out", required=True, help="directory to write tokenizer.json to")
    train.add_argument("--force", action="store_true", help="replace a tokenizer.json already in --out")

    def parse_and_train(argv):
        args = parser.parse_args(argv)
        if args.max_chars < 1:
            raise UserError(f"--max-chars must be >= 1, got {args.max_chars}")
        _train_command(args)
        return 0

    return guarded(parse_and_train, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
