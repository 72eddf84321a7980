"""The teacher cache (``distill.source: DIR``): a teacher's top-k log-probabilities per position, computed
once by ``bigtx distill cache`` and read in lockstep with the training stream.

Keying. The train loader's stream is a function of the data, ``run.seed``, ``data.seq_len`` and the
number of slots (world size x readers per rank), not of how the slots are spread over ranks and
workers (``bigtx.data.loader``): slot ``s`` yields the same packed rows (``seq_len + 1`` tokens each) in
every layout with that many slots. A cache row is keyed by ``(slot, row index)``, the position
``TokenLoader.last_rows()`` reports for each micro-batch, so every rank of every such layout finds its
rows: after a resume, after ``2 ranks x 1 reader -> 1 rank x 2 workers``, with another micro-batch size.

Layout of DIR::

    manifest.json               written last: what the cache was computed from, and its shards
    slot00000-000000.tar, ...   per slot, WebDataset shards of consecutive rows of that slot

A sample holds rows ``first .. first + n - 1`` of one slot, key ``s<slot>r<first>`` (5 and 10 digits);
its members are little-endian ``.npy`` files::

    logp.npy    [n, L, K] float16  the teacher's log-softmax (temperature 1) at its top-k ids, largest first
    ids.npy     [n, L, K] uint16 (vocabulary <= 65536) or int32: those ids
    target.npy  [n, L]    float16  the teacher's log-softmax at each position's target (for teacher_ce)
    hash.npy    [n]       uint64   per row, a hash of the L + 1 token ids it was computed on

Log-probabilities rather than logits: they differ by a per-row constant, which the top-k softmax at any
``distill.temperature`` removes, so one cache serves every temperature, alpha and KD kind, and gives
the loss an online run with the same ``distill.top_k`` gives, up to fp16 rounding.

Checks. Before any process group starts (``check_cache``): the manifest against the run's spec: the
teacher (its path, model and weight files), ``top_k``, the tokenizer, ``seq_len``, the number of
slots, the data (shards by name and sha256, weights, seed, shuffle buffer) and enough rows for the
run. While training: each shard's sha256 when it is opened, and every row's hash against the row the
student trains on. A mismatch is a ``CacheError`` naming the cache, the slot and the row: a misaligned
cache is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bigtx.config import RunSpec, SpecError
from bigtx.data import DataError, build_loader, load_tokenizer
from bigtx.data.shards import CorruptShard, iter_tar
from bigtx.data.sources import readers_per_rank, split_sources
from bigtx.distill import open_teacher
from bigtx.export import WeightSource, open_model
from bigtx.export.types import DTYPES
from bigtx.model.distill_loss import TeacherTopK
from bigtx.model.documents import find_documents

FORMAT = "bigtx-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
_FIELDS = ("logp", "ids", "target", "hash")


class CacheError(DataError):
    """A teacher cache that does not fit the rows being trained on, or is damaged; the message says which."""


# --------------------------------------------------------------------------------------------
# What a cache is keyed to.


def teacher_identity(source: WeightSource) -> dict[str, Any]:
    """The teacher as the manifest records it: its path, and a fingerprint of its model config and of
    the names and sizes of the files beside its weights (a retrained or replaced teacher changes it)."""
    files = sorted((p.name, p.stat().st_size) for p in source.path.iterdir() if p.is_file())
    desc = {"kind": source.kind, "model": source.spec.model.model_dump(mode="json"), "files": files}
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    return {"path": str(source.path.resolve()), "fingerprint": digest}


def stream_identity(spec: RunSpec, world_size: int) -> dict[str, Any]:
    """What slot ``s``'s rows depend on: data, seed, seq_len, number of slots, shuffle buffer, tokenizer."""
    sources = split_sources(spec.data, "train")
    shards = [[s.weight, [[sh.name, sh.sha256, sh.samples] for sh in s.shards]] for s in sources]
    return {
        "seq_len": spec.data.seq_len,
        "slots": world_size * readers_per_rank(spec.data.num_workers),
        "seed": spec.run.seed,
        "shuffle_buffer": spec.data.shuffle_buffer,
        "tokenizer_sha256": load_tokenizer(spec.data.tokenizer).sha256,
        "data": hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16],
        "data_sources": [s.spec for s in sources],
        "document_mask": spec.data.document_mask,
    }


def rows_needed(spec: RunSpec, world_size: int) -> int:
    """Rows each slot delivers over the whole run: its readers share the rank's micro-batches round robin."""
    micro, accum, _ = spec.batch_sizes(world_size)
    batches = spec.total_steps(world_size) * accum
    return math.ceil(batches / readers_per_rank(spec.data.num_workers)) * micro


