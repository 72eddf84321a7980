"""Finding input files and reading documents from them (shared by the shard builder and tokenizer training).

A plain text file is one document. A ``.jsonl`` file holds one JSON object per line whose ``text`` field
(configurable) is a document. Either may be gzip-compressed (``.gz``). Bytes that are not UTF-8 are
replaced (U+FFFD) and counted; empty documents are skipped and counted; jsonl lines that are not JSON
objects with a string text field are skipped and counted, the first few with a warning.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from bigtx.data.errors import DataError

log = logging.getLogger("bigtx.data")

_GLOB_CHARS = set("*?[")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_MAX_LINE_WARNINGS = 5
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    text_bytes: int = 0
    empty_docs: int = 0
    non_utf8_docs: int = 0
    bad_lines: int = 0
    warned: int = field(default=0, repr=False)

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

    Order follows the arguments; each glob or directory contributes its files sorted by name; duplicates
    are dropped. Raises ``DataError`` for a pattern that matches nothing.
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
            found = sorted(
                os.path.join(root, name)
                for root, dirs, names in os.walk(pat)
                for name in names
                if not name.startswith(".")
            )
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


def is_jsonl(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith(_JSONL_SUFFIXES)


def _open(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


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
        more = " (further bad lines are only counted)" if stats.warned == _MAX_LINE_WARNINGS else ""
        log.warning("%s: skipped: %s%s", where, why, more)


def iter_documents(files: Sequence[str], stats: ReadStats, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """Yield ``(source, text)`` for every non-empty document; ``source`` is ``path`` or ``path:line``."""
    for path in files:
        stats.files += 1
        try:
            if is_jsonl(path):
                yield from _jsonl_documents(path, stats, text_field)
            else:
                with _open(path) as f:
                    text = _clean(_decode(f.read(), stats), stats)
                if text.strip():
                    stats.documents += 1
                    yield path, text
                else:
                    stats.empty_docs += 1
        except (OSError, EOFError) as exc:  # unreadable file or broken gzip stream
            raise DataError(f"--input: cannot read {path}: {exc}") from None


def _jsonl_documents(path: str, stats: ReadStats, text_field: str) -> Iterator[tuple[str, str]]:
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
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
            yield where, text
