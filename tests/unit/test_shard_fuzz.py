"""Seeded fuzzing of the hand-written shard reader (``iter_tar``, ``parse_shard``, ``_npy_ids``, ``read_shard``).

Real shards (``ShardSetWriter``; ``webdataset.TarWriter``/``ShardWriter`` pax archives; GNU long names; ustar
prefixes; ids.npy of several dtypes and .npy versions, ids.u16, ids.u32) are damaged: byte flips, truncations,
insertions, deletions, and header rewrites with the checksum recomputed so the damage reaches the code
behind the checksum (size, type, name, prefix; npy version, header length, dtype, shape; pax records).
Each case must end, within a time limit, as a ``CorruptShard`` with a message or as a ``ShardData`` that is
sane, and equal to what ``tarfile`` and ``np.load`` read from the same bytes whenever ``tarfile`` reads
the whole archive.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds

from bigtx.data.shards import CorruptShard, ShardSetWriter, _npy_ids, _split_name, iter_tar, parse_shard, read_shard
from tests.unit.shard_cases import BLOCK, headers, octal, replace_data, set_field, tar_bytes, time_limit

SEED = 20240613
SHARD_CASES = 4000
NPY_CASES = 4000
FILE_CASES = 200  # through read_shard, from a file, with index metadata
LIMIT_S = 2.0  # per case; the slowest normal case takes milliseconds
LONG = "k" * 110


def npy_file(descr: str, version: tuple[int, int], values, fortran: bool = False, shape: str | None = None) -> bytes:
    dtype = np.dtype(descr)
    data = np.asarray(values).astype(dtype).tobytes()
    shape = f"({len(values)},)" if shape is None else shape
    header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}".encode()
    width = 2 if version[0] == 1 else 4
    header += b" " * (-(8 + width + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + len(header).to_bytes(width, "little") + header + data


def corpus(tmp_path) -> list[bytes]:
    rng = np.random.default_rng(SEED)
    shards = []
    for dtype in (np.uint16, np.uint32):
        writer = ShardSetWriter(str(tmp_path), f"s{np.dtype(dtype).itemsize}", 1 << 20, np.dtype(dtype))
        for i in range(5):
            writer.write(f"doc{i}", rng.integers(0, 1000, size=[0, 1, 7, 40, 300][i]), f"file{i}.txt:{i}")
        shards += [Path(tmp_path / s["name"]).read_bytes() for s in writer.close()]
    out = io.BytesIO()
    with wds.TarWriter(out) as sink:  # pax headers (float mtimes) before every member
        sink.write({"__key__": "a", "ids.npy": np.arange(9, dtype=np.uint16), "txt": "hello"})
        sink.write({"__key__": LONG, "ids.u16": np.arange(5, dtype="<u2").tobytes()})
        sink.write({"__key__": "c", "ids.u32": np.arange(3, dtype="<u4").tobytes(), "json": b"{}"})
    shards.append(out.getvalue())
    with wds.ShardWriter(str(tmp_path / "w-%06d.tar"), maxcount=2, verbose=0) as sink:
        for i in range(4):
            sink.write({"__key__": f"w{i}", "ids.npy": np.arange(i * 5, dtype=np.uint32)})
    shards += [Path(tmp_path / f"w-{i:06d}.tar").read_bytes() for i in range(2)]
    variants = [
        ("v1.ids.npy", npy_file("<u2", (1, 0), [1, 2, 3])),
        ("v2.ids.npy", npy_file("<i8", (2, 0), [4, 5])),
        ("v3.ids.npy", npy_file(">u2", (3, 0), [6, 7, 8])),
        ("v4.ids.npy", npy_file("|u1", (1, 0), [9], fortran=True)),
        ("v5.ids.npy", npy_file("<u4", (1, 0), [])),
    ]
    shards.append(tar_bytes([("d" * 90 + "/" + "e" * 50 + "/" + n, d) for n, d in variants], tarfile.USTAR_FORMAT))
    shards.append(tar_bytes([(LONG + n, d) for n, d in variants] + [(LONG + "x.ids.u16", b"\1\0")], tarfile.GNU_FORMAT))
    shards.append(tar_bytes(variants, tarfile.PAX_FORMAT, pax={"comment": "fuzz"}))
    return shards


# ---- mutations ---------------------------------------------------------------------------------------------------

SIZES = [b"-1", b"-0000000001", b"\xff" * 12, b"1_0", b" 17 ", b"+7", b"0x10", b"\x80" + b"\xff" * 11, b"77777777777"]
TYPES = list(b"0\x0012345677xXgLKSAD") + [0xFF, 0x20]
NAMES = [b"", b"a", b"..", b"x.ids.npy", b"a/b.ids.u16", b"d/", b"__key__", b"Y.IDS.NPY", b"\xff.ids.npy", b".ids.npy"]
DESCRS = ["<u2", ">u4", "|u1", "<i8", "=u2", "u2", "<f4", "<U3", "|b1", "<c8", "|O", "<u16", "<V2", "<m8", "<u3", "|i1"]
SHAPES = ["(3,)", "(-1,)", "()", "(3, 4)", "(3)", "(03,)", "(18446744073709551616,)", "(" + "9" * 5000 + ",)", "[3]"]


def mutate_bytes(rng, buf: bytes, heads) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "truncate", "insert", "delete"])
    b = bytearray(buf)
    used = min(len(b), heads[-1][0] + BLOCK + -(-heads[-1][1] // BLOCK) * BLOCK + 2 * BLOCK)  # tarfile pads to 10 KB
    if kind == "flip":
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.6:  # most headers are far apart: aim at them
                pos = heads[rng.integers(len(heads))][0] + int(rng.integers(BLOCK))
            else:
                pos = int(rng.integers(used))
            b[pos] ^= int(rng.integers(1, 256))
        return kind, bytes(b)
    pos = int(rng.integers(used + 1))
    if rng.random() < 0.5:
        pos -= pos % BLOCK
    if kind == "truncate":
        return kind, bytes(b[:pos])
    n = int(rng.choice([1, 7, 511, 512, 1024]))
    if kind == "insert":
        return kind, bytes(b[:pos]) + rng.bytes(n) + bytes(b[pos:])
    return kind, bytes(b[:pos] + b[pos + n :])


def mutate_header(rng, buf: bytes, heads) -> tuple[str, bytes]:
    pos, size, _ = heads[rng.integers(len(heads))]
    field = str(rng.choice(["size", "size", "type", "type", "name", "prefix", "magic", "mode", "checksum"]))
    if field == "size":
        choices = [octal(0), octal(size + int(rng.integers(-600, 600)) if size > 600 else int(rng.integers(600)))]
        value = (choices + [octal(1 << 33), rng.bytes(12)] + SIZES)[rng.integers(len(choices) + 2 + len(SIZES))]
    elif field == "type":
        value = bytes([TYPES[rng.integers(len(TYPES))]])
    elif field == "name":
        value = NAMES[rng.integers(len(NAMES))] if rng.random() < 0.8 else rng.bytes(int(rng.integers(1, 100)))
    elif field == "prefix":
        value = [b"", b"dir", b"\xc3", b"a/b"][rng.integers(4)] if rng.random() < 0.8 else rng.bytes(20)
    elif field == "magic":
        value = [b"ustar\x0000", b"ustar  \x00", bytes(8)][rng.integers(3)]
    elif field == "mode":
        value = [b"-1", b"abc", b"0000644\0"][rng.integers(3)]
    else:
        value = rng.bytes(8)
    return f"header {field}={value[:24]!r}", set_field(buf, pos, field, value, checksum=field != "checksum")


def mutate_npy(rng, buf: bytes, heads) -> tuple[str, bytes] | None:
    npys = [(p, s) for p, s, t in heads if buf[p + BLOCK : p + BLOCK + 6] == b"\x93NUMPY"]
    if not npys:
        return None
    pos, size = npys[rng.integers(len(npys))]
    payload = npy_payload(rng, buf[pos + BLOCK : pos + BLOCK + size])
    return f"npy at {pos}", replace_data(buf, pos, payload)


def npy_payload(rng, original: bytes) -> bytes:
    """A damaged version of the .npy file ``original``: a rewritten header part, or raw damage."""
    try:
        values = _npy_ids(original, 0, len(original)).tolist()
        part = rng.integers(8)
    except CorruptShard:  # damaged by an earlier step: only raw damage
        values, part = [], rng.integers(4, 8)
    descr, version, shape, fortran = "<u2", (1, 0), None, False
    if part == 0:
        descr = DESCRS[rng.integers(len(DESCRS))]
    elif part == 1:
        version = [(1, 1), (2, 0), (3, 0), (0, 0), (4, 0), (2, 7)][rng.integers(6)]
    elif part == 2:
        shape = SHAPES[rng.integers(len(SHAPES))]
    elif part == 3:
        fortran = True
        shape = f"({len(values) + int(rng.integers(-2, 3))},)"
    try:
        payload = npy_file(descr, version, values, fortran, shape) if part < 4 else original
    except (TypeError, ValueError):  # a dtype numpy cannot store these values in: keep the original bytes
        payload = original
    b = bytearray(payload)
    if part == 4:  # the header length field
        width = 2 if b[6] == 1 else 4
        b[8 : 8 + width] = int(rng.integers(0, 1 << (8 * width))).to_bytes(width, "little")
    elif part == 5:  # bytes of the header text
        for _ in range(rng.integers(1, 3)):
            b[int(rng.integers(6, min(len(b), 128)))] = int(rng.choice(list(b" (),:'{}0123456789\n\0")))
    elif part == 6:
        b = b[: rng.integers(len(b) + 1)]
    elif part == 7:
        b += rng.bytes(int(rng.integers(1, 9)))
    return bytes(b)


def mutate_pax(rng, buf: bytes, heads) -> tuple[str, bytes] | None:
    pax = [(p, s) for p, s, t in heads if t in (b"x", b"g")]
    if not pax:
        return None
    pos, size = pax[rng.integers(len(pax))]
    records = bytearray(buf[pos + BLOCK : pos + BLOCK + size])
    choice = rng.integers(7)
    if choice == 0:  # the first record's length
        space = records.index(b" ")
        records[:space] = [b"0", b"-5", b"abc", b"99999", b"", b"1" * 25, b"%d" % (space + 1)][rng.integers(7)]
    elif choice == 1:  # a newline
        records[records.index(b"\n")] = int(rng.choice(list(b" x\0")))
    elif choice == 2:
        records += [b"12 path=\xff\xfe\n", b"9 size=x\n", b"6 =xy\n", b"5 path\n", b"8 size=3\n"][rng.integers(5)]
    elif choice == 3:
        records += bytes(int(rng.integers(1, 40)))
    elif choice == 4:
        records = records[: rng.integers(len(records) + 1)]
    elif choice == 5:
        records[rng.integers(len(records))] ^= int(rng.integers(1, 256))
    else:
        records = bytearray(b"%d path=%s\n" % (len(b"00 path=\n") + 1, b"z"))
    return f"pax {bytes(records[:30])!r}", replace_data(buf, pos, bytes(records))


def mutate(rng, buf: bytes) -> tuple[str, bytes]:
    """A damaged copy of ``buf`` and what was done; sometimes two steps (when the first leaves it walkable)."""
    steps: list[str] = []
    for _ in range(1 if rng.random() < 0.8 else 2):
        try:
            heads = headers(buf)
        except ValueError:  # too damaged by the first step for header surgery
            break
        kind = rng.integers(6)
        result = None
        if kind == 2:
            result = mutate_npy(rng, buf, heads)
        elif kind == 3:
            result = mutate_pax(rng, buf, heads)
        elif kind in (4, 5):
            result = mutate_header(rng, buf, heads)
        if result is None:
            result = mutate_bytes(rng, buf, heads)
        steps.append(result[0])
        buf = result[1]
    return " + ".join(steps), buf


# ---- oracles -----------------------------------------------------------------------------------------------------


def tarfile_members(buf: bytes) -> list[tuple[str, bytes]] | None:
    """The regular members ``tarfile`` reads, or None if it refuses the archive or stops before its end marker."""
    try:
        with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tf:
            members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isreg()]
            complete = buf[tf.offset : tf.offset + BLOCK] == bytes(BLOCK)
    except tarfile.TarError:
        return None
    return members if complete else None


def reference_docs(buf: bytes, members) -> tuple[list[str], list[np.ndarray]]:
    """Samples grouped by parse_shard's rule, decoded by numpy itself."""
    samples: list[tuple[str, dict]] = []
    for name, start, end in members:
        parts = _split_name(name)
        if parts is None or name.rsplit("/", 1)[-1].startswith("__"):
            continue
        if not samples or samples[-1][0] != parts[0]:
            samples.append((parts[0], {}))
        samples[-1][1][parts[1]] = buf[start:end]
    docs = []
    for _, fields in samples:
        if "ids.npy" in fields:
            docs.append(np.load(io.BytesIO(fields["ids.npy"]), allow_pickle=False))
        else:
            docs.append(np.frombuffer(fields.get("ids.u16", b""), "<u2") if "ids.u16" in fields else None)
            if docs[-1] is None:
                docs[-1] = np.frombuffer(fields["ids.u32"], "<u4")
    return [k for k, _ in samples], docs