def row_hashes(x: Tensor, y: Tensor) -> np.ndarray:
    """Per row of inputs ``x`` and targets ``y`` [n, L]: a 64-bit hash of its L + 1 token ids."""
    # on a GPU this copy waits for the batch's upload: a few KB per micro-batch
    window = torch.cat([x, y[:, -1:]], dim=1).cpu().numpy().astype("<i8", copy=False)
    digests = [hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in window]
    return np.array([int.from_bytes(d, "little") for d in digests], dtype=np.uint64)


# --------------------------------------------------------------------------------------------
# Building.


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False), allow_pickle=False)
    return buf.getvalue()


class _SlotWriter:
    """Shards ``slot<s>-<n>.tar`` of one slot, each cut after it reaches ``shard_bytes``."""

    def __init__(self, out: Path, slot: int, shard_bytes: int):
        self.out, self.slot, self.shard_bytes = out, slot, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self._buf: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._first = self._rows = 0

    def write(self, first: int, arrays: dict[str, np.ndarray]) -> None:
        if self._tar is None:
            self._buf = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.USTAR_FORMAT)
            self._first, self._rows = first, 0
        key = f"s{self.slot:05d}r{first:010d}"
        for name in _FIELDS:
            data = _npy(arrays[name])
            info = tarfile.TarInfo(f"{key}.{name}.npy")
            info.size, info.mode = len(data), 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._rows += len(arrays["hash"])
        assert self._buf is not None
        if self._buf.tell() >= self.shard_bytes:
            self.close()

    def close(self) -> list[dict[str, Any]]:
        """Finish the open shard; the list of ``{file, first_row, rows, bytes, sha256}``."""
        if self._tar is not None and self._buf is not None:
            self._tar.close()
            data = self._buf.getvalue()
            name = f"slot{self.slot:05d}-{len(self.shards):06d}.tar"
            (self.out / name).write_bytes(data)
            sha = hashlib.sha256(data).hexdigest()
            self.shards.append(
                {"file": name, "first_row": self._first, "rows": self._rows, "bytes": len(data), "sha256": sha}
            )
            self._tar = self._buf = None
        return self.shards


@torch.no_grad()
def teacher_rows(
    teacher: torch.nn.Module, x: Tensor, y: Tensor, top_k: int, ids_dtype: np.dtype, document_eos: int | None = None
) -> dict[str, np.ndarray]:
    """The cache's arrays for host rows ``x``/``y`` [n, L]: top-k as ``distill_loss`` picks them online
    (``topk`` of the fp32 teacher logits), stored as fp16 log-probabilities. The teacher runs on its
    parameters' device; with ``document_eos`` (``data.document_mask``) it sees each document alone."""
    device = next(teacher.parameters()).device
    x = x.to(device)
    documents = None if document_eos is None else find_documents(x, document_eos)
    logits = teacher(x, documents=documents).float()
    logp = torch.log_softmax(logits, dim=-1)
    ids = logits.topk(top_k, dim=-1).indices
    return {
        "logp": logp.gather(-1, ids).to(torch.float16).cpu().numpy(),
        "ids": ids.cpu().numpy().astype(ids_dtype),
        "target": logp.gather(-1, y.to(device)[..., None]).squeeze(-1).to(torch.float16).cpu().numpy(),
        "hash": row_hashes(x, y),
    }


