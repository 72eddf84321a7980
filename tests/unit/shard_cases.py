"""Helpers for the shard reader tests: real tar bytes, header surgery that keeps checksums valid (so a
change reaches the code behind the checksum test), and a time limit that turns a hang into a failure."""

from __future__ import annotations

import io
import signal
import tarfile
from contextlib import contextmanager

import numpy as np

from bigtx.data.shards import npy_bytes

BLOCK = 512
# Header fields: (start, end) in the 512-byte ustar header.
FIELDS = {
    "name": (0, 100),
    "mode": (100, 108),
    "size": (124, 136),
    "mtime": (136, 148),
    "checksum": (148, 156),
    "type": (156, 157),
    "linkname": (157, 257),
    "magic": (257, 265),
    "prefix": (345, 500),
}


class Hang(BaseException):
    """Raised by the timer; a BaseException so that no ``except Exception`` in the code under test eats it."""


@contextmanager
def time_limit(seconds: float, what: str):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``. Main thread only."""

    def alarm(signum, frame):
        raise Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Hang:
        raise AssertionError(f"{what}: still running after {seconds} s (a hang)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT, pax: dict | None = None) -> bytes:
    """A tar archive of ``(name, data)`` regular files written by ``tarfile`` (``pax``: extra records for each)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax:
                info.pax_headers = dict(pax)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def npy(values, dtype="<u2") -> bytes:
    return npy_bytes(np.asarray(values, dtype=dtype))


def headers(buf: bytes) -> list[tuple[int, int, bytes]]:
    """``(position, size, type)`` of every header of an archive, extended headers included; ValueError if
    the archive cannot be walked that far (this walks damaged archives for more damage: it checks little)."""
    out, pos = [], 0
    while buf[pos : pos + BLOCK] != bytes(BLOCK):
        if pos + BLOCK > len(buf):
            raise ValueError(f"no header at {pos}")
        size = int(buf[pos + 124 : pos + 136].split(b"\0")[0].strip() or b"0", 8)
        if size < 0 or pos + BLOCK + size > len(buf):
            raise ValueError(f"bad size at {pos}")
        out.append((pos, size, buf[pos + 156 : pos + 157]))
        pos += BLOCK + -(-size // BLOCK) * BLOCK
    if not out:
        raise ValueError("no headers")
    return out


def with_checksum(header: bytes) -> bytes:
    header = header[:148] + b" " * 8 + header[156:]
    return header[:148] + b"%06o\0 " % sum(header) + header[156:]


def set_field(buf: bytes, pos: int, field: str, value: bytes, checksum: bool = True) -> bytes:
    """``buf`` with header field ``field`` of the header at ``pos`` set to ``value`` (NUL-padded or cut)."""
    a, b = FIELDS[field]
    header = buf[pos : pos + BLOCK]
    header = header[:a] + value[: b - a].ljust(b - a, b"\0") + header[b:]
    if checksum:
        header = with_checksum(header)
    return buf[:pos] + header + buf[pos + BLOCK :]


def octal(n: int, width: int = 12) -> bytes:
    return b"%0*o\0" % (width - 1, n)


def replace_data(buf: bytes, pos: int, data: bytes) -> bytes:
    """``buf`` with the data of the member whose header is at ``pos`` replaced (size, checksum, padding fixed)."""
    size = int(buf[pos + 124 : pos + 136].strip(b"\0 ") or b"0", 8)
    end = pos + BLOCK + -(-size // BLOCK) * BLOCK
    padded = data + bytes(-len(data) % BLOCK)
    return set_field(buf[:pos] + buf[pos : pos + BLOCK] + padded + buf[end:], pos, "size", octal(len(data)))
