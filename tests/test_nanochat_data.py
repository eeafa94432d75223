import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mgr.errors import UserError
from nanochat.data import (DataSpec, Loader, SyntheticConfig, SyntheticLanguage, iter_texts, make_data, open_source,
                           pack_rows)
from nanochat.data.sources import ParquetSource, SyntheticSource, TextSource, split_paragraphs
from nanochat.data.tokenfiles import LLMC_MAGIC, BinSource, read_token_file
from nanochat.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BOS = TOK.bos_id
VOCAB = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu")


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(VOCAB, int(rng.integers(3, 25)))) for i in range(n)]


def write_text(tmp_path, docs: list[str], n_files: int = 2) -> str:
    for f in range(n_files):
        (tmp_path / f"part{f}.txt").write_text("\n\n\n".join(docs[f::n_files]) + "\n")
    return str(tmp_path / "part*.txt")


def write_parquet(tmp_path, docs: list[str], n_files: int = 2, row_group_size: int = 16) -> list:
    paths = []
    for f in range(n_files):
        paths.append(tmp_path / f"shard_{f:05d}.parquet")
        pq.write_table(pa.table({"text": docs[f::n_files]}), paths[-1], row_group_size=row_group_size)
    return paths


def write_llmc(path, tokens: np.ndarray, count: int | None = None, version: int = 1) -> None:
    header = np.zeros(256, np.int32)
    header[:3] = LLMC_MAGIC, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + tokens.astype(np.uint16).tobytes())


def full_rows(batch) -> np.ndarray:
    return np.concatenate([batch["inputs_BT"], batch["targets_BT"][:, -1:]], axis=1)


def segments(row: np.ndarray) -> list[str]:
    starts = np.flatnonzero(row == BOS)
    return [TOK.decode(row[s + 1:e]) for s, e in zip(starts, [*starts[1:], len(row)])]


# --- synthetic language ---------------------------------------------------------------------------------------------

def test_synthetic_entropy_rate_matches_a_reference_computation():
    lang = SyntheticLanguage()
    probs = lang.transition_probs
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert ((probs > 0).sum(axis=1) == lang.config.n_successors).all()
    eigvals, eigvecs = np.linalg.eig(probs.T)
    pi = np.real(eigvecs[:, np.argmin(np.abs(eigvals - 1.0))])
    pi /= pi.sum()
    assert np.allclose(lang.stationary, pi, atol=1e-12)
    bits = sum(pi[i] * sum(-p * np.log2(p) for p in probs[i] if p > 0) for i in range(len(pi)))
    bytes_per_word = sum(pi[i] * (len(w) + 1) for i, w in enumerate(lang.words))
    rate = lang.entropy_rate()
    assert rate.bits_per_token == pytest.approx(bits, rel=1e-12)
    assert rate.bytes_per_token == pytest.approx(bytes_per_word, rel=1e-12)
    assert rate.bits_per_byte == pytest.approx(bits / bytes_per_word, rel=1e-12)
    assert 0.5 < rate.bits_per_token < np.log2(lang.config.n_successors)  # a few likely successors per word


def test_synthetic_entropy_rate_matches_sampled_text():
    lang = SyntheticLanguage()
    index = {w: i for i, w in enumerate(lang.words)}
    V = len(lang.words)
    counts = np.zeros((V, V))
    unigrams = np.zeros(V)
    lengths = np.arange(lang.config.min_doc_words, lang.config.max_doc_words + 1)
    # code length of "not over yet" after word n, summed over n < N: a Bayes model counts the words so far
    not_over_bits = np.cumsum([0.0] + [-np.log2((lengths > n).sum() / (lengths >= n).sum())
                                       for n in range(1, lengths[-1])])
    n_words = n_bytes = doc_bytes = doc_bits = 0
    for sampled in lang.sample_word_ids(np.random.default_rng(123), 4000):
        doc = lang.render(sampled)
        ids = np.array([index[w] for w in doc.split(" ")])  # the text alone determines the word sequence
        assert np.array_equal(ids, sampled)
        np.add.at(counts, (ids[:-1], ids[1:]), 1)
        np.add.at(unigrams, ids, 1)
        n_words += len(ids)
        n_bytes += len(doc.encode()) + 1  # count the separator after every word, including the last
        # the best code length of the whole document: first word, transitions, "not over yet" after each word
        doc_bits -= np.log2(lang.stationary[ids[0]]) + np.log2(lang.transition_probs[ids[:-1], ids[1:]]).sum()
        doc_bits += not_over_bits[len(ids) - 1]
        doc_bytes += len(doc.encode())
    cond = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    nz = counts > 0
    bits_per_word = -(counts[nz] / counts.sum() * np.log2(cond[nz])).sum()  # plug-in conditional entropy
    rate = lang.entropy_rate()
    assert n_words > 100_000
    assert bits_per_word == pytest.approx(rate.bits_per_token, abs=0.02)
    assert n_bytes / n_words == pytest.approx(rate.bytes_per_token, rel=0.01)
    assert bits_per_word * n_words / n_bytes == pytest.approx(rate.bits_per_byte, rel=0.02)
    assert doc_bits / doc_bytes == pytest.approx(rate.doc_bits_per_byte, rel=0.005)
    assert rate.doc_bits_per_byte > 1.1 * rate.bits_per_byte  # boundaries matter for short documents
    assert np.abs(unigrams / n_words - lang.stationary).max() < 0.01
    assert np.abs(cond - lang.transition_probs)[counts.sum(axis=1) > 1000].max() < 0.05