def check_sane(data, buf: bytes, with_sources: bool, members) -> None:
    """Matching lists of keys and 1-D native integer arrays; every array that is a view lies inside the data
    of one member (not in a header, not across members)."""
    assert len(data.keys) == len(data.docs)
    assert (data.sources is not None and len(data.sources) == len(data.docs)) == with_sources
    whole = np.frombuffer(buf, np.uint8)
    lo = whole.__array_interface__["data"][0]
    for key, doc in zip(data.keys, data.docs):
        assert isinstance(key, str) and key
        assert isinstance(doc, np.ndarray) and doc.ndim == 1
        assert doc.dtype.kind in "iu" and doc.dtype.isnative and doc.dtype.itemsize in (1, 2, 4, 8)
        if np.shares_memory(doc, whole):
            at = doc.__array_interface__["data"][0] - lo
            assert any(s <= at and at + doc.nbytes <= e for _, s, e in members), (key, at, doc.nbytes)


def check(buf: bytes, with_sources: bool, outcomes: Counter) -> None:
    try:
        members = list(iter_tar(buf))
    except CorruptShard as exc:
        assert str(exc)
        members = None
    try:
        data = parse_shard(buf, with_sources)
    except CorruptShard as exc:
        assert str(exc)
        outcomes["corrupt"] += 1
        return
    assert members is not None
    check_sane(data, buf, with_sources, members)
    outcomes["parsed"] += 1
    expected = tarfile_members(buf)
    if expected is None:
        return
    assert [(name, buf[s:e]) for name, s, e in members] == expected
    keys, docs = reference_docs(buf, members)
    assert data.keys == keys
    for got, want in zip(data.docs, docs):
        assert got.tolist() == want.tolist()
        assert (got.dtype.kind, got.dtype.itemsize) == (want.dtype.kind, want.dtype.itemsize)
    outcomes["parsed and equal to tarfile + np.load"] += 1


