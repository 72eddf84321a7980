"""The output directory of `bigtx export hf|safetensors` and `bigtx import hf`.

An export is built under a temporary name next to ``--out`` and renamed at the end, so an
interrupted export never leaves a directory that looks complete. Every finished export carries
``.bigtx-export.json`` (``MARKER``): what wrote it, the format, the source, the time and the files.

``--out`` may be a new path, an empty directory, or (with ``--overwrite``) an earlier export: a
directory with the marker that holds nothing but the files the marker lists. Anything else is
refused before any work is done, with or without ``--overwrite``: the source itself or a directory
that contains it, a path inside a checkpoint, a file, and any non-empty directory without the
marker (a run directory, a `bigtx data build` directory, an export from an older bigtx, ...).
Paths are compared after resolving symlinks and ``..``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bigtx
from bigtx.checkpoint.store import COMPLETE, META
from bigtx.export.types import ExportError
from bigtx.model.weights import SPEC_FILE

MARKER = ".bigtx-export.json"
MARKER_FORMAT = "bigtx-export"
MARKER_VERSION = 1

# What a directory without the marker looks like, for the refusal message (first match wins).
_LOOKS_LIKE = (
    ("checkpoints", "a bigtx run directory"),
    ("metrics.jsonl", "a bigtx run directory"),
    (COMPLETE, "a bigtx checkpoint"),
    (META, "a bigtx checkpoint"),
    ("index.json", "a `bigtx data build` directory"),
    (SPEC_FILE, "a bigtx run or weights directory"),
    ("config.json", "a Hugging Face model directory"),
)


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of the export directory ``path``; None when it has none or it is not bigtx's."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    files = marker.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return marker


def _entries(path: Path) -> set[str]:
    """Every file, directory and link below ``path`` (relative; links are not followed), except the marker."""
    found = set()
    for root, dirs, files in os.walk(path):
        here = Path(root).relative_to(path)
        found.update(str(here / name) for name in [*dirs, *files])
    return found - {MARKER}


def _looks_like(path: Path) -> str:
    for name, what in _LOOKS_LIKE:
        if (path / name).exists():
            return f"; it looks like {what} (it holds {name})"
    return ""


def check_output(out: Path, overwrite: bool, source: Path) -> Path:
    """The resolved ``out`` when an export may be written there (see the module docstring).

    Raises ``ExportError`` saying why not and what to do; never changes anything on disk.
    """
    final, src = out.resolve(), source.resolve()
    if final == src or final in src.parents:
        what = "is" if final == src else "contains"
        raise ExportError(
            f"--out {out}: {what} the source {source}; the export would replace it. Choose another directory"
        )
    for parent in final.parents:
        if (parent / COMPLETE).is_file() or (parent / META).is_file():
            raise ExportError(
                f"--out {out}: is inside the checkpoint {parent}, which bigtx deletes and copies as a whole; "
                "choose a directory outside it"
            )
    if not final.exists():
        return final
    if not final.is_dir():
        raise ExportError(f"--out {out}: is a file, not a directory; refusing to replace it. Choose a directory")
    if not any(final.iterdir()):
        return final
    marker = read_marker(final)
    if marker is None:
        raise ExportError(
            f"--out {out}: exists, is not empty and was not written by bigtx export (no {MARKER})"
            f"{_looks_like(final)}; refusing to replace it, with or without --overwrite. "
            "Choose a new or empty directory (an export made by an older bigtx has no marker: delete it yourself)"
        )
    unlisted = sorted(_entries(final) - set(marker["files"]))
    if unlisted:
        raise ExportError(
            f"--out {out}: holds files bigtx export did not write ({', '.join(unlisted[:5])}"
            f"{', ...' if len(unlisted) > 5 else ''}){_looks_like(final)}; refusing to replace it. "
            "Move them away or choose another directory"
        )
    if not overwrite:
        raise ExportError(
            f"--out {out}: holds an earlier export ({marker.get('kind')} of {marker.get('source')}, "
            f"{marker.get('created')}); pass --overwrite to replace it, or choose another directory"
        )
    return final


def write_marker(path: Path, kind: str, source: Path) -> None:
    """Write ``MARKER`` into the finished export ``path``, listing everything in it."""
    marker = {
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        "written_by": f"bigtx {bigtx.__version__}",
        "kind": kind,
        "source": str(source.resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": sorted(_entries(path)),
    }
    (path / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


@contextmanager
def staged_output(out: Path, overwrite: bool, kind: str, source: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` that becomes ``out`` (with ``MARKER``) when the block succeeds.

    ``out`` is checked first (``check_output``); ``kind`` (``hf``, ``safetensors``) and ``source``
    are recorded in the marker. An existing ``out`` is replaced only after the new export is complete.
    """
    final = check_output(out, overwrite, source)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        write_marker(tmp, kind, source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # mkdtemp and the safetensors writer create owner-only files; exports are meant to be shared
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    os.chmod(tmp, 0o755)
    if final.exists():  # an earlier export (check_output made sure): swap, then delete the old one
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
