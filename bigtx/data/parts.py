"""`bigtx data build --part I/N` and `bigtx data merge`: a build split across processes or nodes.

Why parts do not write shards: a build's shard boundaries, sample keys (the document ordinal) and the
automatic shard size depend on every document before them, so a part cannot write final shards without
knowing the parts before it. Tokenizing is the expensive step, so a part does only that: it reads its
share of the inputs, tokenizes them and writes the token runs in input order. ``merge`` then streams
the parts in order through the same ``ShardSetWriter`` a single-process build uses, numbering documents
as it goes: the merged directory is byte for byte the single-process build of the same inputs (shards
and ``index.json``). Merging only copies tokens into tar files (no tokenizing, no JSON parsing).

The share of part I of N: the input files laid end to end are ``B`` bytes; part I owns bytes
``[(I-1)B/N, IB/N)``. An uncompressed ``.jsonl`` file is cut at those byte offsets (a part reads the lines
that start in its bytes); a ``.parquet`` file is cut between row groups (row group k, placed at the byte
``k``'s first row has in proportion, goes to the part owning that byte); any other file (text, ``.gz``,
``.zst``, ``.arrow``) goes whole to the part owning its first byte. One big jsonl or parquet file so
splits across parts; a part may get nothing.

A part directory holds::

    part.json    what was built: part, parts, the build settings and their sha256 ("plan"), the units
                 read (with the lines each jsonl unit spans, to number lines after the first unit), the
                 read statistics. Written last: its presence marks a complete part.
    tokens.bin   the documents' token ids, EOS-terminated, one after another (the index's dtype, little-endian)
    docs.bin     one record per document (``DOC_DTYPE``): tokens, characters, UTF-8 bytes, unit, record, split

``merge`` refuses parts of different plans (other inputs, tokenizer or options), a missing, duplicated or
incomplete part.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Iterator, Sequence

import numpy as np

import bigtx
from bigtx.data.build import (
    CHUNK_CHARS,
    CHUNK_DOCS,
    SPLITS,
    _encoded,
    _prepare_out_dir,
    auto_shard_size,
    chunk_documents,
    sample_ratio,
    tokenizer_record,
    write_index,
)
from bigtx.data.errors import DataError
from bigtx.data.inputs import KINDS, ReadStats, Unit, expand_inputs, is_compressed, kind_of, read_unit, whole
from bigtx.data.shards import ShardSetWriter, ids_dtype
from bigtx.data.tokenizer import load_tokenizer

PART_FORMAT = "bigtx-part"
PART_VERSION = 1
PART_NAME = "part.json"
DOC_DTYPE = np.dtype(
    [("tokens", "<i8"), ("chars", "<i8"), ("bytes", "<i8"), ("unit", "<i4"), ("record", "<i8"), ("split", "u1")]
)
_PART_SPEC = re.compile(r"([0-9]+)/([0-9]+)")
_PART_FILES = (PART_NAME, "tokens.bin", "docs.bin")
_BLOCK_DOCS = 1 << 16  # docs.bin records turned into Python values at a time


def parse_part(text: str) -> tuple[int, int]:
    """``--part I/N`` -> ``(I, N)`` with 1 <= I <= N."""
    m = _PART_SPEC.fullmatch(text.strip())
    if m is None:
        raise DataError(f"--part: {text!r} is not I/N (for example 1/4: the first of 4 parts)")
    part, parts = int(m.group(1)), int(m.group(2))
    if not 1 <= part <= parts:
        raise DataError(f"--part: {text!r}: I must be between 1 and N (parts are numbered from 1)")
    return part, parts


# --- the plan: which units part I of N reads --------------------------------------------------------------


def _owner(byte: int, total: int, parts: int) -> int:
    """The 0-based part whose bytes ``[k*total//parts, (k+1)*total//parts)`` hold ``byte`` (the last for the end)."""
    if byte >= total:
        return parts - 1
    k = byte * parts // total
    while k * total // parts > byte:
        k -= 1
    while (k + 1) * total // parts <= byte:
        k += 1
    return k


def _row_groups(path: str) -> list[int]:
    """Rows per row group of a parquet file (its footer only); ``DataError`` naming an unreadable file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"--input: cannot read {path}: {exc}") from None
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def plan_part(files: Sequence[str], sizes: Sequence[int], part: int, parts: int) -> list[Unit]:
    """The units part ``part`` (from 0) of ``parts`` reads, in input order (see the module docstring)."""
    total = sum(sizes)
    lo, hi = part * total // parts, (part + 1) * total // parts
    units: list[Unit] = []
    start = 0
    for path, size in zip(files, sizes):
        kind = kind_of(path)
        end = start + size
        if kind == "jsonl" and not is_compressed(path) and size > 0:
            a, b = max(lo, start), min(hi, end)
            if a < b:
                units.append(Unit(path, kind, a - start, None if b == end else b - start))
        elif kind == "parquet" and size > 0 and start < hi and end > lo:
            rows = _row_groups(path)
            total_rows = sum(rows)
            before = [0, *itertools.accumulate(rows)][: len(rows)]  # rows before each row group
            mine = [
                k for k, r in enumerate(before) if _owner(start + size * r // max(1, total_rows), total, parts) == part
            ]
            if mine:
                units.append(Unit(path, kind, mine[0], None if mine[-1] == len(rows) - 1 else mine[-1] + 1))
            elif not rows and _owner(start, total, parts) == part:
                units.append(whole(path))
        elif _owner(start, total, parts) == part:
            units.append(whole(path))
        start = end
    return units


# --- building one part ------------------------------------------------------------------------------------


def _plan_record(files: Sequence[str], sizes: Sequence[int], tok: dict, dtype, options: dict) -> dict:
    return {
        "inputs": [[p, s] for p, s in zip(files, sizes)],
        "tokenizer": tok,
        "dtype": np.dtype(dtype).name,
        "options": options,
        "created_by": f"bigtx {bigtx.__version__}",
    }


def _digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()


def _prepare_part_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out: {out_dir} is a file, not a directory")
    os.makedirs(out_dir, exist_ok=True)
    present = [n for n in _PART_FILES if os.path.lexists(os.path.join(out_dir, n))]
    if present and not overwrite:
        raise DataError(f"--out: {out_dir} already holds {', '.join(present)}; pass --overwrite to replace the part")
    for name in present:
        os.remove(os.path.join(out_dir, name))


def build_part(
    inputs: Sequence[str],
    tokenizer: str,
    out_dir: str,
    part: int,
    parts: int,
    *,
    shard_size: int | None = None,
    val_fraction: float = 0.01,
    workers: int = 1,
    text_field: str = "text",
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict:
    """Tokenize part ``part`` (from 1) of ``parts`` of the inputs into ``out_dir``; returns its ``part.json``
    (plus ``seconds``). Raises ``DataError``."""
    from tqdm import tqdm

    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction: {val_fraction} is not in [0, 1)")
    tok = load_tokenizer(tokenizer)
    files = expand_inputs(inputs)
    sizes = [os.path.getsize(f) for f in files]
    _prepare_part_dir(out_dir, overwrite)
    dtype = ids_dtype(tok.vocab_size)
    options = {"shard_size": shard_size, "val_fraction": val_fraction, "text_field": text_field}
    plan = _plan_record(files, sizes, tokenizer_record(tok, tokenizer), dtype, options)
    units = plan_part(files, sizes, part - 1, parts)
    stats = ReadStats()
    eos = np.array([tok.eos_id], dtype=dtype)
    start = time.perf_counter()
    docs = tokens = 0

    def documents() -> Iterator[tuple[tuple[int, int, int, int], str]]:
        """Documents with what merge needs of them as their source: unit, record, characters, UTF-8 bytes."""
        for u, unit in enumerate(units):
            for record, text in read_unit(unit, stats, text_field):
                yield (u, -1 if record is None else record, len(text), len(text.encode("utf-8"))), text

    disable = None if progress is None else not progress
    with (
        open(os.path.join(out_dir, "tokens.bin"), "wb") as tok_file,
        open(os.path.join(out_dir, "docs.bin"), "wb") as doc_file,
        tqdm(unit="B", unit_scale=True, unit_divisor=1000, desc=f"part {part}/{parts}", disable=disable) as bar,
    ):
        chunks = chunk_documents(documents())
        for sources, ids, splits, nbytes in _encoded(chunks, tokenizer, val_fraction, workers):
            meta = np.zeros(len(ids), DOC_DTYPE)
            for i, (source, doc, split) in enumerate(zip(sources, ids, splits)):
                run = np.concatenate([doc.astype(dtype, copy=False), eos]).astype(dtype.newbyteorder("<"), copy=False)
                tok_file.write(run.tobytes())
                unit, rec, chars, nbytes_doc = source
                meta[i] = (len(run), chars, nbytes_doc, unit, rec, SPLITS.index(split))
            doc_file.write(meta.tobytes())
            docs += len(ids)
            tokens += int(meta["tokens"].sum())
            stats.text_bytes += nbytes
            bar.update(nbytes)
    record = {
        "format": PART_FORMAT,
        "version": PART_VERSION,
        "part": part,
        "parts": parts,
        "plan_sha256": _digest(plan),
        "plan": plan,
        "units": [
            {"path": u.path, "kind": u.kind, "start": u.start, "end": u.end, "lines": stats.unit_lines.get(u, 0)}
            for u in units
        ],
        "documents": docs,
        "tokens": tokens,
        "stats": stats.as_dict(),
    }
    tmp = os.path.join(out_dir, PART_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, PART_NAME))
    return {**record, "seconds": time.perf_counter() - start}


# --- merging ----------------------------------------------------------------------------------------------


def _read_part(part_dir: str) -> dict:
    """The ``part.json`` of a complete part directory, checked against itself and its two data files;
    ``DataError`` naming what is wrong."""
    path = os.path.join(part_dir, PART_NAME)
    if not os.path.isfile(path):
        raise DataError(
            f"PARTS: {part_dir} holds no {PART_NAME} (not a `bigtx data build --part` output, or unfinished)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("format") != PART_FORMAT or record.get("version") != PART_VERSION:
            raise ValueError(f'no "format": "{PART_FORMAT}", "version": {PART_VERSION}')
        if _digest(record["plan"]) != record["plan_sha256"]:
            raise ValueError("its plan does not match its plan_sha256 (edited?)")
        dtype = np.dtype(record["plan"]["dtype"])
        for unit in record["units"]:
            if not (isinstance(unit["path"], str) and unit["kind"] in KINDS and isinstance(unit["lines"], int)):
                raise ValueError(f"bad unit {unit}")
        if not (isinstance(record["part"], int) and isinstance(record["parts"], int)):
            raise ValueError("part and parts must be integers")
        sizes = {"docs.bin": record["documents"] * DOC_DTYPE.itemsize, "tokens.bin": record["tokens"] * dtype.itemsize}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"PARTS: {path} is not a usable part record ({exc})") from None
    for name, size in sizes.items():
        file = os.path.join(part_dir, name)
        got = os.path.getsize(file) if os.path.isfile(file) else None
        if got != size:
            raise DataError(f"PARTS: {file} has {got} bytes, {PART_NAME} says {size} (damaged or incomplete part)")
    if record["documents"]:
        meta = np.memmap(os.path.join(part_dir, "docs.bin"), DOC_DTYPE, mode="r")
        if (
            int(meta["tokens"].sum()) != record["tokens"]
            or meta["tokens"].min() < 1
            or meta["unit"].min() < 0
            or meta["unit"].max() >= len(record["units"])
            or meta["split"].max() >= len(SPLITS)
        ):
            raise DataError(f"PARTS: {part_dir}/docs.bin does not match {PART_NAME} (damaged part)")
    return record


def _check_parts(part_dirs: Sequence[str], records: list[dict]) -> list[tuple[str, dict]]:
    """The parts in order 1..N, after checking they are all the parts of one plan, each once."""
    first_dir, first = part_dirs[0], records[0]
    by_number: dict[int, str] = {}
    for part_dir, record in zip(part_dirs, records):
        if record["plan_sha256"] != first["plan_sha256"] or record["parts"] != first["parts"]:
            raise DataError(
                f"PARTS: {part_dir} (part {record['part']}/{record['parts']}) and {first_dir} (part "
                f"{first['part']}/{first['parts']}) come from different builds (inputs, tokenizer, options or "
                "part count differ); build all parts with the same command, changing only --part and --out"
            )
        if record["part"] in by_number:
            raise DataError(
                f"PARTS: part {record['part']}/{record['parts']} given twice: {by_number[record['part']]}, {part_dir}"
            )
        by_number[record["part"]] = part_dir
    parts = first["parts"]
    missing = [str(i) for i in range(1, parts + 1) if i not in by_number]
    if missing:
        raise DataError(f"PARTS: missing part(s) {', '.join(missing)} of {parts}; merge needs every part")
    return [(by_number[i], records[part_dirs.index(by_number[i])]) for i in range(1, parts + 1)]


def _documents(parts: list[tuple[str, dict]], dtype: np.dtype) -> Iterator[tuple[str, np.ndarray, str, int, int]]:
    """``(source, ids, split, characters, bytes)`` of every document of the parts, in input order."""
    lines_before: dict[str, int] = {}  # jsonl lines in the earlier units of each file
    for part_dir, record in parts:
        sources = []
        for unit in record["units"]:
            path, offset = unit["path"], lines_before.get(unit["path"], 0)
            sources.append((path, offset if unit["kind"] == "jsonl" else 0))
            lines_before[path] = offset + unit["lines"]
        if not record["documents"]:
            continue
        meta = np.memmap(os.path.join(part_dir, "docs.bin"), DOC_DTYPE, mode="r")
        tokens = np.memmap(os.path.join(part_dir, "tokens.bin"), dtype.newbyteorder("<"), mode="r")
        pos = 0
        for block in range(0, len(meta), _BLOCK_DOCS):
            for n, chars, nbytes, unit, rec, split in meta[block : block + _BLOCK_DOCS].tolist():
                path, offset = sources[unit]
                source = path if rec < 0 else f"{path}:{rec + offset}"
                yield source, tokens[pos : pos + n], SPLITS[split], chars, nbytes
                pos += n


def merge_parts(part_dirs: Sequence[str], out_dir: str, *, overwrite: bool = False) -> dict:
    """Write the shards and ``index.json`` of the parts' build into ``out_dir``: the bytes a single-process
    ``build_shards`` of the same inputs and options writes. Returns the index (plus ``seconds``)."""
    if not part_dirs:
        raise DataError("PARTS: no part directory given")
    start = time.perf_counter()
    parts = _check_parts(part_dirs, [_read_part(d) for d in part_dirs])
    plan = parts[0][1]["plan"]
    files = [p for p, _ in plan["inputs"]]
    _prepare_out_dir(out_dir, overwrite, files)
    dtype = np.dtype(plan["dtype"])
    options = plan["options"]
    shard_size = options["shard_size"]
    docs = _documents(parts, dtype)
    first: list[tuple[str, np.ndarray, str, int, int]] = []
    if shard_size is None:  # measured on the first tokenization chunk of the whole input, as build_shards does
        chars = 0
        for doc in docs:
            first.append(doc)
            chars += doc[3]
            if chars >= CHUNK_CHARS or len(first) >= CHUNK_DOCS:
                break
        nbytes = sum(d[4] for d in first)
        ratio = sample_ratio([len(d[1]) for d in first], [d[0] for d in first], nbytes, dtype)
        input_bytes = sum(s for _, s in plan["inputs"])
        shard_size = auto_shard_size(input_bytes, ratio, options["val_fraction"])
    writers = {name: ShardSetWriter(out_dir, name, shard_size, dtype) for name in SPLITS}
    ordinal = 0
    for source, ids, split, _, _ in itertools.chain(first, docs):
        writers[split].write(f"{ordinal:010d}", ids, source)
        ordinal += 1
    stats = {key: sum(r["stats"][key] for _, r in parts) for key in parts[0][1]["stats"]}
    if ordinal == 0:  # (the writers opened no file)
        raise DataError(
            f"--input: no documents in {len(files)} file(s) "
            f"({stats['empty_docs_skipped']} empty documents and {stats['bad_lines_skipped']} bad records skipped)"
        )
    shards = {name: w.close() for name, w in writers.items()}
    index_options = {
        "shard_size": shard_size,
        "shard_size_auto": options["shard_size"] is None,
        "val_fraction": options["val_fraction"],
        "text_field": options["text_field"],
    }
    index = write_index(out_dir, plan["tokenizer"], dtype, shards, stats, index_options)
    return {**index, "seconds": time.perf_counter() - start}