def run_case(what: str, fn, *args):
    try:
        with time_limit(LIMIT_S, what):
            return fn(*args)
    except AssertionError:
        raise
    except Exception as exc:  # any other exception type is a reader bug: name the case that found it
        raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc


def test_damaged_shards_parse_or_are_corrupt(tmp_path):
    rng = np.random.default_rng(SEED)
    shards = corpus(tmp_path)
    for buf in shards:  # the undamaged corpus parses, and as tarfile + numpy read it
        check(buf, True, Counter())
    outcomes: Counter = Counter()
    for i in range(SHARD_CASES):
        what, buf = mutate(rng, shards[i % len(shards)])
        run_case(f"case {i} of seed {SEED} ({what})", check, buf, bool(i % 2), outcomes)
    # The fuzzer must reach both ends, and compare many parsed cases against tarfile and numpy.
    assert outcomes["corrupt"] > SHARD_CASES // 4, outcomes
    assert outcomes["parsed and equal to tarfile + np.load"] > SHARD_CASES // 10, outcomes


def npy_case(buf: bytes, start: int, end: int) -> bool:
    """True if ``_npy_ids`` reads ``buf[start:end]``, and then exactly as ``np.load`` does."""
    try:
        got = _npy_ids(buf, start, end)
    except CorruptShard as exc:
        assert str(exc)
        return False
    want = np.load(io.BytesIO(buf[start:end]), allow_pickle=False)  # numpy must read what we read
    assert got.ndim == 1 and got.dtype.isnative and got.tolist() == want.tolist()
    assert (got.dtype.kind, got.dtype.itemsize) == (want.dtype.kind, want.dtype.itemsize)
    return True


