"""Tokenizers: the built-in byte tokenizer, BPE training (deterministic, HF-loadable) and the CLI."""

from __future__ import annotations

import gzip
import json

import pytest

from bigtx.cli.main import main
from bigtx.data import ByteTokenizer, DataError, load_tokenizer

SAMPLE = "Grüße, naïve café — 漢字 and emoji 🙂 plus tabs\tand\nnewlines."


def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == SAMPLE
    assert tok.decode([104, 105, tok.eos_id, 33]) == "hi<|endoftext|>!"
    assert [a.tolist() for a in tok.encode_batch(["ab", ""])] == [[97, 98], []]
    assert len(tok.sha256) == 64 and tok.sha256 == ByteTokenizer().sha256


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40 + SAMPLE)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        for i in range(50):
            f.write(json.dumps({"text": f"line {i}: the lazy dog sleeps while the fox runs"}) + "\n")
    return tmp_path


def train(corpus, out, vocab=400, *extra):
    return main(
        ["tokenizer", "train", "--input", str(corpus / "*.txt"), str(corpus / "b.jsonl.gz"), "--vocab-size", str(vocab)]
        + ["--out", str(out), *extra]
    )


def test_train_is_deterministic_and_round_trips(corpus, tmp_path, capsys):
    assert train(corpus, tmp_path / "t1.json") == 0
    assert "byte-level BPE" in capsys.readouterr().out
    assert train(corpus, tmp_path / "t2.json") == 0
    assert (tmp_path / "t1.json").read_bytes() == (tmp_path / "t2.json").read_bytes()
    tok = load_tokenizer(str(tmp_path / "t1.json"))
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert 258 < tok.vocab_size <= 400
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE  # byte-level: lossless for any text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges learned
    assert tok.encode_batch([SAMPLE])[0].tolist() == ids


def test_loadable_by_transformers(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    train(corpus, tmp_path / "tokenizer.json")
    ours = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    assert hf.eos_token_id == ours.eos_id and hf.pad_token_id == ours.pad_id
    assert hf.encode(SAMPLE, add_special_tokens=False) == ours.encode(SAMPLE)
    assert hf.decode(ours.encode(SAMPLE)) == SAMPLE


def test_training_errors_exit_2(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train(corpus, tmp_path / "t.json", 100)
    assert exc.value.code == 2
    assert "vocab_size: 100 is too small" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", "train", "--input", str(tmp_path / "nothing*.txt"), "--vocab-size", "300", "--out", "x"])
    assert exc.value.code == 2
    assert "matches no files" in capsys.readouterr().err


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="^data.tokenizer: no such file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="^data.tokenizer: .* is not a valid tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
