"""Finding input files and reading documents from them (shared by the shard builder and tokenizer training).

Input kinds, by file name:

- a plain text file is one document (source ``path``);
- a ``.jsonl`` (``.ndjson``) file holds one JSON object per line whose ``text`` field (configurable) is a
  document (source ``path:line``);
- either may be gzip- (``.gz``) or zstandard-compressed (``.zst``, read as one stream across frames);
- a ``.parquet`` file: its string column ``text`` (configurable), read one row group at a time (source
  ``path:row``, rows counted from 1);
- an ``.arrow`` file (Arrow IPC stream or file format) likewise, one record batch at a time; a directory
  holding ``state.json`` is a Hugging Face ``datasets`` ``save_to_disk`` directory, read as the
  ``.arrow`` files its ``state.json`` lists, in that order (``datasets`` itself is not needed).

Bad input: bytes that are not UTF-8 are replaced (U+FFFD) and counted; empty documents are skipped and
counted; records that are not documents (a jsonl line that is not a JSON object with a string text field,
a null parquet/arrow value) are skipped and counted as bad records, the first few with a warning. A file
that cannot be read as its kind (a broken gzip/zstd stream, a truncated parquet or arrow file, a parquet
or arrow file without a string text column) stops the build with a ``DataError`` naming the file.

``Unit`` is the piece of a file one reader reads: a whole file, a byte range of an uncompressed jsonl
file (the lines that start inside it) or a range of a parquet file's row groups; ``--part`` builds
(``bigtx.data.parts``) divide the inputs into units.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from bigtx.data.errors import DataError

log = logging.getLogger("bigtx.data")

_GLOB_CHARS = set("*?[")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_COMPRESSED = (".gz", ".zst")
_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # continuation token + zero length: an IPC stream's end
_READ_ROWS = 4096  # parquet/arrow rows per batch: bounded memory even for row groups of long documents
_MAX_LINE_WARNINGS = 5
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    text_bytes: int = 0
    empty_docs: int = 0
    non_utf8_docs: int = 0
    bad_lines: int = 0  # bad records: jsonl lines, null parquet/arrow values
    warned: int = field(default=0, repr=False)
    unit_lines: dict[Unit, int] = field(default_factory=dict, repr=False)  # lines (blank ones too) per jsonl unit read

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "documents": self.documents,
            "text_bytes": self.text_bytes,
            "empty_docs_skipped": self.empty_docs,
            "non_utf8_docs": self.non_utf8_docs,
            "bad_lines_skipped": self.bad_lines,
        }


def expand_inputs(patterns: Sequence[str], what: str = "--input") -> list[str]:
    """Files named by paths, globs (``**`` recursive) and directories (all files below, sorted).

    Order follows the arguments; each glob or directory contributes its files sorted by name; a
    Hugging Face dataset directory (one holding ``state.json``) contributes the ``.arrow`` files its
    ``state.json`` lists, in that order; duplicates are dropped. Raises ``DataError`` for a pattern that
    matches nothing and for a dataset directory whose ``state.json`` cannot be used.
    """
    if not patterns:
        raise DataError(f"{what}: no input given")
    files: list[str] = []
    seen: set[str] = set()
    for pat in patterns:
        if _GLOB_CHARS & set(pat):
            found = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataError(f"{what}: {pat!r} matches no files")
        elif os.path.isdir(pat):
            found = _directory_files(pat, what)
            if not found:
                raise DataError(f"{what}: directory {pat!r} holds no files")
        elif os.path.isfile(pat):
            found = [pat]
        else:
            raise DataError(f"{what}: no such file or directory: {pat!r}")
        for p in found:
            if p not in seen:
                seen.add(p)
                files.append(p)
    return files


def _directory_files(top: str, what: str) -> list[str]:
    """The files below ``top`` sorted by path (hidden names skipped); a dataset directory's files sort as
    the directory does, in their ``state.json`` order."""
    found: list[tuple[str, int, str]] = []
    for root, dirs, names in os.walk(top):
        if "state.json" in names:  # a datasets save_to_disk directory: its metadata files are no documents
            dirs.clear()
            found.extend((os.path.join(root, ""), i, p) for i, p in enumerate(dataset_files(root, what)))
            continue
        if "dataset_dict.json" in names:
            split = os.path.join(root, min(dirs, default="train"))
            raise DataError(
                f"{what}: {root} is a Hugging Face DatasetDict (splits {', '.join(sorted(dirs))}); "
                f"name the split to build from, e.g. {split}"
            )
        found.extend((p, 0, p) for p in (os.path.join(root, n) for n in names if not n.startswith(".")))
    return [p for _, _, p in sorted(found)]


def dataset_files(directory: str, what: str = "--input") -> list[str]:
    """The ``.arrow`` files of a ``datasets`` ``save_to_disk`` directory, in the order ``state.json`` lists them."""
    state = os.path.join(directory, "state.json")
    bad = f"{what}: {state} is not a Hugging Face datasets state.json"
    try:
        with open(state, encoding="utf-8") as f:
            listed = json.load(f)["_data_files"]
        names = [entry["filename"] for entry in listed]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{bad} ({exc})") from None
    except (KeyError, TypeError):
        raise DataError(f'{bad} (no "_data_files" list of {{"filename": ...}})') from None
    for name in names:
        if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".arrow"):
            raise DataError(f"{bad}: it lists {name!r}, not an .arrow file name in that directory")
    files = [os.path.join(directory, name) for name in names]
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{what}: {state} lists {missing[0]}, which does not exist (an incomplete copy?)")
    return files


def _base(path: str) -> str:
    """The file name without a compression suffix."""
    for suffix in _COMPRESSED:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


KINDS = ("text", "jsonl", "parquet", "arrow")


def kind_of(path: str) -> str:
    """``text``, ``jsonl``, ``parquet`` or ``arrow``: how ``path`` is read."""
    name = _base(path)
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".arrow"):
        return "arrow"
    return "text"


def is_jsonl(path: str) -> bool:
    return kind_of(path) == "jsonl"


def is_compressed(path: str) -> bool:
    return path.endswith(_COMPRESSED)


@dataclass(frozen=True)
class Unit:
    """What one reader reads of ``path``: all of it, or (``kind`` jsonl, uncompressed) the lines starting in
    bytes ``[start, end)``, or (parquet) row groups ``[start, end)``. ``end`` None: to the end of the file."""

    path: str
    kind: str
    start: int = 0
    end: int | None = None

    @property
    def first(self) -> bool:
        """The unit that begins its file (it counts the file in ``ReadStats.files``)."""
        return self.start == 0


def whole(path: str) -> Unit:
    return Unit(path, kind_of(path))


def _open(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 16)
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a ``.zst`` file, frame after frame (pzstd and appended chunks write several).

    A file that ends inside a frame raises ``zstandard.ZstdError``: zstandard's own ``stream_reader``
    returns what it decoded so far as if it were all, which would silently lose documents."""

    def __init__(self, path: str):
        import zstandard

        self._zstd = zstandard
        self._file = open(path, "rb")
        self._frame = None
        self._out = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._out:
            data = self._file.read(1 << 16)
            if not data:
                if self._frame is not None and not self._frame.eof:
                    raise self._zstd.ZstdError("truncated: the file ends inside a zstd frame")
                return 0
            while data:
                if self._frame is None or self._frame.eof:
                    self._frame = self._zstd.ZstdDecompressor().decompressobj()
                self._out += self._frame.decompress(data)
                data = self._frame.unused_data if self._frame.eof else b""
        n = min(len(buf), len(self._out))
        buf[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _decode(raw: bytes, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.non_utf8_docs += 1
        return raw.decode("utf-8", errors="replace")


def _clean(text: str, stats: ReadStats) -> str:
    """Lone surrogates (possible via JSON escapes) cannot be encoded: replace them and count the document."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        stats.non_utf8_docs += 1
        text = _SURROGATE.sub("\ufffd", text)
    return text


def _bad_line(stats: ReadStats, where: str, why: str) -> None:
    stats.bad_lines += 1
    if stats.warned < _MAX_LINE_WARNINGS:
        stats.warned += 1
        more = " (further bad records are only counted)" if stats.warned == _MAX_LINE_WARNINGS else ""
        log.warning("%s: skipped: %s%s", where, why, more)


def iter_documents(files: Sequence[str], stats: ReadStats, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """Yield ``(source, text)`` for every non-empty document; ``source`` is ``path`` or ``path:line`` (``path:row``)."""
    for path in files:
        for record, text in read_unit(whole(path), stats, text_field):
            yield (path if record is None else f"{path}:{record}"), text


def read_unit(unit: Unit, stats: ReadStats, text_field: str = "text") -> Iterator[tuple[int | None, str]]:
    """Yield ``(record, text)`` for every non-empty document of ``unit``. ``record``: None for a text file,
    the line number for jsonl (counted from the unit's first line: the file's line number when
    ``unit.start`` is 0), the row number in the file for parquet and arrow (from 1).

    Raises ``DataError`` naming the file when it cannot be read as its kind."""
    if unit.first:
        stats.files += 1
    readers = {"text": _text_documents, "jsonl": _jsonl_documents, "parquet": _parquet_documents}
    reader = readers.get(unit.kind, _arrow_documents)
    try:
        yield from reader(unit, stats, text_field)
    except (OSError, EOFError) as exc:  # unreadable file or broken gzip stream
        raise DataError(f"--input: cannot read {unit.path}: {exc}") from None
    except Exception as exc:
        if isinstance(exc, _library_errors()):  # a truncated parquet/arrow file, a corrupt zstd stream
            raise DataError(f"--input: cannot read {unit.path}: {exc}") from None
        raise


def _library_errors() -> tuple[type[BaseException], ...]:
    """The read errors of the format libraries imported so far (each is imported on first use of its format)."""
    errors: list[type[BaseException]] = []
    if "pyarrow" in sys.modules:
        errors.append(sys.modules["pyarrow"].ArrowException)
    if "zstandard" in sys.modules:
        errors.append(sys.modules["zstandard"].ZstdError)
    return tuple(errors)


def _text_documents(unit: Unit, stats: ReadStats, text_field: str) -> Iterator[tuple[int | None, str]]:
    with _open(unit.path) as f:
        text = _clean(_decode(f.read(), stats), stats)
    if text.strip():
        stats.documents += 1
        yield None, text
    else:
        stats.empty_docs += 1


def _lines(unit: Unit, f) -> Iterator[bytes]:
    """The lines of ``f`` that start in bytes ``[unit.start, unit.end)``, the last one's newline included."""
    if unit.start == 0 and unit.end is None:
        yield from f
        return
    pos = unit.start
    if pos > 0:  # the line running across the boundary belongs to the unit before: skip through its newline
        f.seek(pos - 1)
        pos += len(f.readline()) - 1
    end = float("inf") if unit.end is None else unit.end
    while pos < end:
        raw = f.readline()
        if not raw:
            return
        pos += len(raw)
        yield raw


def _jsonl_documents(unit: Unit, stats: ReadStats, text_field: str) -> Iterator[tuple[int | None, str]]:
    path = unit.path
    lineno = 0
    try:
        with _open(path) as f:
            for raw in _lines(unit, f):
                lineno += 1
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}" if unit.first else f"{path}: line {lineno} after byte {unit.start}"
                try:
                    obj = json.loads(_decode(raw, stats))
                except json.JSONDecodeError as exc:
                    _bad_line(stats, where, f"not valid JSON ({exc.msg})")
                    continue
                if not isinstance(obj, dict) or text_field not in obj:
                    _bad_line(stats, where, f"no {text_field!r} field")
                    continue
                text = obj[text_field]
                if not isinstance(text, str):
                    _bad_line(stats, where, f"field {text_field!r} is {type(text).__name__}, not a string")
                    continue
                text = _clean(text, stats)
                if not text.strip():
                    stats.empty_docs += 1
                    continue
                stats.documents += 1
                yield lineno, text
    finally:
        stats.unit_lines[unit] = lineno


def _text_column(path: str, schema, text_field: str) -> int:
    """Index of the string column ``text_field`` of an Arrow schema; ``DataError`` naming the file otherwise."""
    import pyarrow as pa

    index = schema.get_field_index(text_field)
    if index < 0:
        names = ", ".join(schema.names[:10]) + (", ..." if len(schema.names) > 10 else "")
        raise DataError(f"--input: {path} has no column {text_field!r} (it has: {names}); set --text-field")
    kind = schema.field(index).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"):
        raise DataError(f"--input: {path}: column {text_field!r} is {kind}, not a string column; set --text-field")
    return index


def _column_documents(path: str, batches, first_row: int, stats: ReadStats) -> Iterator[tuple[int | None, str]]:
    row = first_row
    for column in batches:
        for value in column.to_pylist():
            row += 1
            if value is None:
                _bad_line(stats, f"{path}:{row}", "null text")
                continue
            text = _clean(value, stats)
            if not text.strip():
                stats.empty_docs += 1
                continue
            stats.documents += 1
            yield row, text


def _parquet_documents(unit: Unit, stats: ReadStats, text_field: str) -> Iterator[tuple[int | None, str]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(unit.path) as pf:
        _text_column(unit.path, pf.schema_arrow, text_field)
        meta = pf.metadata
        end = meta.num_row_groups if unit.end is None else unit.end
        first_row = sum(meta.row_group(i).num_rows for i in range(unit.start))
        groups = list(range(unit.start, end))
        if not groups:
            return
        # by row group and batch: never more than one batch of one column in memory
        batches = (b.column(0) for b in pf.iter_batches(batch_size=_READ_ROWS, row_groups=groups, columns=[text_field]))
        yield from _column_documents(unit.path, batches, first_row, stats)


def _arrow_documents(unit: Unit, stats: ReadStats, text_field: str) -> Iterator[tuple[int | None, str]]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(unit.path) as source:  # datasets writes the stream format; the file format is also read
        is_file = source.read(6) == b"ARROW1"
        size = source.size()
        if not is_file and size >= 8:
            source.seek(size - 8)
            # A stream cut between two record batches reads as a shorter, complete one; the end-of-stream
            # marker that writers (datasets' included) put last tells the two apart.
            if source.read(8) != _ARROW_EOS:
                raise DataError(f"--input: cannot read {unit.path}: truncated (no Arrow end-of-stream marker)")
        source.seek(0)
        reader = ipc.open_file(source) if is_file else ipc.open_stream(source)
        index = _text_column(unit.path, reader.schema, text_field)
        if is_file:
            batches = (reader.get_batch(i).column(index) for i in range(reader.num_record_batches))
        else:
            batches = (batch.column(index) for batch in reader)
        yield from _column_documents(unit.path, batches, 0, stats)