def test_damaged_npy_members_read_like_np_load():
    rng = np.random.default_rng(SEED + 1)
    kinds = [("<u2", (1, 0), 5), ("<u4", (2, 0), 1), (">u2", (3, 0), 9), ("|u1", (1, 0), 0), ("<i8", (1, 0), 3)]
    originals = [npy_file(d, v, rng.integers(0, 100, size=n)) for d, v, n in kinds]
    accepted = 0
    for i in range(NPY_CASES):
        payload = npy_payload(rng, originals[i % len(originals)])
        # Bytes around the member, which the header must not reach into.
        pre, post = rng.bytes(int(rng.integers(0, 3)) * 37), rng.bytes(int(rng.integers(0, 3)) * 64)
        what = f"npy case {i} of seed {SEED + 1} ({payload[:80]!r})"
        accepted += run_case(what, npy_case, pre + payload + post, len(pre), len(pre) + len(payload))
    assert NPY_CASES // 10 < accepted < NPY_CASES * 9 // 10


def file_case(path: str, buf: bytes, sha: str | None, size: int | None, outcomes: Counter) -> None:
    try:
        data = read_shard(path, sha, None, size, with_sources=True)
    except CorruptShard as exc:
        assert str(exc)
        outcomes["corrupt"] += 1
    else:
        check_sane(data, buf, True, list(iter_tar(buf)))
        outcomes["parsed"] += 1


def test_damaged_shard_files_through_read_shard(tmp_path):
    rng = np.random.default_rng(SEED + 2)
    shards = corpus(tmp_path)
    path = tmp_path / "case.tar"
    outcomes: Counter = Counter()
    for i in range(FILE_CASES):
        what, buf = mutate(rng, shards[i % len(shards)])
        path.write_bytes(buf)
        sha = hashlib.sha256(buf).hexdigest() if rng.random() < 0.5 else None
        size = len(buf) if rng.random() < 0.5 else None
        run_case(f"file case {i} of seed {SEED + 2} ({what})", file_case, str(path), buf, sha, size, outcomes)
    assert outcomes["corrupt"] and outcomes["parsed"], outcomes
