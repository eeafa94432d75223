"""Issue 10, nanochat side: token files beyond the tokenizer, GPT-2's tokenizer offline, checkpoints on interrupt,
refused options before any run directory, tokenizer/export outputs that never clobber, text without blank lines."""

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from mgr.errors import UserError
from nanochat import export as E
from nanochat import tokenizer as T
from nanochat import train
from nanochat.data.sources import DOC_CHARS, TextSource
from tests.conftest import one_error_line, read_json, read_metrics
from tests.test_nanochat_train import TINY, write_corpus


def nanochat(root, run_id, *flags):
    code = train.main([*TINY, "--eval-tokens", "128", "--sample-tokens", "4", *flags, "--artifacts-dir", str(root),
                       "--run-id", run_id])
    return code, Path(root) / "nanochat" / "train" / run_id


@pytest.mark.parametrize("flags, message", [
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0, got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--lr", "inf"], "--lr must be a positive finite number"),
    (["--matrix-lr", "nan"], "--matrix-lr must be a positive finite number"),
    (["--vocab-size", "-1"], "--vocab-size must be >= 0"),
    (["--max-iterations", "4", "--warmup-steps", "4"], "--warmup-steps 4 leaves none of the 4 steps"),
    (["--tokenizer", "/no/such/tok"], "tokenizer '/no/such/tok' not found"),
    (["--seed", "18446744073709551616"], "--seed"),
])
def test_bad_options_are_refused_before_the_run_dir(tmp_path, capsys, flags, message):
    code, run_dir = nanochat(tmp_path, "bad", *flags)
    assert code == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "nanochat").exists()