def build_cache(
    spec: RunSpec,
    out: Path,
    world_size: int,
    *,
    batch_rows: int = 8,
    shard_bytes: int = 64 << 20,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the cache of ``spec.distill.teacher``'s top ``spec.distill.top_k`` tokens for every row the
    train loader of ``spec`` delivers at ``world_size`` (and so in every layout with as many slots) to
    ``out`` (a new directory), ``batch_rows`` rows per teacher forward (on the GPU if there is one);
    returns the manifest, with the
    build's ``seconds`` added. Raises ``SpecError``/``DataError`` for unusable input.
    """
    d = spec.distill
    assert d is not None
    if not 1 <= d.top_k <= spec.model.vocab_size:
        raise SpecError(
            [
                f"distill.top_k: a cache keeps the teacher's top 1 .. {spec.model.vocab_size} (model.vocab_size) "
                f"tokens per position, not {d.top_k}; give --top-k K"
            ]
        )
    source = open_teacher(d.teacher, spec.data, spec.model.vocab_size)
    stream = stream_identity(spec, world_size)
    rows = rows_needed(spec, world_size)
    loaders = [
        _slot_loader(spec, slot, stream["slots"], batch_rows) for slot in range(stream["slots"])
    ]  # checks the data
    teacher = open_model(source, DTYPES[spec.precision], "cuda" if torch.cuda.is_available() else "cpu")
    ids_dtype = np.dtype(np.uint16) if spec.model.vocab_size <= 1 << 16 else np.dtype(np.int32)
    eos = loaders[0].cfg.eos_id if spec.data.document_mask else None  # the teacher sees what the student will
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    slots = []
    for slot, loader in enumerate(loaders):
        writer = _SlotWriter(out, slot, shard_bytes)
        done = 0
        for x, y in loader:
            x, y = x[: rows - done], y[: rows - done]
            writer.write(done, teacher_rows(teacher, x, y, d.top_k, ids_dtype, eos))
            done += len(x)
            if done == rows:
                break
        loader.close()
        slots.append(writer.close())
        say(f"slot {slot}: {rows} rows of {spec.data.seq_len} tokens, {time.perf_counter() - t0:.1f}s so far")
    seconds = time.perf_counter() - t0
    tokens = rows * spec.data.seq_len * len(slots)
    size = sum(shard["bytes"] for shards in slots for shard in shards)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": teacher_identity(source),
        "teacher_dtype": spec.precision,
        "top_k": d.top_k,
        "vocab_size": spec.model.vocab_size,
        "stream": stream,
        "rows_per_slot": rows,
        "tokens": tokens,
        "bytes": size,
        "slot_shards": slots,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest | {"seconds": seconds}


def _slot_loader(spec: RunSpec, slot: int, slots: int, batch_rows: int) -> Any:
    """A loader that reads exactly slot ``slot``'s stream: rank ``slot`` of ``slots`` with one reader."""
    data = spec.data.model_copy(update={"num_workers": 0})
    return build_loader(
        data,
        "train",
        seq_len=spec.data.seq_len,
        micro_batch_size=batch_rows,
        rank=slot,
        world_size=slots,
        seed=spec.run.seed,
        vocab_size=spec.model.vocab_size,
    )


# --------------------------------------------------------------------------------------------
# Checking and reading.


def check_cache(spec: RunSpec, world_size: int) -> dict[str, Any]:
    """The manifest of ``spec.distill.source``, checked against ``spec`` at ``world_size``; raises
    ``SpecError`` with one ``distill.source: ...`` line per mismatch. Reads no shard."""
    d = spec.distill
    assert d is not None and d.source != "online"
    where = f"distill.source: the teacher cache {d.source}"
    path = Path(d.source) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        reason = "has no manifest.json" if not path.exists() else f"has an unreadable manifest.json ({exc})"
        raise SpecError(
            [f"{where} {reason}: build one with `bigtx distill cache` (an unfinished build has none)"]
        ) from None
    keys = ("teacher", "top_k", "stream", "rows_per_slot", "slot_shards")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise SpecError([f"{where}: {path} is not a bigtx teacher cache of version {VERSION}; rebuild it"])
    if any(key not in manifest for key in keys):
        raise SpecError([f"{where}: {path} lacks some of {', '.join(keys)}; rebuild it"])
    rebuild = "rebuild it with `bigtx distill cache` for this spec"
    problems = []
    teacher = teacher_identity(open_teacher(d.teacher, spec.data, spec.model.vocab_size))
    if manifest["teacher"]["fingerprint"] != teacher["fingerprint"]:
        problems.append(
            f"{where} was computed by the teacher {manifest['teacher']['path']}, not by distill.teacher "
            f"{teacher['path']} as it is now (model or weight files differ); {rebuild}"
        )
    if not 1 <= d.top_k <= manifest["top_k"]:
        problems.append(
            f"{where} holds the teacher's top {manifest['top_k']} tokens per position; set distill.top_k to "
            f"1 .. {manifest['top_k']} (not {d.top_k}: 0 means the full vocabulary, which only `online` has)"
        )
    ours = stream_identity(spec, world_size)
    theirs = manifest["stream"]
    names = {
        "tokenizer_sha256": "data.tokenizer",
        "seq_len": "data.seq_len",
        "data": "data.train (shard names, sha256 or weights)",
        "seed": "run.seed",
        "shuffle_buffer": "data.shuffle_buffer",
        "document_mask": "data.document_mask",
    }
    for key, name in names.items():
        if theirs.get(key) != ours[key]:
            shown = (theirs.get(key), ours[key]) if key != "data" else (theirs["data_sources"], ours["data_sources"])
            problems.append(f"{where} was built for another {name} ({shown[0]} there, {shown[1]} here); {rebuild}")
    if theirs.get("slots") != ours["slots"]:
        problems.append(
            f"{where} was built for {theirs.get('slots')} data slots (world size x readers per rank), this run has "
            f"{world_size} x {readers_per_rank(spec.data.num_workers)} = {ours['slots']}; use a layout with "
            f"{theirs.get('slots')} slots or rebuild it with --world-size"
        )
    elif manifest["rows_per_slot"] < rows_needed(spec, world_size):
        problems.append(
            f"{where} holds {manifest['rows_per_slot']} rows per slot, this run reads "
            f"{rows_needed(spec, world_size)} (train.max_steps or the batch size grew); {rebuild}"
        )
    for shards in manifest["slot_shards"]:
        for shard in shards:
            file = Path(d.source) / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["bytes"]:
                problems.append(f"{where}: shard {file} is missing or not {shard['bytes']} bytes; {rebuild}")
    if problems:
        raise SpecError(problems)
    return manifest


class CachedTeacher:
    """The teacher of a run with ``distill.source: DIR``: its top-k rows, read from the cache.

    Holds at most one decoded shard per slot (slots read their rows in order). ``outputs`` raises
    ``CacheError`` when a shard is damaged or a row's tokens are not those the cache was computed on.
    """

    def __init__(self, cache: str, manifest: dict[str, Any], device: torch.device):
        self.cache, self.manifest, self.device = Path(cache), manifest, device
        self._open: dict[int, tuple[int, dict[str, np.ndarray]]] = {}  # slot -> (first row, arrays)

    def outputs(self, x: Tensor, y: Tensor, at: tuple[int, int], documents: object = None) -> TeacherTopK:
        """The teacher's top-k for micro-batch ``x``/``y`` [n, L] at ``at`` = ``(slot, first row)``
        (``TokenLoader.last_rows()``), flattened to [n * L, K] on the device. ``documents`` is not used:
        a cache built under ``data.document_mask`` is computed that way (``check_cache`` compares)."""
        slot, first = at
        n = x.shape[0]
        parts: list[dict[str, np.ndarray]] = []
        row = first
        while row < first + n:  # a micro-batch may span two shards
            parts.append(self._rows(slot, row, first + n))
            row += len(parts[-1]["hash"])
        arrays = {name: np.concatenate([p[name] for p in parts]) for name in _FIELDS}
        got = row_hashes(x, y)
        bad = np.nonzero(arrays["hash"] != got)[0]
        if len(bad):
            raise CacheError(
                f"distill.source: the teacher cache {self.cache}: slot {slot} row {first + int(bad[0])} was computed "
                "on other tokens than this run trains on there (the data, its order or the loader state differ from "
                "the cache's); rebuild the cache with `bigtx distill cache` for this run"
            )

        def flat(name: str, dtype: torch.dtype) -> Tensor:
            array = arrays[name]
            return torch.from_numpy(array.reshape(-1, *array.shape[2:])).to(self.device, dtype)

        return TeacherTopK(flat("logp", torch.float32), flat("ids", torch.int64), flat("target", torch.float32))

    def _shards(self, slot: int) -> list[dict[str, Any]]:
        if not 0 <= slot < len(self.manifest["slot_shards"]):
            raise CacheError(f"distill.source: the teacher cache {self.cache} has no slot {slot}")
        return self.manifest["slot_shards"][slot]

    def _rows(self, slot: int, start: int, end: int) -> dict[str, np.ndarray]:
        """Rows ``start ..`` (up to ``end`` or the end of its shard) of ``slot``."""
        if slot not in self._open or not self._holds(slot, start):
            shard = next((s for s in self._shards(slot) if s["first_row"] <= start < s["first_row"] + s["rows"]), None)
            if shard is None:
                raise CacheError(
                    f"distill.source: the teacher cache {self.cache} holds {self.manifest['rows_per_slot']} rows per "
                    f"slot; this run needs row {start} of slot {slot}; "
                    "rebuild it with `bigtx distill cache` for this run"
                )
            self._open[slot] = (shard["first_row"], self._load(shard))
        base, arrays = self._open[slot]
        return {name: a[start - base : end - base] for name, a in arrays.items()}

    def _holds(self, slot: int, row: int) -> bool:
        base, arrays = self._open[slot]
        return base <= row < base + len(arrays["hash"])

    def _load(self, shard: dict[str, Any]) -> dict[str, np.ndarray]:
        path = self.cache / shard["file"]
        try:
            buf = path.read_bytes()
            if hashlib.sha256(buf).hexdigest() != shard["sha256"]:
                raise CorruptShard("its sha256 is not the one manifest.json records")
            members: dict[str, list[np.ndarray]] = {name: [] for name in _FIELDS}
            for name, start, end in iter_tar(buf):
                field = name.split(".")[1]
                if field not in members or not name.endswith(".npy"):
                    raise CorruptShard(f"it has a member {name} that is not one of {', '.join(_FIELDS)}")
                members[field].append(np.load(io.BytesIO(buf[start:end]), allow_pickle=False))
            arrays = {name: np.concatenate(parts) for name, parts in members.items()}
            if len(arrays["hash"]) != shard["rows"]:
                raise CorruptShard(f"it holds {len(arrays['hash'])} rows, manifest.json says {shard['rows']}")
        except (OSError, ValueError, CorruptShard) as exc:
            raise CacheError(
                f"distill.source: the teacher cache {self.cache}: shard {path} is damaged: {exc}; rebuild the cache"
            ) from None
        return arrays
