"""Checkpoint files hashed while they are written: one pass over the bytes, no second read to hash
them. A leaf module: it imports nothing else from bigtx."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch


class HashingWriter:
    """A write-only file object: every byte written to ``raw`` also goes through sha256 and is counted.

    ``torch.save`` needs nothing but ``write`` (and ``flush``) from a file object, so it serializes
    straight through this; hashlib releases the GIL on large blocks, so a background writer hashes
    without holding up the training thread.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._sha.update(view)
        self.bytes += view.nbytes
        return self._raw.write(view)

    def flush(self) -> None:
        self._raw.flush()

    def digest(self) -> dict[str, Any]:
        """``{"bytes", "sha256"}`` of everything written so far: a ``COMPLETE.json`` entry."""
        return {"bytes": self.bytes, "sha256": self._sha.hexdigest()}


def save_hashed(obj: Any, path: Path) -> dict[str, Any]:
    """``torch.save(obj)`` to ``path`` (a temp file renamed into place); returns its ``{"bytes",
    "sha256"}``, computed from the bytes as they were written (no second read).

    Not fsynced, as DeepSpeed's own writer does not: forcing a terabyte to disk would multiply the
    save time, and a file that a power cut truncates or garbles fails its sha256 on resume, where
    bigtx falls back to the previous checkpoint. The commit marker and ``newest`` are fsynced.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        writer = HashingWriter(f)
        torch.save(obj, writer)
    os.replace(tmp, path)
    return writer.digest()