def test_synthetic_language_is_fixed_by_its_seed_and_parses_options():
    a, b, c = SyntheticLanguage(), SyntheticLanguage(), SyntheticLanguage(SyntheticConfig(seed=1))
    assert a.words == b.words and np.array_equal(a.transition_probs, b.transition_probs)
    assert a.words != c.words
    assert a.documents(np.random.default_rng(5), 3) == b.documents(np.random.default_rng(5), 3)
    config = SyntheticConfig.parse("synthetic:n_words=32,seed=1,concentration=0.5")
    assert (config.n_words, config.seed, config.concentration) == (32, 1, 0.5)
    for bad in ("synthetic:bogus=1", "synthetic:n_words=x", "synthetic:n_successors=1", "synthetic:n_words"):
        with pytest.raises(UserError):
            SyntheticConfig.parse(bad)


# --- packing ---------------------------------------------------------------------------------------------------------

def test_pack_rows_best_fit_by_hand():
    docs = [np.array([BOS, *range(10 * k + 1, 10 * k + n)]) for k, n in enumerate([5, 3, 2, 7])]
    rows = pack_rows(docs, 8)
    # row 1: the 7-token doc is the longest that fits, then nothing fits 1 slot: crop the shortest (2 tokens)
    # row 2: the 5-token doc, then the 3-token doc fills it exactly
    assert rows.tolist() == [[BOS, 31, 32, 33, 34, 35, 36, BOS], [BOS, 1, 2, 3, 4, BOS, 11, 12]]
    assert rows.dtype == np.int32
    assert pack_rows(docs[:2], 9).shape == (0, 9)  # 8 tokens cannot fill a row of 9


