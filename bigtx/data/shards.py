"""The shard format: plain WebDataset tar files of token-id samples, and a fast reader and writer for them.

Sample format (one document per sample, members in this order, all ``mode 0444``, ``mtime 0``, uid/gid 0)::

    <key>.ids.npy      1-D .npy array of token ids (uint16 if the vocabulary fits, else uint32), EOS-terminated
    <key>.source.txt   UTF-8 file[:line] the document came from

``<key>`` has no dots (WebDataset groups members by the part of the name before the first dot). The
reader also accepts raw little-endian ``ids.u16`` / ``ids.u32`` members instead of ``ids.npy``, and any
other members (ignored), so shards written with ``webdataset.ShardWriter`` work::

    sink.write({"__key__": "doc0", "ids.npy": np.asarray(ids, dtype=np.uint16)})

Reading: a shard is fetched whole (``webdataset.gopen``: local paths, ``file:``, ``http(s)://``, ``pipe:``),
checked against the index's sha256 when one is known, and parsed by a small ustar parser here (seven
times faster than ``tarfile`` per member, and strict: a missing end-of-archive marker, a bad header
checksum or a member running past the end make the shard corrupt). Token arrays are zero-copy views
into the shard's bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

ID_FIELDS = ("ids.npy", "ids.u16", "ids.u32")
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(
    rb"""\{\s*'descr':\s*'([<>|=]?[iu][1248])',\s*'fortran_order':\s*(?:False|True),\s*'shape':\s*\((\d+),?\),?\s*\}"""
)
_DTYPES: dict[bytes, np.dtype] = {}


class CorruptShard(Exception):
    """A shard that cannot be used; the message says why (the caller adds the shard's name)."""


def ids_dtype(vocab_size: int) -> np.dtype:
    """The compact storage type for ids of this vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def npy_bytes(ids: np.ndarray) -> bytes:
    """A version-1.0 .npy file of a 1-D little-endian array, byte-identical across numpy versions."""
    arr = np.ascontiguousarray(ids).astype(ids.dtype.newbyteorder("<"), copy=False)
    header = f"{{'descr': '{arr.dtype.str}', 'fortran_order': False, 'shape': ({arr.shape[0]},), }}"
    pad = -(len(_NPY_MAGIC) + 4 + len(header) + 1) % 64
    header = (header + " " * pad + "\n").encode("latin1")
    return _NPY_MAGIC + b"\x01\x00" + len(header).to_bytes(2, "little") + header + arr.tobytes()


def _npy_ids(buf: bytes, start: int, end: int) -> np.ndarray:
    if buf[start : start + 6] != _NPY_MAGIC:
        raise CorruptShard("ids.npy is not a .npy file")
    major = buf[start + 6]
    if major == 1:
        hlen, hstart = int.from_bytes(buf[start + 8 : start + 10], "little"), start + 10
    elif major in (2, 3):
        hlen, hstart = int.from_bytes(buf[start + 8 : start + 12], "little"), start + 12
    else:
        raise CorruptShard(f"ids.npy has unknown .npy version {major}")
    m = _NPY_HEADER.match(buf, hstart, hstart + hlen)
    if m is None:
        raise CorruptShard("ids.npy is not a 1-D integer array")
    dtype = _DTYPES.get(m.group(1))
    if dtype is None:
        dtype = _DTYPES.setdefault(m.group(1), np.dtype(m.group(1).decode()))
    count = int(m.group(2))
    offset = hstart + hlen
    if offset + count * dtype.itemsize != end:
        raise CorruptShard("ids.npy size does not match its header")
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))


def _raw_ids(buf: bytes, start: int, end: int, dtype: np.dtype) -> np.ndarray:
    if (end - start) % dtype.itemsize:
        raise CorruptShard(f"raw ids member of {end - start} bytes is not a multiple of {dtype.itemsize}")
    return np.frombuffer(buf, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start)


def _octal(field: bytes, what: str) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for large numbers
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise CorruptShard(f"bad tar header ({what} field {digits[:12]!r})") from None


def _pax_path(data: bytes) -> str | None:
    path = None
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def iter_tar(buf: bytes) -> Iterator[tuple[str, int, int]]:
    """``(name, start, end)`` of each regular file in a tar archive held in memory, in archive order."""
    pos, n = 0, len(buf)
    long_name: str | None = None
    while True:
        if pos + _BLOCK > n:
            raise CorruptShard("truncated (no end-of-archive marker)")
        header = buf[pos : pos + _BLOCK]
        if header == _ZERO_BLOCK:
            return
        stored = _octal(header[148:156], "checksum")
        if sum(header) - sum(header[148:156]) + 8 * 32 != stored:
            raise CorruptShard(f"bad tar header checksum at byte {pos}")
        size = _octal(header[124:136], "size")
        kind = header[156:157]
        start = pos + _BLOCK
        end = start + size
        if end > n:
            raise CorruptShard(f"truncated (member at byte {pos} needs {size} bytes, {n - start} left)")
        pos = start + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind == b"L":  # GNU long name for the next member
            long_name = buf[start:end].rstrip(b"\0").decode("utf-8")
            continue
        if kind == b"x":  # pax extended header for the next member
            try:
                long_name = _pax_path(buf[start:end]) or long_name
            except ValueError:
                raise CorruptShard(f"bad pax header at byte {pos}") from None
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global pax headers: nothing to read
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
                if prefix:
                    name = prefix + "/" + name
        yield name, start, end


def _split_name(name: str) -> tuple[str, str] | None:
    """WebDataset's grouping: key = path up to the first dot of the file name, field = the rest (lower case)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1 :].lower()


@dataclass
class ShardData:
    keys: list[str]
    docs: list[np.ndarray]
    sources: list[str] | None = None


def parse_shard(buf: bytes, with_sources: bool = False) -> ShardData:
    """Samples of a shard held in memory. Raises ``CorruptShard``."""
    keys: list[str] = []
    docs: list[np.ndarray] = []
    sources: list[str] | None = [] if with_sources else None
    key: str | None = None
    fields: dict[str, tuple[int, int]] = {}

    def finish() -> None:
        if "ids.npy" in fields:
            docs.append(_npy_ids(buf, *fields["ids.npy"]))
        elif "ids.u16" in fields:
            docs.append(_raw_ids(buf, *fields["ids.u16"], np.dtype("<u2")))
        elif "ids.u32" in fields:
            docs.append(_raw_ids(buf, *fields["ids.u32"], np.dtype("<u4")))
        else:
            raise CorruptShard(
                f"sample {key!r} has none of the fields {', '.join(ID_FIELDS)} (it has: {', '.join(sorted(fields))})"
            )
        keys.append(key)  # type: ignore[arg-type]
        if sources is not None:
            span = fields.get("source.txt")
            sources.append(buf[span[0] : span[1]].decode("utf-8", errors="replace") if span else "")

    try:
        for name, start, end in iter_tar(buf):
            base = name.rsplit("/", 1)[-1]
            if base.startswith("__"):  # webdataset's metadata members
                continue
            parts = _split_name(name)
            if parts is None:
                continue
            if parts[0] != key:
                if key is not None:
                    finish()
                key, fields = parts[0], {}
            fields[parts[1]] = (start, end)
        if key is not None:
            finish()
    except UnicodeDecodeError:
        raise CorruptShard("member name is not UTF-8") from None
    return ShardData(keys, docs, sources)


def fetch(url: str) -> bytes:
    """All bytes of a local path or any URL ``webdataset.gopen`` opens; raises ``CorruptShard``."""
    from webdataset.gopen import gopen

    try:
        if "://" not in url and not url.startswith("pipe:"):
            with open(url, "rb") as f:
                return f.read()
        with gopen(url, "rb") as stream:
            return stream.read()
    except Exception as exc:  # noqa: BLE001 - any failure to fetch makes the shard unusable
        raise CorruptShard(f"cannot read: {exc}") from None


def read_shard(
    url: str,
    sha256: str | None = None,
    samples: int | None = None,
    size: int | None = None,
    with_sources: bool = False,
) -> ShardData:
    """Fetch, verify against what the index says (if anything) and parse one shard. Raises ``CorruptShard``."""
    buf = fetch(url)
    if size is not None and len(buf) != size:
        what = "truncated" if len(buf) < size else "too long"
        raise CorruptShard(f"{what}: {len(buf)} bytes, index.json says {size}")
    if sha256 is not None:
        got = hashlib.sha256(buf).hexdigest()
        if got != sha256:
            raise CorruptShard(f"sha256 mismatch: index.json says {sha256[:16]}..., the file has {got[:16]}...")
    data = parse_shard(buf, with_sources)
    if samples is not None and len(data.docs) != samples:
        raise CorruptShard(f"has {len(data.docs)} samples, index.json says {samples}")
    return data


class _HashingFile:
    """Write-through file that keeps a sha256 of everything written (tarfile needs ``tell``)."""

    def __init__(self, path: str):
        self._f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self._f.close()


def _member_size(nbytes: int) -> int:
    return _BLOCK + (nbytes + _BLOCK - 1) // _BLOCK * _BLOCK


class ShardSetWriter:
    """Writes ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ... of at most ``shard_size`` bytes each
    (a single larger sample gets a shard of its own). Output is a pure function of the samples written."""

    def __init__(self, out_dir: str, prefix: str, shard_size: int, dtype: np.dtype):
        self.out_dir = out_dir
        self.prefix = prefix
        self.shard_size = shard_size
        self.dtype = np.dtype(dtype)
        self.shards: list[dict] = []
        self._file: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._samples = self._tokens = 0
        self._estimate = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._name = name
        self._file = _HashingFile(os.path.join(self.out_dir, name))
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[arg-type]
        self._samples = self._tokens = 0
        self._estimate = 2 * _BLOCK  # end-of-archive marker

    def _close(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        self._file.close()
        self.shards.append(
            {
                "name": self._name,
                "samples": self._samples,
                "tokens": self._tokens,
                "bytes": self._file.size,
                "sha256": self._file.sha.hexdigest(),
            }
        )
        self._tar = self._file = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, ids: np.ndarray, source: str) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        payload = npy_bytes(ids.astype(self.dtype, copy=False))
        src = source.encode("utf-8")
        size = _member_size(len(payload)) + _member_size(len(src))
        if self._tar is not None and self._samples and self._estimate + size > self.shard_size:
            self._close()
        if self._tar is None:
            self._open()
        self._add(f"{key}.ids.npy", payload)
        self._add(f"{key}.source.txt", src)
        self._samples += 1
        self._tokens += int(ids.shape[0])
        self._estimate += size

    def close(self) -> list[dict]:
        """Finish the last shard; the list of ``{name, samples, tokens, bytes, sha256}``."""
        if self._tar is not None:
            self._close()
        return self.shards
