"""Checkpoint file digests: computed while a file is written (one pass over the bytes, no second read
to hash them) and checked on resume. A leaf module: it imports nothing else from bigtx.

The digest is XXH3-128 (``xxhash``), about 15 GB/s on one core against sha256's 1.5 GB/s. It guards
against damage (a truncated, garbled or half-copied file), not against someone editing a checkpoint on
purpose: DeepSpeed's files are pickles, code that runs on load, so a checkpoint is trusted input either
way (README "What bigtx loads, and what is code"). At sha256's speed, checking a rank's gigabyte
before loading it cost about half of ``torch.load``'s own time; at XXH3's it is a few percent.
Checkpoints written before the switch recorded sha256 and are checked with it.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

ALGORITHM = "xxh3_128"
_ALGORITHMS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}  # sha256: checkpoints before xxh3


def _recorded(entry: Any) -> str | None:
    """The algorithm a ``COMPLETE.json`` entry was recorded with; ``None`` if it is not a well-formed
    entry (``bytes`` and exactly one known digest)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
        return None
    found = [name for name in _ALGORITHMS if isinstance(entry.get(name), str)]
    return found[0] if len(found) == 1 else None


class HashingWriter:
    """A write-only file object: every byte written to ``raw`` is also hashed and counted.

    ``torch.save`` needs nothing but ``write`` (and ``flush``) from a file object, so it serializes
    straight through this; the hash releases the GIL on large blocks, so a background writer hashes
    without holding up the training thread.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = _ALGORITHMS[ALGORITHM]()
        self.bytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.bytes += view.nbytes
        return self._raw.write(view)

    def flush(self) -> None:
        self._raw.flush()

    def digest(self) -> dict[str, Any]:
        """``{"bytes", "xxh3_128"}`` of everything written so far: a ``COMPLETE.json`` entry."""
        return {"bytes": self.bytes, ALGORITHM: self._hash.hexdigest()}


def digest_bytes(data: bytes) -> dict[str, Any]:
    """The ``COMPLETE.json`` entry of a file whose whole content is ``data``."""
    return {"bytes": len(data), ALGORITHM: _ALGORITHMS[ALGORITHM](data).hexdigest()}


def digest_file(path: Path, algorithm: str = ALGORITHM) -> dict[str, Any]:
    """The ``COMPLETE.json`` entry of the file at ``path``, read through a read-only map (no copy)."""
    h = _ALGORITHMS[algorithm]()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:  # an empty file cannot be mapped; its digest is that of no bytes
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
    return {"bytes": size, algorithm: h.hexdigest()}


def check_file(path: Path, entry: dict[str, Any]) -> str | None:
    """``None`` when the file at ``path`` has the size and digest ``entry`` records; else the problem."""
    algorithm = _recorded(entry)
    if algorithm is None:
        return f"{path}: its COMPLETE.json entry {entry!r} holds no size and {' or '.join(_ALGORITHMS)} (edited?)"
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path}: size {size} != {entry['bytes']} recorded (truncated?)"
    if digest_file(path, algorithm)[algorithm] != entry[algorithm]:
        return f"{path}: {algorithm} differs from the one recorded when it was saved (corrupted on disk)"
    return None


def save_hashed(obj: Any, path: Path) -> dict[str, Any]:
    """``torch.save(obj)`` to ``path`` (a temp file renamed into place); returns its ``COMPLETE.json``
    entry, computed from the bytes as they were written (no second read).

    Not fsynced, as DeepSpeed's own writer does not: forcing a terabyte to disk would multiply the
    save time, and a file that a power cut truncates or garbles fails its digest on resume, where
    bigtx falls back to the previous checkpoint. The commit marker and ``newest`` are fsynced.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        writer = HashingWriter(f)
        torch.save(obj, writer)
    os.replace(tmp, path)
    return writer.digest()
