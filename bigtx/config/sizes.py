"""Byte sizes as people write them on the command line: ``64MB``, ``512KiB``, ``1.5GB``, ``1000000``.

One rule for every option that takes a size (``data build --shard-size``, ``export --max-shard-size``):
KB/MB/GB/TB are powers of 1000 (as Hugging Face's ``max_shard_size``), KiB/MiB/GiB/TiB powers of
1024, units are case-insensitive, and a bare number (or ``B``) is bytes.
"""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
# ASCII digits with at most one decimal point; no sign, exponent, nan or inf
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", re.ASCII)
# larger sizes mean nothing on any disk and would overflow the 64-bit integers of file formats
MAX_SIZE = 2**63 - 1
_MAX_DIGITS = 40  # also keeps Fraction (and int) away from thousand-digit strings
EXAMPLES = "64MB, 500KB, 1.5GB, 512KiB or 1000000"


def parse_size(text: str) -> int:
    """Bytes in ``text``, rounded down to a whole byte.

    Raises ``ValueError`` quoting ``text`` and saying what is expected; callers add the option
    name, their own minimum and their own error type.
    """
    match = _SIZE.fullmatch(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. {EXAMPLES} (KB = 1000 bytes, KiB = 1024)")
    number, unit = match.groups()
    if len(number) > _MAX_DIGITS:
        raise ValueError(f"a size of {len(number)} digits is too large (at most {MAX_SIZE} bytes)")
    size = int(Fraction(number) * _UNITS[unit.lower()])  # exact: 2.01MB is 2010000 bytes (a float gives 2009999)
    if size > MAX_SIZE:
        raise ValueError(f"{text!r} is too large (at most {MAX_SIZE} bytes)")
    return size