def test_pack_rows_places_whole_documents_and_crops_only_row_ends():
    rng = np.random.default_rng(0)
    docs = [np.array([BOS, *(1000 * (k + 1) + np.arange(int(rng.integers(1, 40))))]) for k in range(200)]
    rows = pack_rows(docs, 33)
    used = []
    for row in rows:
        starts = np.flatnonzero(row == BOS)
        assert starts[0] == 0
        for s, e in zip(starts, [*starts[1:], len(row)]):
            if e == s + 1:  # a crop that kept only the BOS
                continue
            used.append(row[s + 1] // 1000)
            doc, piece = docs[used[-1] - 1], row[s:e]
            if e < len(row):
                assert np.array_equal(piece, doc)  # documents inside a row are whole
            else:
                assert np.array_equal(piece, doc[:len(piece)])  # only the row's last one may be cropped
    assert len(used) == len(set(used))
    total = sum(map(len, docs))
    assert 0.9 * total < len(rows) * 33 <= total  # best-fit keeps crop losses small (measured 92% kept)


# --- sources and splits ----------------------------------------------------------------------------------------------

def test_text_documents_split_on_blank_lines():
    assert split_paragraphs("a\nb\n\n\nc\n  \t\n d \n\n") == ["a\nb", "c", "d"]


def test_train_and_val_never_share_documents(tmp_path):
    docs = make_docs(400)
    text = open_source(DataSpec(data=write_text(tmp_path, docs)), seed=0, row_len=65)
    parquet = ParquetSource(write_parquet(tmp_path, docs, row_group_size=32))
    assert parquet.num_units("train") == 14  # 7 row groups of 32 rows in each of the 2 shards, streamed one at a time
    for source in (text, parquet):
        train, val = list(iter_texts(source, "train")), list(iter_texts(source, "val"))
        assert not set(train) & set(val)
        assert sorted(train + val) == sorted(docs)
        assert 20 <= len(val) <= 60  # ~10%
    synthetic = SyntheticSource(SyntheticConfig(), seed=0, row_len=65)
    train = {d for u in range(3) for d in synthetic.texts("train", u)}
    val = {d for u in range(3) for d in synthetic.texts("val", u)}
    assert len(val) > 100 and not train & val


def test_rows_hold_documents_of_their_split_bos_aligned(tmp_path):
    docs = make_docs(300)
    source = open_source(DataSpec(data=write_text(tmp_path, docs)), seed=0, row_len=65)
    for split in ("train", "val"):
        split_docs = set(source.docs[split])
        loader = Loader(source, TOK, seq_len=64, batch_size=4, seed=0, split=split)
        for _ in range(5):
            batch = loader.next_batch()
            assert batch["inputs_BT"].shape == batch["targets_BT"].shape == (4, 64)
            assert batch["inputs_BT"].dtype == batch["targets_BT"].dtype == np.int32
            assert (batch["inputs_BT"][:, 0] == BOS).all()
            assert np.array_equal(batch["inputs_BT"][:, 1:], batch["targets_BT"][:, :-1])
            for row in full_rows(batch):
                *whole, last = segments(row)
                assert all(s in split_docs for s in whole)
                assert any(d.startswith(last) for d in split_docs)
        if split == "val":
            assert np.array_equal(batch["target_bytes_BT"], (batch["targets_BT"] != BOS).astype(np.int32))
        else:
            assert "target_bytes_BT" not in batch


def loader_factory(kind, tmp_path):
    docs = make_docs(40)
    if kind == "text":
        write_text(tmp_path, docs)
        return lambda: Loader(TextSource(sorted(tmp_path.glob("part*.txt")), docs_per_unit=8), TOK,
                              seq_len=32, batch_size=4, seed=3, split="train")
    if kind == "parquet":
        write_parquet(tmp_path, docs, row_group_size=8)
        return lambda: make_data(str(tmp_path), TOK, seq_len=32, batch_size=4, seed=3, split="train")
    if kind == "bin":
        np.arange(1500, dtype=np.uint16).tofile(tmp_path / "tokens.bin")
        return lambda: Loader(BinSource([tmp_path / "tokens.bin"], 33, rows_per_unit=16), TOK,
                              seq_len=32, batch_size=4, seed=3, split="train")
    return lambda: make_data(None, TOK, seq_len=32, batch_size=4, seed=3, split="train")


@pytest.mark.parametrize("kind", ["text", "parquet", "bin", "synthetic"])
def test_resume_reproduces_the_batches(tmp_path, kind):
    new_loader = loader_factory(kind, tmp_path)
    loader = new_loader()
    for _ in range(3):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    after = [loader.next_batch() for _ in range(12)]
    if kind != "synthetic":
        assert loader.state_dict()["epoch"] >= 1  # the run crossed units and an epoch boundary
    resumed = new_loader()
    resumed.load_state_dict(state)
    for want in after:
        got = resumed.next_batch()
        assert all(np.array_equal(got[k], want[k]) for k in want)
    again = new_loader()
    assert not np.array_equal(again.next_batch()["inputs_BT"], after[0]["inputs_BT"])


def test_batch_fn_is_a_deterministic_function_of_the_step(tmp_path):
    new_loader = loader_factory("text", tmp_path)
    sequential = new_loader()
    want = [sequential.next_batch()["inputs_BT"] for _ in range(10)]
    loader = new_loader()
    assert all(np.array_equal(loader(s)["inputs_BT"], want[s]) for s in range(6))
    assert loader(5) is loader(5)
    assert np.array_equal(loader(2)["inputs_BT"], want[2])  # backwards: replays
    assert np.array_equal(loader(9)["inputs_BT"], want[9])  # forwards: skips
    resumed = new_loader()
    resumed.load_state_dict({**sequential.state_dict(), "batches": 10, "epoch": 0, "unit": 0, "row": 0})
    assert resumed.state_dict()["batches"] == 10


def test_train_order_follows_the_seed_and_val_does_not(tmp_path):
    spec = write_text(tmp_path, make_docs(300))

    def first(split, seed):
        return make_data(spec, TOK, seq_len=64, batch_size=4, seed=seed, split=split).next_batch()["inputs_BT"]

    assert np.array_equal(first("train", 0), first("train", 0))
    assert not np.array_equal(first("train", 0), first("train", 1))
    assert np.array_equal(first("val", 0), first("val", 1))
    assert np.array_equal(make_data(None, TOK, seq_len=64, batch_size=2, seed=0, split="val").next_batch()["inputs_BT"],
                          make_data(None, TOK, seq_len=64, batch_size=2, seed=7, split="val").next_batch()["inputs_BT"])


def test_load_state_dict_rejects_foreign_states(tmp_path):
    loader = loader_factory("text", tmp_path)()
    state = loader.state_dict()
    assert all(type(v) is int for v in state.values())
    with pytest.raises(UserError, match="seq_len=16"):
        loader.load_state_dict({**state, "seq_len": 16})
    with pytest.raises(UserError, match="bad data loader state"):
        loader.load_state_dict({k: v for k, v in state.items() if k != "row"})
    with pytest.raises(UserError, match="unit 99"):
        loader.load_state_dict({**state, "unit": 99})


def test_synthetic_is_the_default_and_reports_its_floor():
    loader = make_data(None, TOK, seq_len=128, batch_size=2, seed=0, split="val")
    assert loader.entropy_rate == SyntheticLanguage().entropy_rate()
    assert loader.vocab_size == 257
    batch = loader.next_batch()
    assert (batch["inputs_BT"][:, 0] == BOS).all()
    words = set(SyntheticLanguage().words)
    assert all(set(s.split(" ")) <= words for row in full_rows(batch) for s in segments(row)[:-1])
    other = make_data("synthetic:n_words=16", TOK, seq_len=128, batch_size=2, seed=0, split="train")
    assert other.entropy_rate == SyntheticLanguage(SyntheticConfig(n_words=16)).entropy_rate()


# --- pre-tokenised .bin files ----------------------------------------------------------------------------------------

def test_bin_files_named_val_form_the_val_split(tmp_path):
    np.arange(3000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    write_llmc(tmp_path / "val.bin", np.arange(5000, 5600))
    assert np.array_equal(read_token_file(tmp_path / "val.bin"), np.arange(5000, 5600))
    for split, low, high in (("train", 0, 3000), ("val", 5000, 5600)):
        loader = make_data(str(tmp_path), TOK, seq_len=15, batch_size=4, seed=0, split=split)
        assert loader.vocab_size == 5600 and loader.token_bytes is None
        for _ in range(12):
            batch = loader.next_batch()
            rows = full_rows(batch)
            assert (np.diff(rows, axis=1) == 1).all()  # consecutive windows of the token stream
            assert rows.min() >= low and rows.max() < high
            assert "target_bytes_BT" not in batch


def test_bin_file_without_val_name_splits_off_its_tail(tmp_path):
    write_llmc(tmp_path / "tokens.bin", np.arange(2000))
    for split, low, high in (("train", 0, 1800), ("val", 1800, 2000)):
        loader = make_data(str(tmp_path / "tokens.bin"), TOK, seq_len=15, batch_size=3, seed=0, split=split)
        seen = np.concatenate([full_rows(loader.next_batch()) for _ in range(40)])
        assert seen.min() >= low and seen.max() < high


# --- errors ----------------------------------------------------------------------------------------------------------

def _garbage(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    return str(tmp_path / "bad.parquet")


def _no_text_column(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    return str(tmp_path / "x.parquet")


def _blank(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    return str(tmp_path / "blank.txt")


def _mixed(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    np.arange(4, dtype=np.uint16).tofile(tmp_path / "b.bin")
    return str(tmp_path / "*")


def _odd_bin(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"abc")
    return str(tmp_path / "odd.bin")


def _short_llmc(tmp_path):
    write_llmc(tmp_path / "short.bin", np.arange(100), count=200)
    return str(tmp_path / "short.bin")


def _llmc_v2(tmp_path):
    write_llmc(tmp_path / "v2.bin", np.arange(100), version=2)
    return str(tmp_path / "v2.bin")


@pytest.mark.parametrize("make_spec, message", [
    (lambda p: str(p / "nope.txt"), "data path not found"),
    (lambda p: str(p / "*.nothing"), "matched no files"),
    (lambda p: str(p), "holds no"),
    (_blank, "empty corpus"),
    (_mixed, "mixes formats"),
    (_garbage, "not a readable parquet file"),
    (_no_text_column, "no 'text' column"),
    (_odd_bin, "whole number of uint16"),
    (_short_llmc, "header says 200 tokens"),
    (_llmc_v2, "version 2"),
    (lambda p: DataSpec(data=str(p), data_format="csv"), "--data-format"),
    (lambda p: DataSpec(data=str(p), auto_download=True), "drop --data"),
    (lambda p: DataSpec(min_parquet_files=2, data_dir=str(p)), "holds 0 parquet shards"),
    (lambda p: "synthetic:n_words=1", "n_successors"),
])
def test_bad_data_is_a_one_line_user_error(tmp_path, make_spec, message):
    with pytest.raises(UserError, match=re.escape(message)) as info:
        make_data(make_spec(tmp_path), TOK, seq_len=16, batch_size=2, seed=0, split="train")
    assert "\n" not in str(info.value)


def test_a_split_too_small_for_one_row_is_a_user_error(tmp_path):
    spec = write_text(tmp_path, make_docs(100))
    make_data(spec, TOK, seq_len=256, batch_size=2, seed=0, split="val")
    with pytest.raises(UserError, match=r"the val split \(\d+ documents\) cannot fill a single row of seq_len\+1"):
        make_data(spec, TOK, seq_len=20_000, batch_size=2, seed=0, split="val")
    (tmp_path / "val.bin").write_bytes(np.arange(10, dtype=np.uint16).tobytes())
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(UserError, match="val split"):
        make_data(str(tmp_path / "*.bin"), TOK, seq_len=16, batch_size=2, seed=0, split="val")
