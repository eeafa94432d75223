import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from mgr.errors import UserError
from nanochat.tokenizer import BOS, BpeTokenizer, ByteTokenizer, bits_per_byte, load_tokenizer, main

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "naïve", "café", "façade", "日本語",
         "données", "🙂", "tokenizer", "byte", "pair", "encoding", "merges", "often", "words", "again")
HELD_OUT = "The naïve fox — 日本語 🙂 jumps! Ünïcödé <|bos|> and\ttabs\nnewlines, 🦊🦊 and ∑ symbols."


def corpus(n_paragraphs: int = 60, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    paragraphs = [" ".join(rng.choice(WORDS, int(rng.integers(8, 20)))) + "." for _ in range(n_paragraphs)]
    return "\n\n".join(paragraphs)


@pytest.fixture(scope="module")
def bpe() -> BpeTokenizer:
    return BpeTokenizer.train([corpus()], vocab_size=300)


def test_byte_tokenizer_round_trips_bytes_and_specials():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id) == (257, 256)
    assert tok.encode("héllo") == list("héllo".encode())
    assert tok.decode(tok.encode(HELD_OUT)) == HELD_OUT
    assert tok.decode([tok.bos_id, 104, 105]) == BOS + "hi"
    assert tok.decode([0xC3]) == "\ufffd"  # a lone UTF-8 lead byte decodes with errors='replace'
    assert [list(a) for a in tok.encode_batch(["ab", "", "é"])] == [[97, 98], [], [0xC3, 0xA9]]
    assert tok.token_bytes.tolist() == [1] * 256 + [0]
    with pytest.raises(ValueError):
        tok.decode([257])


def test_bits_per_byte_is_loss_over_ln2_per_token_for_bytes_on_ascii():
    tok = ByteTokenizer()
    docs = ["To be, or not to be: that is the question.", "Whether 'tis nobler in the mind to suffer"]
    ids = np.concatenate([np.concatenate([[tok.bos_id], tok.encode(d)]) for d in docs])
    targets = ids[1:]  # includes the second document's BOS, which carries no bytes
    nats = np.random.default_rng(0).uniform(0.1, 3.0, len(targets))
    n_bytes = tok.token_bytes[targets]
    text_targets = n_bytes > 0
    assert text_targets.sum() == len(targets) - 1
    bpb = bits_per_byte((nats * text_targets).sum(), n_bytes.sum())
    assert bpb == pytest.approx(nats[text_targets].mean() / math.log(2), rel=1e-12)
    assert bits_per_byte(math.log(2) * 10.0, 5) == pytest.approx(2.0)


def test_bpe_trains_to_the_requested_vocab_and_round_trips(bpe):
    assert bpe.vocab_size == 300
    assert bpe.decode([bpe.bos_id]) == BOS
    text = corpus(seed=1)
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(ids) < 0.75 * len(text.encode())  # 43 merges learnt from the same word list (measured 0.61)
    assert bpe.decode(bpe.encode(HELD_OUT)) == HELD_OUT
    assert [list(a) for a in bpe.encode_batch([text, HELD_OUT])] == [ids, bpe.encode(HELD_OUT)]


def test_bpe_token_bytes_sum_to_the_text_byte_length(bpe):
    for text in (HELD_OUT, corpus(seed=2), "🦊"):
        ids = bpe.encode(text)
        assert bpe.bos_id not in ids  # the literal "<|bos|>" in HELD_OUT is text
        assert int(bpe.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert bpe.token_bytes[bpe.bos_id] == 0
    # reference: tokens that decode to whole characters have exactly that many UTF-8 bytes
    checked = 0
    for i in range(bpe.vocab_size):
        piece = bpe.decode([i])
        if i != bpe.bos_id and "\ufffd" not in piece:
            assert bpe.token_bytes[i] == len(piece.encode()), (i, piece)
            checked += 1
    assert checked > 150


def test_load_tokenizer_byte_dir_file_and_errors(bpe, tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    bpe.save(tmp_path / "tok")
    for name in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = load_tokenizer(str(name))
        assert loaded.encode(HELD_OUT) == bpe.encode(HELD_OUT)
        assert np.array_equal(loaded.token_bytes, bpe.token_bytes)
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load"):
        load_tokenizer(str(tmp_path / "bad.json"))
    HFTokenizer(models.BPE()).save(str(tmp_path / "nobos.json"))
    with pytest.raises(UserError, match=re.escape(f"no {BOS} token")):
        load_tokenizer(str(tmp_path / "nobos.json"))


def test_cli_trains_from_text_as_a_module(tmp_path):
    (tmp_path / "a.txt").write_text(corpus(seed=3))
    out = tmp_path / "tok"
    proc = subprocess.run([sys.executable, "-m", "nanochat.tokenizer", "train", "--data", str(tmp_path / "*.txt"),
                           "--vocab-size", "300", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "vocab 300" in proc.stdout
    assert load_tokenizer(str(out)).vocab_size == 300


def test_cli_trains_from_parquet(tmp_path):
    pq.write_table(pa.table({"text": corpus(seed=4).split("\n\n")}), tmp_path / "shard_00000.parquet",
                   row_group_size=16)
    assert main(["train", "--data", str(tmp_path), "--vocab-size", "290", "--out", str(tmp_path / "tok")]) == 0
    assert load_tokenizer(str(tmp_path / "tok")).vocab_size == 290


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/file.txt"], "data path not found"),
    (["--data", "{tmp}/x.bin"], "pre-tokenised"),
    (["--data", "{tmp}/a.txt", "--vocab-size", "100"], "at least 257"),
    (["--data", "{tmp}/a.txt", "--vocab-size", "many"], "invalid int value: 'many'"),
    (["--data", "{tmp}/a.txt", "--data-format", "bin"], "invalid choice: 'bin'"),
    (["--data", "{tmp}/a.txt", "--max-chars", "0"], "--max-chars must be >= 1"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "a.txt").write_text(corpus(seed=5))
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "x.bin")
    argv = ["train", *[a.format(tmp=tmp_path) for a in args], "--out", str(tmp_path / "tok")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
