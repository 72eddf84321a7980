"""Tokenizers: the built-in ``byte`` tokenizer and byte-level BPE trained with Hugging Face ``tokenizers``.

Both expose the same small interface the rest of bigtx uses: ``vocab_size``, ``eos_id``, ``pad_id``,
``encode(str) -> list[int]``, ``encode_batch(list[str]) -> list[np.ndarray]``, ``decode(ids) -> str`` and
``sha256``, the hash that ``index.json`` records so shards are never read with the wrong tokenizer.

A trained ``tokenizer.json`` is a plain Hugging Face file: ``PreTrainedTokenizerFast(tokenizer_file=...)``
loads it (pass ``eos_token="<|endoftext|>", pad_token="<|pad|>"``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np

from bigtx.config.special_tokens import (
    BYTE_EOS_ID,
    BYTE_PAD_ID,
    BYTE_VOCAB_SIZE,
    EOS_NAMES,
    EOS_TOKEN,
    PAD_TOKEN,
    special_ids,
)
from bigtx.data.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus EOS (256) and PAD (257); needs no training."""

    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID
    pad_id = BYTE_PAD_ID
    # The hash depends only on the layout, so every copy of bigtx agrees on it.
    sha256 = hashlib.sha256(b"bigtx-byte-tokenizer:v1:bytes=256:eos=256:pad=257").hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append({BYTE_EOS_ID: EOS_TOKEN, BYTE_PAD_ID: PAD_TOKEN}.get(i, f"<|unk:{i}|>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``) with bigtx's interface."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.name = path
        with open(path, "rb") as f:
            raw = f.read()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"data.tokenizer: {path} is not a valid tokenizer.json: {exc}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos, pad = special_ids(self._tok.token_to_id)
        if eos is None:
            raise DataError(
                f"data.tokenizer: {path} has no end-of-text token (looked for {', '.join(EOS_NAMES)}); "
                "train one with `bigtx tokenizer train`"
            )
        self.eos_id, self.pad_id = eos, pad

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"``, a ``tokenizer.json`` path, or a directory holding one."""
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise DataError(
            f"data.tokenizer: no such file {spec!r}; use `byte` or a tokenizer.json from `bigtx tokenizer train`"
        )
    return HFTokenizer(path)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out: str,
    *,
    min_frequency: int = 2,
    length: int | None = None,
) -> HFTokenizer:
    """Train a byte-level BPE on ``texts`` and write ``out`` (tokenizer.json); deterministic for equal input.

    EOS and PAD are ids 0 and 1; the 256 byte symbols are always in the vocabulary, so any text encodes.
    """
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    floor = 256 + 2
    if vocab_size < floor:
        raise DataError(f"vocab_size: {vocab_size} is too small for a byte-level BPE (at least {floor})")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    # to_str() is deterministic for equal input (merges tie-break on the pair, vocab is written by id).
    text = tok.to_str(pretty=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, out)
    return HFTokenizer(out)