def token_file(path, max_id, n=6000):
    ids = np.random.default_rng(0).integers(0, max_id + 1, n).astype(np.uint16)
    ids[n // 2] = max_id
    ids.tofile(path)
    return path


def test_token_ids_beyond_a_named_vocab_are_one_line_naming_both(tmp_path, capsys):
    data = token_file(tmp_path / "train.bin", 50000)
    code, _ = nanochat(tmp_path, "small", "--data", str(data), "--vocab-size", "1000")
    assert code == 2
    assert "token id 50000 but --vocab-size is 1000" in one_error_line(capsys)
    assert not (tmp_path / "nanochat").exists()


@pytest.mark.slow
def test_token_ids_beyond_the_byte_tokenizer_train_on_ids(tmp_path):
    """A GPT-2-tokenised nanoGPT train.bin with the default byte tokenizer: vocab from the data, no bpb, samples
    as ids, and the run completes (it used to fail at the final sample)."""
    data = token_file(tmp_path / "train.bin", 700)
    code, run_dir = nanochat(tmp_path, "ids", "--data", str(data), "--max-iterations", "2")
    assert code == 0
    s = read_json(run_dir / "summary.json")
    assert s["status"] == "completed" and s["results"]["model"]["vocab_size"] == 701
    assert s["results"]["val_bpb"] is None and s["results"]["val_loss"] is not None
    assert any("beyond the byte tokenizer's 257" in n for n in s["results"]["notes"])
    assert any(r.get("sample", "").startswith("token ids ") for r in read_metrics(run_dir))


def gpt2_files(directory: Path) -> Path:
    """A miniature GPT-2 tokenizer in GPT-2's own file format: the byte alphabet, one merge, <|endoftext|>."""
    directory.mkdir()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["th"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\nt h\n")
    return directory


def test_gpt2_vocab_and_merges_load_offline(tmp_path):
    tok = T.load_tokenizer(str(gpt2_files(tmp_path / "gpt2")))
    assert tok.vocab_size == 258 and tok.bos_id == 257
    ids = tok.encode("the cat")
    assert ids[0] == 256 and tok.decode(ids) == "the cat"  # "th" merged into one token
    assert tok.token_bytes[256] == 2 and tok.token_bytes[257] == 0


@pytest.mark.slow
def test_interrupt_saves_a_checkpoint_sigterm_exits_143_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    from mgr.launcher import Terminated
    from nanochat.data.loader import Loader

    real_call = Loader.__call__

    def terminated_at_step_3(self, step):
        if self.split == "train" and step == 3:
            raise Terminated("signal 15")
        return real_call(self, step)

    monkeypatch.setattr(Loader, "__call__", terminated_at_step_3)
    code, run_dir = nanochat(tmp_path, "cut", "--max-iterations", "6")
    monkeypatch.undo()
    assert code == 143
    s = read_json(run_dir / "summary.json")
    assert s["status"] == "interrupted" and s["error"] == "terminated by SIGTERM"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["3"]
    capsys.readouterr()
    code, resumed = nanochat(tmp_path, "resumed", "--max-iterations", "5", "--resume", str(run_dir),
                             "--data", "synthetic:seed=1")
    assert code == 0
    assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == [3, 4]
    notes = read_json(resumed / "summary.json")["results"]["notes"]
    assert any("other data flags" in n for n in notes)  # recorded, and warned in one line
    assert "warning: resumed from" in capsys.readouterr().err


# --- tokenizer training outputs ----------------------------------------------------------------------------------

@pytest.fixture
def corpus_file(tmp_path):
    return write_corpus(tmp_path / "c.txt", n_docs=60)


def tok_train(capsys, *args):
    code = T.main(["train", *args])
    return code, capsys.readouterr()


def test_tokenizer_train_refuses_to_overwrite_without_force(tmp_path, capsys, corpus_file):
    out = tmp_path / "tok"
    assert tok_train(capsys, "--data", str(corpus_file), "--vocab-size", "280", "--out", str(out))[0] == 0
    before = (out / "tokenizer.json").read_bytes()
    code, cap = tok_train(capsys, "--data", str(corpus_file), "--vocab-size", "300", "--out", str(out))
    assert code == 2 and "already holds a tokenizer.json" in cap.err and "--force" in cap.err
    assert (out / "tokenizer.json").read_bytes() == before
    assert tok_train(capsys, "--data", str(corpus_file), "--vocab-size", "300", "--out", str(out), "--force")[0] == 0
    assert T.load_tokenizer(str(out)).vocab_size == 300


@pytest.mark.parametrize("case, message", [
    ("out_is_file", "is a file"), ("out_under_file", "cannot create the directory"),
    ("huge_vocab", "at most 1048576"), ("binary", "does not look like text"),
])
def test_tokenizer_train_bad_outputs_and_inputs_are_one_line(tmp_path, capsys, corpus_file, case, message):
    (tmp_path / "f").write_text("x")
    data, out, vocab = str(corpus_file), str(tmp_path / "tok"), "300"
    if case == "out_is_file":
        out = str(tmp_path / "f")
    elif case == "out_under_file":
        out = str(tmp_path / "f" / "tok")
    elif case == "huge_vocab":
        vocab = "10000000"
    else:
        (tmp_path / "blob.dat").write_bytes(bytes(range(256)) * 40)
        data = str(tmp_path / "blob.dat")
    code, cap = tok_train(capsys, "--data", data, "--vocab-size", vocab, "--out", out)
    assert code == 2 and cap.err.count("\n") == 1 and message in cap.err, cap.err


def test_tokenizer_train_says_when_the_text_gives_a_smaller_vocab(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("ab ab ab\n\nab ab")
    code, cap = tok_train(capsys, "--data", str(tmp_path / "tiny.txt"), "--vocab-size", "5000", "--out",
                          str(tmp_path / "tok"))
    assert code == 0 and "asked for 5000: the text has no more merges to learn" in cap.out


# --- text data -----------------------------------------------------------------------------------------------------

def test_a_text_without_blank_lines_is_cut_into_documents(tmp_path):
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(2000)]
    (tmp_path / "lines.txt").write_text("\n".join(lines))
    source = TextSource([tmp_path / "lines.txt"])
    docs = source.docs["train"] + source.docs["val"]
    assert len(docs) > 20 and all(len(d) <= DOC_CHARS for d in docs) and source.docs["val"]
    assert "\n".join(sorted(docs)) and sum(len(d) for d in docs) >= sum(map(len, lines))
    assert any("no blank lines" in n and f"{len(docs)} documents" in n for n in source.notes)


def test_bytes_that_are_not_utf8_are_counted(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(("caf\xe9 cr\xe8me\n\nna\xefve " + "plain ascii text " * 10)
                                         .encode("latin-1"))
    source = TextSource([tmp_path / "latin1.txt"])
    assert source.notes == [f"{tmp_path / 'latin1.txt'}: replaced 3 byte sequence(s) that are not UTF-8 by U+FFFD"]


# --- export ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    code, run_dir = nanochat(root, "r", "--max-iterations", "2")
    assert code == 0
    return run_dir


def test_export_refuses_an_out_under_a_file_and_a_huge_token_count(tiny_run, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert E.main(["--run", str(tiny_run), "--out", str(tmp_path / "f" / "layer.npz")]) == 2
    assert "--out" in one_error_line(capsys)
    assert E.main(["--run", str(tiny_run), "--tokens", "100000000000", "--out", str(tmp_path / "l.npz")]) == 2
    assert "would need about" in one_error_line(capsys)
    assert not (tmp_path / "l.npz").exists()


def test_a_full_disk_while_checkpointing_names_the_checkpoint(tmp_path, monkeypatch):
    import errno

    from nanochat.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt._manager, "save", full)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*checkpoints/7: No space left on device"):
        ckpt.save(7, {"w": np.zeros(2)}, {"step": 7})
    ckpt.close()
