"""The hand-written tar/npy reader on malformed input: every defect is a ``CorruptShard`` with a message,
never a hang or another exception, and what it does read is what ``tarfile`` and ``np.load`` read."""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pytest

from bigtx.data.shards import CorruptShard, _npy_ids, iter_tar, parse_shard
from tests.unit.shard_cases import BLOCK, headers, npy, octal, replace_data, set_field, tar_bytes, time_limit

LONG = "k" * 120  # a key too long for the 100-byte name field: tarfile writes a pax (or GNU) long name


def parse(buf: bytes, what: str = "parse_shard"):
    with time_limit(2, what):
        return parse_shard(buf)


def tarfile_names(buf: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tf:
        return [m.name for m in tf.getmembers() if m.isreg()]


def pax_shard() -> bytes:
    return tar_bytes([(LONG + ".ids.npy", npy([1, 2, 3]))])


def record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def test_pax_record_of_length_zero_is_corrupt_not_a_hang():
    buf = bytearray(pax_shard())
    assert buf[BLOCK : BLOCK + 4] == b"138 "  # the record "138 path=kkk...k.ids.npy\n"
    buf[BLOCK : BLOCK + 3] = b"000"
    with pytest.raises(CorruptShard, match="bad pax header at byte 0: record length 0 is too short"):
        parse(bytes(buf))


@pytest.mark.parametrize(
    "records, message",
    [
        (b"-5 path=x\n", "record length b'-5' is not a number"),
        (b"abc path=x\n", "record length b'abc' is not a number"),
        (b"12path=a.b\n", "is not a number"),  # no space after the length
        (b"9" * 30 + b" path=x\n", "is not a number"),  # absurdly long length
        (b"3 path=x\n", "record length 3 is too short"),
        (b"99 path=x\n", "a record of 99 bytes runs past the header"),
        (b"10 path=xy", "is not 'key=value\\n'"),  # last byte is no newline
        (b"9 pathxy\n", "is not 'key=value"),  # no '='
        (b"6 =xy\n", "is not 'key=value"),  # empty key
        (record(b"path", b"ok.ids.npy") + b"junk", "record length b'junk' is not a number"),
        (record(b"size", b"12x"), "size b'12x' is not a number"),
        (record(b"size", b"9" * 30), "is not a number"),
        (record(b"path", b"\xff\xfe.ids.npy"), "member name at byte 0 is not UTF-8"),
    ],
)
def test_malformed_pax_records_are_corrupt(records, message):
    buf = replace_data(pax_shard(), 0, records)
    with pytest.raises(CorruptShard, match=re.escape(message)):
        parse(buf)


def test_pax_record_cut_by_the_header_size_is_corrupt():
    buf = pax_shard()
    with pytest.raises(CorruptShard, match="a record of 138 bytes runs past the header"):
        parse(set_field(buf, 0, "size", octal(100)))


def test_pax_records_read_like_tarfile():
    """Trailing NUL padding is allowed, a pax ``size`` overrides the header's, ``path`` loses trailing slashes."""
    ids = npy([4, 5, 6, 7])
    buf = tar_bytes([("a.ids.npy", ids)], pax={"comment": "x"})
    x = headers(buf)[0][0]
    records = record(b"path", LONG.encode() + b".ids.npy/") + record(b"size", b"%d" % len(ids)) + bytes(7)
    buf = replace_data(buf, x, records)
    member = headers(buf)[1][0]
    buf = set_field(buf, member, "size", octal(0))  # only the pax record knows the size now
    assert tarfile_names(buf) == [LONG + ".ids.npy"]
    data = parse(buf)
    assert data.keys == [LONG] and data.docs[0].tolist() == [4, 5, 6, 7]


def test_the_first_long_name_before_a_member_wins_as_in_tarfile():
    gnu = tar_bytes([(LONG + "1.ids.npy", npy([1]))], fmt=tarfile.GNU_FORMAT)  # an L header, then the member
    pax = tar_bytes([(LONG + "2.ids.npy", npy([1]))])  # an x header, then the member
    (l_pos, l_size, l_type), (m_pos, _, _) = headers(gnu)
    x_header = pax[: BLOCK + BLOCK]
    assert l_type == b"L" and headers(pax)[0][2] == b"x"
    for buf in (gnu[:m_pos] + x_header + gnu[m_pos:], x_header + gnu):  # L, x, member and x, L, member
        names = [name for name, _, _ in iter_tar(buf)]
        assert names == tarfile_names(buf)
        assert names[0].endswith("1.ids.npy" if buf.startswith(gnu[:BLOCK]) else "2.ids.npy")


def test_extended_header_without_a_member_is_corrupt():
    buf = pax_shard()
    cut = buf[: 2 * BLOCK] + bytes(2 * BLOCK)  # the x header, then the end-of-archive marker
    with pytest.raises(CorruptShard, match="the extended header before byte 1024 has no member"):
        parse(cut)


@pytest.mark.parametrize(
    "value, message",
    [
        (b"-0000000002", "size field"),  # int(..., 8) alone would take a sign
        (b"\xff" * 12, "size field"),  # GNU base-256 negative
        (b"1_0", "size field"),
        (b"0o17", "size field"),
        (b"\x80" + (10**20).to_bytes(11, "big"), r"truncated \(member at byte 0 needs 100000000000000000000 bytes"),
    ],
)
def test_bad_size_fields_are_corrupt(value, message):
    buf = tar_bytes([("a.ids.u16", np.arange(6, dtype="<u2").tobytes())], fmt=tarfile.USTAR_FORMAT)
    with pytest.raises(CorruptShard, match=message):
        parse(set_field(buf, 0, "size", value))


def test_gnu_base256_size_is_read():
    data = np.arange(6, dtype="<u2").tobytes()
    buf = tar_bytes([("a.ids.u16", data)], fmt=tarfile.USTAR_FORMAT)
    buf = set_field(buf, 0, "size", b"\x80" + len(data).to_bytes(11, "big"))
    assert parse(buf).docs[0].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("kind", [b"5", b"2", b"1"])
def test_directory_or_link_with_data_is_corrupt(kind):
    """tarfile reads no data after such an entry, the size field says there is some: the reading is ambiguous."""
    buf = tar_bytes([("a.ids.npy", npy([1, 2]))], fmt=tarfile.USTAR_FORMAT)
    with pytest.raises(CorruptShard, match=f"tar entry of type {kind!r} at byte 0 has 132 bytes of data"):
        parse(set_field(buf, 0, "type", kind))


def test_v7_directory_with_data_is_corrupt():
    buf = tar_bytes([("a.ids.npy", npy([1, 2]))], fmt=tarfile.USTAR_FORMAT)
    buf = set_field(set_field(buf, 0, "type", b"\0"), 0, "name", b"dir/")
    with pytest.raises(CorruptShard, match="type b'\\\\x00' at byte 0 has 132 bytes"):
        parse(buf)


def test_empty_directories_and_links_are_skipped():
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, kind in (("dir", tarfile.DIRTYPE), ("link.ids.npy", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "x" if kind == tarfile.SYMTYPE else ""
            tf.addfile(info)
        info = tarfile.TarInfo("dir/a.ids.npy")
        data = npy([7, 8])
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    data = parse(out.getvalue())
    assert data.keys == ["dir/a"] and data.docs[0].tolist() == [7, 8]


def test_sparse_member_is_corrupt():
    buf = tar_bytes([("a.ids.npy", npy([1, 2]))], fmt=tarfile.GNU_FORMAT)
    with pytest.raises(CorruptShard, match="sparse tar member at byte 0"):
        parse(set_field(buf, 0, "type", b"S"))


@pytest.mark.parametrize("field", ["name", "prefix"])
def test_non_utf8_member_name_is_corrupt_in_iter_tar_too(field):
    buf = tar_bytes([("a.ids.npy", npy([1]))], fmt=tarfile.USTAR_FORMAT)
    buf = set_field(buf, 0, field, b"\xff\xfe.ids.npy")
    for call in (parse_shard, lambda b: list(iter_tar(b))):
        with pytest.raises(CorruptShard, match="member name at byte 0 is not UTF-8"):
            call(buf)


def test_ustar_prefix_is_part_of_the_name():
    name = "d" * 80 + "/" + "e" * 60 + "/doc.ids.npy"
    buf = tar_bytes([(name, npy([3]))], fmt=tarfile.USTAR_FORMAT)
    assert buf[345] != 0  # tarfile split the name into prefix and name
    assert parse(buf).keys == [name[: -len(".ids.npy")]]


def test_two_id_members_in_one_sample_are_corrupt():
    buf = tar_bytes([("a.ids.npy", npy([1])), ("a.IDS.npy", npy([2]))])
    with pytest.raises(CorruptShard, match="sample 'a' has two ids.npy members"):
        parse(buf)


def npy_header(header: bytes, version: bytes = b"\x01\x00") -> bytes:
    """A .npy file with this header dict (padded as numpy pads it) and the bytes of uint16 [1, 2, 3]."""
    width = 2 if version[0] == 1 else 4
    header += b" " * (-(6 + 2 + width + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY" + version + len(header).to_bytes(width, "little") + header + bytes([1, 0, 2, 0, 3, 0])


GOOD = b"{'descr': '<u2', 'fortran_order': False, 'shape': (3,), }"


@pytest.mark.parametrize(
    "payload, message",
    [
        (npy_header(GOOD, b"\x01\x01"), "unknown .npy version 1.1"),
        (npy_header(GOOD, b"\x04\x00"), "unknown .npy version 4.0"),
        (npy_header(GOOD.replace(b"(3,)", b"(3)")), "not a 1-D integer array"),  # an int, not a tuple
        (npy_header(GOOD.replace(b"(3,)", b"(03,)")), "not a 1-D integer array"),  # no Python literal
        (npy_header(GOOD.replace(b"(3,)", b"(3, 1)")), "not a 1-D integer array"),
        (npy_header(GOOD.replace(b"(3,)", b"()")), "not a 1-D integer array"),
        (npy_header(GOOD.replace(b"(3,)", b"(" + b"7" * 5000 + b",)"), b"\x02\x00"), "not a 1-D integer array"),
        (npy_header(GOOD.replace(b"(3,)", b"(4611686018427387904,)")), r"size does not match its header"),
        (npy_header(GOOD.replace(b"<u2", b"<f2")), "not a 1-D integer array"),
        (npy_header(GOOD.replace(b"<u2", b"|O")), "not a 1-D integer array"),
        (npy_header(GOOD + b" x"), "not a 1-D integer array"),  # np.load refuses junk after the dict
        (npy_header(GOOD)[:9], "not a .npy file"),
        (npy_header(GOOD)[:20], "header of 118 bytes runs past the member's 20 bytes"),
        (npy_header(GOOD)[:-1], r"3 x 2 bytes; the data has 5"),
    ],
)
def test_bad_npy_members_are_corrupt(payload, message):
    for pad in (b"", b"\x00" * 200):  # alone, and followed by more bytes the header must not reach into
        with time_limit(2, "_npy_ids"), pytest.raises(CorruptShard, match=message):
            _npy_ids(payload + pad, 0, len(payload))


@pytest.mark.parametrize("descr", [b"<u2", b"|u1", b"<i8", b">u2", b"=u2", b"<u4", b"|i1"])
@pytest.mark.parametrize("version", [b"\x01\x00", b"\x02\x00", b"\x03\x00"])
@pytest.mark.parametrize("fortran", [b"False", b"True"])
def test_npy_variants_read_like_np_load(descr, version, fortran):
    dtype = np.dtype(descr.decode())
    values = np.array([1, 2, 3]).astype(dtype)
    header = GOOD.replace(b"<u2", descr).replace(b"False", fortran)
    payload = npy_header(header, version)[:-6] + values.tobytes()
    got = _npy_ids(payload, 0, len(payload))
    expected = np.load(io.BytesIO(payload))
    assert got.dtype.isnative and got.dtype.kind == dtype.kind and got.dtype.itemsize == dtype.itemsize
    assert got.tolist() == expected.tolist() == [1, 2, 3]
