"""The names of the end-of-text and padding tokens, shared by the tokenizers and the exporter.

bigtx's own tokenizers (the built-in ``byte`` one and those from `bigtx tokenizer train`) use
``EOS_TOKEN`` and ``PAD_TOKEN``. A foreign ``tokenizer.json`` is searched for the names in
``EOS_NAMES``/``PAD_NAMES``, in order; a tokenizer without a padding token pads with EOS. Data
loading and `bigtx export hf` read the same table, so the ids in shards and in an exported
``config.json`` always agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
EOS_NAMES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
PAD_NAMES = (PAD_TOKEN, "<pad>", "[PAD]")

# The built-in byte tokenizer: ids 0-255 are the UTF-8 bytes, then these two.
BYTE_VOCAB_SIZE = 258
BYTE_EOS_ID = 256
BYTE_PAD_ID = 257


def _first_id(token_to_id: Callable[[str], int | None], names: Sequence[str]) -> int | None:
    return next((i for name in names if (i := token_to_id(name)) is not None), None)


def special_ids(token_to_id: Callable[[str], int | None]) -> tuple[int | None, int | None]:
    """``(eos, pad)`` of a tokenizer, given its ``token_to_id`` (None for an unknown token).

    Each is the id of the first name of ``EOS_NAMES``/``PAD_NAMES`` it knows; pad falls back to
    eos; eos is None when the tokenizer knows none of the names.
    """
    eos = _first_id(token_to_id, EOS_NAMES)
    pad = _first_id(token_to_id, PAD_NAMES)
    return eos, eos if pad is None else pad
