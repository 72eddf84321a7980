"""One reading of byte sizes for every option that takes one (bigtx.config.sizes)."""

from __future__ import annotations

import re

import pytest

from bigtx.config.sizes import MAX_SIZE, parse_size
from bigtx.data import DataError
from bigtx.data.build import parse_size as shard_size
from bigtx.export import ExportError
from bigtx.export.writer import max_shard_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1000000", 1_000_000),
        ("0", 0),
        ("64MB", 64_000_000),
        ("64mb", 64_000_000),
        ("64 Mb", 64_000_000),
        ("  200KB ", 200_000),
        ("5GB", 5_000_000_000),
        ("2TB", 2 * 10**12),
        ("512KiB", 512 * 1024),
        ("512kib", 512 * 1024),
        ("1.5GiB", 3 << 29),
        ("2TiB", 2 << 40),
        ("10B", 10),
        ("0.5KB", 500),
        (".5KB", 500),
        ("3.", 3),
        ("1.9999", 1),  # rounded down to whole bytes
        ("2.01MB", 2_010_000),  # exact: through a float it would be 2009999
        ("9223372036854775807", MAX_SIZE),
    ],
)
def test_sizes_in_both_unit_systems(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "MB",
        "-5MB",
        "+5MB",
        "1.5.5GB",
        "12XB",
        "12 parsecs",
        "nan",
        "inf",
        "1e3MB",  # no exponents: 1e3MB reads too easily as 1 exabyte-something
        "1,000",
        "5 G",  # single-letter units are refused: G could mean 10**9 or 2**30
        "5M",
        "5k",
        "٣MB",  # non-ASCII digits
        "5 MB MB",
        "0x10",
    ],
)
def test_bad_sizes_raise_value_error_quoting_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"cannot read {text!r} as a size; write e.g. 64MB")):
        parse_size(text)


def test_huge_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_size("9223372036854775808")
    with pytest.raises(ValueError, match="too large"):
        parse_size("100000000TiB")
    with pytest.raises(ValueError, match="^a size of 5000 digits is too large"):
        parse_size("9" * 5000)


def test_callers_add_their_option_name_error_type_and_minimum() -> None:
    # the same text means the same bytes for `data build --shard-size` and `export --max-shard-size`
    for text in ("64MB", "1.5GiB", "8192", "2TB"):
        assert shard_size(text) == max_shard_bytes(text) == parse_size(text)
    with pytest.raises(DataError, match=r"^--shard-size: cannot read '12XB'"):
        shard_size("12XB")
    with pytest.raises(DataError, match=r"^--shard-size: '4095' is below the 4 KiB minimum"):
        shard_size("4095")
    assert shard_size("4KiB") == 4096
    with pytest.raises(ExportError, match=r"^--max-shard-size: cannot read '1e3MB'"):
        max_shard_bytes("1e3MB")
    with pytest.raises(ExportError, match=r"^--max-shard-size '0.1': must be positive"):
        max_shard_bytes("0.1")
    with pytest.raises(ExportError, match=r"^--max-shard-size: '99999999TiB' is too large"):
        max_shard_bytes("99999999TiB")
