"""Packing EOS-terminated documents into training rows.

Documents are concatenated into one token stream (their EOS tokens separate them; nothing is padded).
A micro-batch of ``rows`` sequences takes the next ``rows * seq_len + 1`` tokens: row ``i`` holds
inputs ``stream[i*L : i*L + L]`` and targets ``stream[i*L + 1 : i*L + L + 1]``, i.e. windows of
``seq_len + 1`` tokens where consecutive windows share their boundary token, so every token of the
stream is a target exactly once. The last token of a block stays as the first of the next one.
All work is whole-array numpy: one concatenate per micro-batch; blocks keep the shards' compact dtype
(a quarter of int64's bytes to move between processes) until ``to_batch`` casts them once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

_EMPTY = np.zeros(0, dtype=np.uint16)


class Packer:
    def __init__(self, seq_len: int, rows: int, leftover: np.ndarray | None = None):
        self.seq_len = seq_len
        self.rows = rows
        self.leftover = _EMPTY if leftover is None else leftover

    def next_block(self, next_doc: Callable[[], np.ndarray | None]) -> np.ndarray | None:
        """The next ``rows * seq_len + 1`` tokens (the documents' dtype), or None when ``next_doc`` runs out
        first (the tail is dropped)."""
        need = self.rows * self.seq_len + 1
        parts = [self.leftover]
        have = self.leftover.shape[0]
        while have < need:
            doc = next_doc()
            if doc is None:
                return None
            parts.append(doc)
            have += doc.shape[0]
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        # A view, not a copy: a long document is cut into many blocks without quadratic copying.
        self.leftover = flat[need - 1 :]
        return flat[:need]


def to_batch(block: np.ndarray, rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 inputs and targets ``[rows, seq_len]`` from a block of ``rows * seq_len + 1`` tokens; the two
    tensors are views of one buffer, shifted by one token."""
    flat = torch.from_numpy(block.astype(np.int64))
    return flat[:-1].view(rows, seq_len), flat[1:].view(rows, seq_len)
