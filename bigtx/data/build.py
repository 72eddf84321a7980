"""`bigtx data build`: text files -> tokenized WebDataset shards + ``index.json``.

Documents are read in input order (see ``bigtx.data.inputs``), tokenized in parallel worker processes
in chunks, EOS-terminated, and routed to the train or val split by a hash of their text (so exact
duplicates always land in the same split and the split does not depend on file names or order).
Each split is written by one ``ShardSetWriter`` in input order; the key of a document is its ordinal
among the non-empty input documents. The output directory is a pure function of the input bytes, the
tokenizer and the options: same input, byte-identical shards and index.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

import bigtx
from bigtx.config import sizes
from bigtx.data.errors import DataError
from bigtx.data.inputs import ReadStats, expand_inputs, is_compressed, iter_documents, kind_of
from bigtx.data.shards import ShardSetWriter, ids_dtype, npy_bytes, sample_bytes
from bigtx.data.tokenizer import Tokenizer, load_tokenizer

INDEX_NAME = "index.json"
INDEX_FORMAT = "bigtx-shards"
INDEX_VERSION = 1
SPLITS = ("train", "val")
CHUNK_CHARS = 1 << 20  # text (characters) per tokenization task
CHUNK_DOCS = 1024

_SHARD_NAME = re.compile(r"(train|val)-\d{6}\.tar")
MIN_SHARD_SIZE = 4096
MAX_AUTO_SHARD_SIZE = 64 * 10**6
# Without --shard-size, a small input is cut into about this many train shards: enough for 8 ranks x 4
# data workers to read whole shards each. More readers than shards still train (the loader then splits
# a shard's documents between readers), but each of them reads the whole shard to keep its part.
AUTO_SHARDS = 32


def parse_size(text: str) -> int:
    """``--shard-size`` in bytes (``64MB`` -> 64_000_000; see ``bigtx.config.sizes``); at least 4 KiB."""
    try:
        size = sizes.parse_size(text)
    except ValueError as exc:
        raise DataError(f"--shard-size: {exc}") from None
    if size < MIN_SHARD_SIZE:
        raise DataError(f"--shard-size: {text!r} is below the 4 KiB minimum")
    return size


def split_of(text: str, val_fraction: float) -> str:
    """``val`` for a deterministic ``val_fraction`` of documents, by a hash of the text."""
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return "val" if h < val_fraction * 2.0**64 else "train"


# --- worker side ----------------------------------------------------------------------------------

_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer: str, in_pool: bool = True) -> None:
    global _worker_tok
    if in_pool:
        # One process per core already; the library's own thread pool would only oversubscribe them.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = load_tokenizer(tokenizer)


def _encode_chunk(texts: list[str], val_fraction: float) -> tuple[list[np.ndarray], list[str], int]:
    assert _worker_tok is not None
    ids = _worker_tok.encode_batch(texts)
    splits = [split_of(t, val_fraction) for t in texts]
    return ids, splits, sum(len(t.encode("utf-8")) for t in texts)


# --- main side ------------------------------------------------------------------------------------


def auto_shard_size(input_bytes: int, sample_ratio: float, val_fraction: float) -> int:
    """The shard size that cuts the train split into about ``AUTO_SHARDS`` shards, within [4 KiB, 64 MB].

    The train split is estimated as ``input_bytes`` (the input files' size, compressed for ``.gz``, so
    an underestimate there and for parquet: more, smaller shards) times ``sample_ratio`` (shard bytes per text byte,
    measured on the first chunk of documents) times ``1 - val_fraction``."""
    train_bytes = input_bytes * sample_ratio * (1.0 - val_fraction)
    return min(MAX_AUTO_SHARD_SIZE, max(MIN_SHARD_SIZE, int(train_bytes) // AUTO_SHARDS))


def sample_ratio(lengths: Sequence[int], sources: Sequence[str], text_bytes: int, dtype: np.dtype) -> float:
    """Shard bytes per byte of text for one chunk of tokenized documents of ``lengths`` tokens (EOS included)."""
    header = len(npy_bytes(np.zeros(0, dtype)))  # the same 128 bytes for any length a document has
    itemsize = np.dtype(dtype).itemsize
    shard = sum(sample_bytes(header + n * itemsize, len(src.encode("utf-8"))) for n, src in zip(lengths, sources))
    return shard / max(1, text_bytes)


def chunk_documents(docs):
    """Group ``(source, text)`` pairs into tokenization tasks of about 1 MB of text (at most 1024 documents).

    A chunk ends at the first document that brings it to ``CHUNK_CHARS`` characters or ``CHUNK_DOCS``
    documents (``bigtx.data.parts`` finds the first chunk of a merged build by the same rule)."""
    chunk_src: list[str] = []
    chunk_txt: list[str] = []
    size = 0
    for source, text in docs:
        chunk_src.append(source)
        chunk_txt.append(text)
        size += len(text)
        if size >= CHUNK_CHARS or len(chunk_txt) >= CHUNK_DOCS:
            yield chunk_src, chunk_txt
            chunk_src, chunk_txt, size = [], [], 0
    if chunk_txt:
        yield chunk_src, chunk_txt


def _encoded(chunks, tokenizer: str, val_fraction: float, workers: int):
    """(sources, ids, splits, text bytes) per chunk, in input order; at most 2 x workers chunks in flight."""
    if workers <= 1:  # in this process; a tokenizers BPE still uses its own threads
        _init_worker(tokenizer, in_pool=False)
        for sources, texts in chunks:
            yield (sources, *_encode_chunk(texts, val_fraction))
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for sources, texts in chunks:
            pending.append((sources, pool.apply_async(_encode_chunk, (texts, val_fraction))))
            if len(pending) >= 2 * workers:
                sources0, res = pending.popleft()
                yield (sources0, *res.get())
        while pending:
            sources0, res = pending.popleft()
            yield (sources0, *res.get())


def _listed_files(out_dir: str) -> list[str] | None:
    """The shard names the bigtx ``index.json`` of ``out_dir`` lists; None when there is no index.

    Raises ``DataError`` for an ``index.json`` that is not bigtx's, or one that names a file bigtx
    never writes (``--overwrite`` removes exactly the listed files, so the list must be trusted).
    """
    path = os.path.join(out_dir, INDEX_NAME)
    if not os.path.lexists(path):
        return None
    refuse = f"--out: {path} is not a `bigtx data build` index"
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{refuse} ({exc}); refusing to replace it. Choose another --out") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("splits"), dict):
        raise DataError(f'{refuse} (no "format": "{INDEX_FORMAT}"); refusing to replace it. Choose another --out')
    try:
        names = [shard["name"] for split in index["splits"].values() for shard in split["shards"]]
    except (KeyError, TypeError):
        raise DataError(f"{refuse} (its splits list no shards); refusing to replace it. Choose another --out") from None
    strange = [n for n in names if not (isinstance(n, str) and _SHARD_NAME.fullmatch(n))]
    if strange:
        raise DataError(f"--out: {path} lists files bigtx does not write ({strange[:3]}); refusing to remove them")
    return names


def _is_build_file(name: str) -> bool:
    """A name a build writes into its output directory."""
    return name in (INDEX_NAME, INDEX_NAME + ".tmp") or _SHARD_NAME.fullmatch(name) is not None


def _prepare_out_dir(out_dir: str, overwrite: bool, inputs: Sequence[str]) -> None:
    """Make ``out_dir`` ready for a build; with ``overwrite``, remove the previous build's files.

    Only the shards an existing bigtx ``index.json`` lists and that index are ever removed; any other
    file is left alone. Refused (``DataError``): a file at ``out_dir``, shard-named files that no
    index lists (an interrupted build or someone else's), a foreign ``index.json``, and an input
    file that the build would remove or overwrite.
    """
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out: {out_dir} is a file, not a directory")
    os.makedirs(out_dir, exist_ok=True)
    real_out = os.path.realpath(out_dir)
    for path in inputs:
        # the directory entry the input is read through, and the file it leads to
        entry = os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))
        for where in (entry, os.path.realpath(path)):
            if os.path.dirname(where) == real_out and _is_build_file(os.path.basename(where)):
                raise DataError(f"--input {path}: is {where}, which this build would remove or overwrite")
    listed = _listed_files(out_dir)
    known = {*(listed or ()), INDEX_NAME}
    unlisted = sorted(n for n in os.listdir(out_dir) if _is_build_file(n) and n not in known)
    if unlisted:
        raise DataError(
            f"--out: {out_dir} holds {', '.join(unlisted[:5])}{', ...' if len(unlisted) > 5 else ''}, which no "
            f"bigtx {INDEX_NAME} there lists (an interrupted build, or not bigtx's); refusing to remove or "
            "overwrite them. Move them away or choose another --out"
        )
    if listed is None:
        return
    if not overwrite:
        raise DataError(f"--out: {out_dir} already holds a build (its {INDEX_NAME}); pass --overwrite to replace it")
    for name in [*listed, INDEX_NAME]:
        path = os.path.join(out_dir, name)
        if os.path.lexists(path):
            os.remove(path)


def tokenizer_record(tok: Tokenizer, spec: str) -> dict:
    return {
        "source": spec,
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
    }


def write_index(
    out_dir: str, tokenizer: dict, dtype: np.dtype, splits: dict[str, list[dict]], stats: dict, options: dict
) -> dict:
    """Write ``index.json`` (atomically, last: its presence marks a complete build) and return it."""
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "created_by": f"bigtx {bigtx.__version__}",
        "sample_format": {"ids": "ids.npy", "source": "source.txt", "eos_terminated": True},
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer["vocab_size"],
        "tokenizer": tokenizer,
        "splits": {
            name: {
                "samples": sum(s["samples"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards),
                "shards": shards,
            }
            for name, shards in splits.items()
        },
        "options": options,
        "stats": stats,
    }
    tmp = os.path.join(out_dir, INDEX_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, INDEX_NAME))
    return index


def build_shards(
    inputs: Sequence[str],
    tokenizer: str,
    out_dir: str,
    *,
    shard_size: int | None = None,
    val_fraction: float = 0.01,
    workers: int = 1,
    text_field: str = "text",
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict:
    """Build the shards and index of ``out_dir``; returns the index (plus ``seconds``). Raises ``DataError``.

    ``shard_size`` None: ``auto_shard_size`` (about ``AUTO_SHARDS`` train shards, at most 64 MB each)."""
    from tqdm import tqdm

    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction: {val_fraction} is not in [0, 1)")
    tok = load_tokenizer(tokenizer)
    files = expand_inputs(inputs)
    _prepare_out_dir(out_dir, overwrite, files)
    dtype = ids_dtype(tok.vocab_size)
    writers: dict[str, ShardSetWriter] = {}
    stats = ReadStats()
    input_bytes = sum(os.path.getsize(f) for f in files)
    # compressed inputs have more text than file bytes: no total (and so no misleading percentage) for them
    total = None if any(is_compressed(f) or kind_of(f) == "parquet" for f in files) else input_bytes
    auto = shard_size is None
    start = time.perf_counter()
    eos = np.array([tok.eos_id], dtype=dtype)
    ordinal = 0
    disable = None if progress is None else not progress  # None: only on a terminal
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="building", disable=disable) as bar:
        chunks = chunk_documents(iter_documents(files, stats, text_field))
        for sources, ids, splits, nbytes in _encoded(chunks, tokenizer, val_fraction, workers):
            if not writers:  # opened at the first chunk, which an automatic shard size is measured on
                if shard_size is None:
                    ratio = sample_ratio([len(d) + 1 for d in ids], sources, nbytes, dtype)
                    shard_size = auto_shard_size(input_bytes, ratio, val_fraction)
                writers = {name: ShardSetWriter(out_dir, name, shard_size, dtype) for name in SPLITS}
            for source, doc, split in zip(sources, ids, splits):
                writers[split].write(f"{ordinal:010d}", np.concatenate([doc.astype(dtype, copy=False), eos]), source)
                ordinal += 1
            stats.text_bytes += nbytes
            bar.update(nbytes)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(docs_per_s=f"{ordinal / elapsed:,.0f}", refresh=False)
    seconds = time.perf_counter() - start
    if ordinal == 0:
        raise DataError(
            f"--input: no documents in {len(files)} file(s) "
            f"({stats.empty_docs} empty documents and {stats.bad_lines} bad records skipped)"
        )
    shards = {name: w.close() for name, w in writers.items()}
    options = {
        "shard_size": shard_size,
        "shard_size_auto": auto,
        "val_fraction": val_fraction,
        "text_field": text_field,
    }
    index = write_index(out_dir, tokenizer_record(tok, tokenizer), dtype, shards, stats.as_dict(), options)
    return {**index, "seconds": seconds}


def summary(index: dict) -> str:
    """One paragraph describing a build (for the CLI)."""
    s = index["stats"]
    tr, va = index["splits"]["train"], index["splits"]["val"]
    mb = s["text_bytes"] / 1e6
    secs = index.get("seconds")
    rate = f" in {secs:.1f}s ({mb / secs:.2f} MB/s, {s['documents'] / secs:,.0f} docs/s)" if secs else ""
    lines = [
        f"{s['documents']:,} documents, {mb:,.2f} MB of text from {s['files']} file(s){rate}",
        f"train: {tr['samples']:,} docs, {tr['tokens']:,} tokens in {len(tr['shards'])} shard(s); "
        f"val: {va['samples']:,} docs, {va['tokens']:,} tokens in {len(va['shards'])} shard(s)",
    ]
    options = index.get("options", {})
    if options.get("shard_size_auto"):
        lines.append(
            f"shard size {options['shard_size'] / 1e6:,.3f} MB, chosen for about {AUTO_SHARDS} train shards "
            "(--shard-size sets it)"
        )
    skipped = [f"{s['empty_docs_skipped']} empty documents skipped"] if s["empty_docs_skipped"] else []
    if s["non_utf8_docs"]:
        skipped.append(f"{s['non_utf8_docs']} documents with non-UTF-8 bytes (replaced)")
    if s["bad_lines_skipped"]:
        skipped.append(f"{s['bad_lines_skipped']} bad records (jsonl lines, null parquet/arrow values) skipped")
    if skipped:
        lines.append("; ".join(skipped))
    if not va["shards"] and options.get("val_fraction", 0) > 0:
        lines.append("note: no document fell into the val split; raise --val-fraction for a validation set")
    return "\n".join(lines)
