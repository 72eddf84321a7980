"""One table of end-of-text/padding names: the tokenizers that build shards and `export hf` agree on the ids."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import bigtx
from bigtx.config.special_tokens import EOS_NAMES, PAD_NAMES, special_ids
from bigtx.data import DataError
from bigtx.data.tokenizer import ByteTokenizer, load_tokenizer, train_tokenizer
from bigtx.export.hf import byte_tokenizer
from bigtx.export.hf import load_tokenizer as export_tokenizer


def test_byte_tokenizer_ids_agree_with_the_exported_one(tmp_path: Path) -> None:
    ours = ByteTokenizer()
    tok, ids = export_tokenizer("byte", tmp_path)
    assert (ids["eos"], ids["pad"]) == (ours.eos_id, ours.pad_id) == (256, 257)
    assert tok.get_vocab_size(with_added_tokens=True) == ours.vocab_size == 258
    assert ours.decode([ours.eos_id, ours.pad_id]) == byte_tokenizer().decode([256, 257], skip_special_tokens=False)


def word_level(path: Path, vocab: dict[str, int], special: list[str]) -> Path:
    """A foreign tokenizer.json (word-level, special tokens at ids of its own)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in special])
    tok.save(str(path))
    return path


@pytest.mark.parametrize(
    "vocab, expected",
    [
        ({"[UNK]": 0, "hello": 1, "<pad>": 2, "</s>": 3}, (3, 2)),  # Llama-2 style names
        ({"[UNK]": 0, "<|eot_id|>": 1, "<|end_of_text|>": 2}, (2, 2)),  # earlier name wins; no pad: pad = eos
        ({"[UNK]": 0, "<eos>": 4, "[PAD]": 1, "x": 2, "y": 3}, (4, 1)),
    ],
)
def test_foreign_tokenizers_get_the_same_ids_in_shards_and_exports(
    tmp_path: Path, vocab: dict[str, int], expected: tuple[int, int]
) -> None:
    path = word_level(tmp_path / "tokenizer.json", vocab, [t for t in vocab if t.startswith(("<", "["))])
    data = load_tokenizer(str(path))
    _, ids = export_tokenizer(str(path), tmp_path)
    assert (data.eos_id, data.pad_id) == (ids["eos"], ids["pad"]) == expected


def test_a_tokenizer_without_end_of_text(tmp_path: Path) -> None:
    path = word_level(tmp_path / "tokenizer.json", {"[UNK]": 0, "<pad>": 1, "a": 2}, ["<pad>"])
    with pytest.raises(DataError, match="has no end-of-text token"):
        load_tokenizer(str(path))
    _, ids = export_tokenizer(str(path), tmp_path)
    assert ids["eos"] is None  # the export goes on and says so (no eos_token_id)
    assert special_ids({"<pad>": 1}.get) == (None, 1)


def test_trained_tokenizer_ids_agree(tmp_path: Path) -> None:
    trained = train_tokenizer(["some text to train on. " * 20], 300, str(tmp_path / "tok.json"))
    _, ids = export_tokenizer(str(tmp_path / "tok.json"), tmp_path)
    assert (trained.eos_id, trained.pad_id) == (ids["eos"], ids["pad"]) == (0, 1)
    assert json.loads((tmp_path / "tok.json").read_text())["added_tokens"][0]["content"] == EOS_NAMES[0]


def test_no_module_keeps_its_own_copy_of_the_names() -> None:
    names = set(EOS_NAMES) | set(PAD_NAMES)
    root = Path(bigtx.__file__).parent
    copies = []
    for file in sorted(root.rglob("*.py")):
        if file.name == "special_tokens.py":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                copies.append(f"{file.relative_to(root)}:{node.lineno} {node.value!r}")
    assert not copies, copies
