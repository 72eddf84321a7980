"""The streaming token loader: deterministic, sharded over ranks and workers, exactly resumable.

Design
------
*Readers.* Each rank runs ``R = max(1, data.num_workers)`` readers (DataLoader worker processes, or the
main process when ``num_workers=0``); reader ``w`` of rank ``r`` is slot ``s = r*R + w`` of
``S = world_size*R``. The loader, not a torch sampler, decides what each slot reads:

* train, per source and per epoch ``e``: the shard list is permuted with a seed of (seed, source, e)
  and slot ``s`` takes every ``S``-th shard from position ``s``. Every document of an epoch therefore
  goes to exactly one slot. Inside a shard the documents follow a permutation seeded by
  (seed, source, e, shard); a shuffle buffer of ``data.shuffle_buffer`` document references mixes
  across shard boundaries, its picks drawn from a counter-based hash (no RNG state to save); it is
  drained at the end of the epoch, so epochs never mix. Each slot moves to the next epoch when its own
  shards are done (train is infinite), so the ``epoch`` stat is the minimum over this rank's readers.
  A source with ``N < S`` shards is shared instead of refused: slot ``s`` reads the shard at position
  ``s % N`` of the permuted list, together with the other slots ``s' = s (mod N)``; if ``k`` slots share
  it, the ``j``-th of them (``j = s // N``) takes positions ``j, j+k, ...`` of the shard's document
  permutation (``stream.doc_share``). Still exactly once per epoch, still a function of (shards, slots,
  seed, epoch) only, and the state is the same (epoch, cursor, offset, ...). Every shard then needs at
  least ``ceil(S / N)`` documents (checked before training from the index's sample counts).
* val: no shuffling, one pass: slot ``s`` takes shards ``s, s+S, ...``, or, when a source has fewer
  than ``S`` shards, every shard but only documents ``s, s+S, ...``. The incomplete last micro-batch
  of each slot is dropped; ranks can differ by a micro-batch or so.

*Mixtures.* A slot reads all sources and takes its next document from the source whose token count so
far, divided by its weight, is smallest; realised token shares match the weights to within a document.

*Packing.* ``bigtx.data.packing``: concatenation, micro-batches of ``[mb, seq_len]`` inputs and
targets shifted by one; no padding.

*Order of batches.* Readers deliver micro-batches in a fixed round robin: batch ``k`` of a rank comes
from reader ``(k + phase) % R``. With workers this is torch's in-order DataLoader over an
IterableDataset, whose worker ``j`` plays reader ``(j + phase) % R``; ``phase`` is the next reader at
the time of the last restore, so the round robin continues where it left off.

*State.* Every micro-batch travels with its reader's state right after producing it: per source
(epoch, shard cursor, offset in the shard's document order, buffered references, pick counter), the
token counts for mixing, the packing leftover (the tail of at most one document), the rows the reader
has delivered and the bad-shard / skipped-document counters. ``state_dict()`` holds the last state
delivered by each reader, so it describes exactly the batches the caller has received, however far
the workers have prefetched. ``load_state_dict`` hands each reader its state; a restored loader
yields batch ``k+1, k+2, ...`` bit-identical to an uninterrupted one. The state is plain Python
(ints, lists, bytes): it survives ``torch.save`` / ``torch.load(weights_only=True)``.

*Changing the layout.* Shards are assigned by slot, so a new layout with the same number of slots
(2 ranks x 1 reader <-> 1 rank x 2 workers) continues exactly: ``load_resharded_state`` hands each
new reader the old reader of its slot. Any other change of world size or ``data.num_workers`` (or of
data or seed) cannot continue exactly. It is refused with a message
naming both layouts unless ``data.allow_reshuffle`` is true; then every reader restarts the earliest
epoch the saved readers were in, in the new layout's order: the part of that epoch already read is
seen again, nothing is skipped. (Changing ``seq_len`` or the micro-batch size continues exactly.)

*Bad input.* A shard that cannot be fetched, is truncated or corrupt, or fails its index sha256 or
sample count: skipped with a warning and counted in ``bad_shards`` (``data.on_error=skip``), or a
``DataError`` (``raise``). Empty documents and documents with ids outside the tokenizer's vocabulary
are skipped and counted in ``skipped_docs`` (the latter raise with ``on_error=raise``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bigtx import lifetime
from bigtx.data.errors import DataError
from bigtx.data.packing import Packer, to_batch
from bigtx.data.sources import (
    Source,
    check_readers,
    check_sources,
    check_tokenizer,
    readers_per_rank,
    split_sources,
    val_sets,
)
from bigtx.data.stream import Counters, DocPolicy, SlotStream, fresh_source_state, shard_plan

log = logging.getLogger("bigtx.data")

STATE_VERSION = 1


@dataclass
class LoaderConfig:
    sources: list[Source] = field(repr=False)
    split: str
    seq_len: int
    micro_batch_size: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    shuffle_buffer: int
    on_error: str
    vocab_limit: int
    eos_id: int
    allow_reshuffle: bool = False

    @property
    def train(self) -> bool:
        return self.split == "train"

    @property
    def readers(self) -> int:
        return readers_per_rank(self.num_workers)

    @property
    def n_slots(self) -> int:
        return self.world_size * self.readers

    def fingerprint(self) -> str:
        """What the data order depends on besides the layout: the sources' shards and weights, the seed."""
        desc = [self.split, self.seed, [[s.weight, [sh.name for sh in s.shards]] for s in self.sources]]
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


def _produce(cfg: LoaderConfig, reader: int, state: dict | None) -> Iterator[tuple]:
    """Token blocks of one reader: ``(reader, block, state after this block)``.

    Blocks stay in the shards' compact dtype: with workers they travel through a pipe as pickled numpy
    (a few tens of KB), which is cheaper than torch's per-tensor shared-memory segments."""
    state = state or {}
    counters = Counters(**state.get("counters", {}))
    policy = DocPolicy(cfg.on_error, cfg.vocab_limit, cfg.eos_id, counters)
    stream = SlotStream(
        cfg.sources,
        cfg.rank * cfg.readers + reader,
        cfg.n_slots,
        state=state.get("stream"),
        seed=cfg.seed,
        train=cfg.train,
        buffer_size=cfg.shuffle_buffer,
        policy=policy,
    )
    packer = Packer(cfg.seq_len, cfg.micro_batch_size, state.get("leftover"))
    rows = state.get("rows", 0)
    while True:
        block = packer.next_block(stream.next_doc)
        if block is None:
            return
        rows += cfg.micro_batch_size
        snapshot = {
            "stream": stream.state(),
            "leftover": packer.leftover,
            "rows": rows,
            "counters": {"bad_shards": counters.bad_shards, "skipped_docs": counters.skipped_docs},
        }
        yield reader, block, snapshot


class _ReaderDataset(IterableDataset):
    """What each DataLoader worker runs: worker ``j`` is reader ``(j + phase) % readers``."""

    def __init__(self, cfg: LoaderConfig, states: list[dict | None], phase: int):
        self.cfg, self.states, self.phase = cfg, states, phase
        self.owner = os.getpid()  # the rank the workers serve

    def __iter__(self):
        info = get_worker_info()
        reader = ((info.id if info is not None else 0) + self.phase) % self.cfg.readers
        return _produce(self.cfg, reader, self.states[reader])


def _identity(item):
    return item


def _worker_init(worker_id: int) -> None:
    # A worker ends with the rank it serves, however the rank ends (SIGKILL, os._exit): its parent is
    # the fork server, which in turn lives as long as any worker does, so watch the rank itself.
    lifetime.die_with_parent()
    lifetime.exit_with(get_worker_info().dataset.owner)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers start from a fork server, not by forking the rank: a forked worker would inherit the
    rank's sockets (the process group's listening store among them) and keep the port after the
    rank is gone. The server preloads the loader's imports, so a worker starts in milliseconds."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _export_reader(snapshot: dict | None) -> dict | None:
    if snapshot is None:
        return None
    leftover = np.ascontiguousarray(snapshot["leftover"])
    return {
        "stream": snapshot["stream"],
        "leftover": leftover.tobytes(),
        "leftover_dtype": leftover.dtype.str,
        "rows": snapshot["rows"],
        "counters": dict(snapshot["counters"]),
    }


def _import_reader(saved: dict | None) -> dict | None:
    if saved is None:
        return None
    leftover = np.frombuffer(saved["leftover"], dtype=np.dtype(saved["leftover_dtype"]))
    # "rows": absent from states saved before bigtx counted them
    return {
        "stream": saved["stream"],
        "leftover": leftover,
        "rows": saved.get("rows", 0),
        "counters": dict(saved["counters"]),
    }


class TokenLoader:
    """Iterate for ``(x, y)`` int64 micro-batches ``[micro_batch_size, seq_len]``; see the module docstring.

    ``split="train"``: infinite, resumable with ``state_dict`` / ``load_state_dict``.
    ``split="val"``: finite, same order on every ``iter()``.
    """

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self._states: list[dict | None] = [None] * cfg.readers
        self._next_reader = 0
        self._batches = 0
        self._last_rows: tuple[int, int] | None = None
        self._live = None  # the current iterator: one at a time, since each updates the loader's state

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.close()
        self._live = self._iter_train() if self.cfg.train else self._iter_val()
        return self._live

    def close(self) -> None:
        """Stop the current iterator and its worker processes (also done by a new ``iter()``)."""
        if self._live is not None:
            self._live.close()
            self._live = None

    def _iter_train(self):
        cfg = self.cfg
        expected = self._next_reader
        for reader, block, snapshot in self._run(list(self._states), self._next_reader):
            if reader != expected:
                raise RuntimeError(f"data loader: batch from reader {reader}, expected reader {expected}")
            self._states[reader] = snapshot
            self._batches += 1
            self._last_rows = (cfg.rank * cfg.readers + reader, snapshot["rows"] - cfg.micro_batch_size)
            expected = self._next_reader = (reader + 1) % cfg.readers
            yield to_batch(block, cfg.micro_batch_size, cfg.seq_len)

    def _iter_val(self):
        cfg = self.cfg
        self._states = [None] * cfg.readers
        self._batches = 0
        for reader, block, snapshot in self._run(list(self._states), 0):
            self._states[reader] = snapshot
            self._batches += 1
            yield to_batch(block, cfg.micro_batch_size, cfg.seq_len)

    def _run(self, states: list[dict | None], phase: int) -> Iterator[tuple]:
        if self.cfg.num_workers == 0:
            yield from _produce(self.cfg, 0, states[0])
            return
        loader = DataLoader(
            _ReaderDataset(self.cfg, states, phase),
            batch_size=None,
            num_workers=self.cfg.num_workers,
            collate_fn=_identity,
            worker_init_fn=_worker_init,
            multiprocessing_context=_worker_context(),
        )
        it = iter(loader)
        try:
            yield from it
        finally:
            # Stop the worker processes now rather than whenever the iterator is collected.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def last_rows(self) -> tuple[int, int]:
        """Where the last train micro-batch yielded lies in the stream of packed rows it came from:
        ``(slot, first row)``, its ``micro_batch_size`` rows being rows ``first, first + 1, ...`` of that
        slot's rows (``seq_len + 1`` tokens each, counted from the start of the run).

        A slot's stream depends on the data, seed, ``seq_len`` and number of slots only, not on how
        the slots are spread over ranks and workers: a teacher cache (``bigtx.teacher_cache``) is keyed
        by this position. Loader states saved before rows were counted restart the count at 0.
        """
        if self._last_rows is None:
            raise RuntimeError("data loader: no train micro-batch yielded yet")
        return self._last_rows

    def state_dict(self) -> dict:
        """The position after the last micro-batch yielded (plain Python: ints, lists, bytes)."""
        cfg = self.cfg
        return {
            "version": STATE_VERSION,
            "split": cfg.split,
            "fingerprint": cfg.fingerprint(),
            "rank": cfg.rank,
            "world_size": cfg.world_size,
            "num_workers": cfg.num_workers,
            "batches": self._batches,
            "next_reader": self._next_reader,
            "readers": [_export_reader(s) for s in self._states],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch ``state`` was saved at; call before ``iter()``. Raises ``DataError``."""
        self.close()
        cfg = self.cfg
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "readers" not in state:
            raise DataError("data: not a bigtx data-loader state (or one from another bigtx version)")
        if state["split"] != cfg.split:
            raise DataError(f"data: this loader state is for the {state['split']} split, not {cfg.split}")
        saved_layout = (state["world_size"], state["num_workers"])
        changes = []
        if saved_layout != (cfg.world_size, cfg.num_workers):
            changes.append(
                f"it was saved with world size {saved_layout[0]} x data.num_workers={saved_layout[1]}, "
                f"this run has world size {cfg.world_size} x data.num_workers={cfg.num_workers}"
            )
        if state["fingerprint"] != cfg.fingerprint():
            changes.append("the data sources, their weights or the seed changed since it was saved")
        if not changes:
            if state["rank"] != cfg.rank:
                raise DataError(
                    f"data: this loader state belongs to rank {state['rank']}, not rank {cfg.rank}; "
                    "each rank restores its own"
                )
            self._states = [_import_reader(s) for s in state["readers"]]
            self._next_reader = int(state["next_reader"])
            self._batches = int(state["batches"])
            return
        saved = [s for s in state["readers"] if s is not None]
        epoch = min((src["epoch"] for s in saved for src in s["stream"]["sources"]), default=0)
        why = "; ".join(changes)
        if not cfg.allow_reshuffle:
            raise DataError(
                f"data.allow_reshuffle: cannot resume the data order exactly: {why}. Use the original "
                f"layout, or set data.allow_reshuffle=true to restart epoch {epoch} in a new order "
                "(data already read in that epoch is seen again; nothing is skipped)"
            )
        log.warning("data: %s; data.allow_reshuffle=true: restarting epoch %d in this layout's order", why, epoch)
        counters = {k: sum(s["counters"][k] for s in saved) for k in ("bad_shards", "skipped_docs")}
        fresh = {"sources": [fresh_source_state(epoch) for _ in cfg.sources], "taken": [0] * len(cfg.sources)}
        self._states = [
            {"stream": fresh, "leftover": np.zeros(0, np.uint16), "counters": counters if i == 0 else {}}
            for i in range(cfg.readers)
        ]
        self._next_reader = 0
        self._batches = int(state["batches"])

    def load_resharded_state(self, states: list[dict]) -> None:
        """Continue from the states of *every* rank of a run with another world size (in rank order).

        Shards are assigned by slot, so when the old and new layouts have the same number of slots
        (world size x readers: 2 ranks x 1 reader -> 1 rank x 2 workers, and back) and every old reader
        has delivered the same number of micro-batches, each new reader takes over the old reader of
        its slot and the data continues exactly. Otherwise this is ``load_state_dict(states[0])``:
        refused, or with ``data.allow_reshuffle`` the epoch restarts in the new order.
        """
        self.close()
        cfg = self.cfg
        old_readers = [max(1, s["num_workers"]) for s in states]
        per_reader = {s["batches"] // r for s, r in zip(states, old_readers)}
        exact = (
            all(isinstance(s, dict) and s.get("version") == STATE_VERSION for s in states)
            and all(s["split"] == cfg.split and s["fingerprint"] == cfg.fingerprint() for s in states)
            and len(states) * old_readers[0] == cfg.n_slots
            and all(s["next_reader"] == 0 and s["batches"] % r == 0 for s, r in zip(states, old_readers))
            and len(per_reader) == 1
        )
        if not exact:
            self.load_state_dict(states[0])
            return
        slots = [reader for s in states for reader in s["readers"]]
        first = cfg.rank * cfg.readers
        self._states = [_import_reader(slots[first + w]) for w in range(cfg.readers)]
        self._next_reader = 0
        self._batches = per_reader.pop() * cfg.readers
        log.info("data: continuing exactly in the new layout (%d slot(s) mapped one to one)", cfg.n_slots)

    def shards_for(self, epoch: int, reader: int) -> list[list[str]]:
        """Per source, the shard URLs reader ``reader`` of this rank reads in ``epoch`` (train), in order: with
        fewer shards than readers, the one shard it shares with others (``stream.doc_share``)."""
        cfg = self.cfg
        slot = cfg.rank * cfg.readers + reader
        return [
            [
                src.shards[i].url
                for i in shard_plan(
                    len(src.shards),
                    seed=cfg.seed,
                    src_idx=k,
                    epoch=epoch,
                    slot=slot,
                    n_slots=cfg.n_slots,
                    train=cfg.train,
                )
            ]
            for k, src in enumerate(cfg.sources)
        ]

    def stats(self) -> dict:
        """``bad_shards``, ``skipped_docs``, ``epoch`` (minimum over readers and sources), ``epochs`` per
        source, ``batches`` and ``tokens`` delivered, and ``source_tokens`` per source, for this rank."""
        snaps = [s for s in self._states if s is not None]
        n_src = len(self.cfg.sources)
        epochs = [
            min(s["stream"]["sources"][i]["epoch"] for s in snaps) if len(snaps) == len(self._states) else 0
            for i in range(n_src)
        ]
        return {
            "bad_shards": sum(s["counters"].get("bad_shards", 0) for s in snaps),
            "skipped_docs": sum(s["counters"].get("skipped_docs", 0) for s in snaps),
            "epoch": min(epochs),
            "epochs": epochs,
            "batches": self._batches,
            "tokens": self._batches * self.cfg.micro_batch_size * self.cfg.seq_len,
            "source_tokens": [sum(s["stream"]["taken"][i] for s in snaps) for i in range(n_src)],
        }


def build_loader(
    spec_data,
    split: str = "train",
    *,
    seq_len: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    vocab_size: int,
) -> TokenLoader:
    """A loader over ``spec_data`` (a ``DataSection``) for ``split``; every check runs here, before any batch.

    With named ``data.val`` sources, ``split="val"`` mixes them all; ``build_val_loaders`` keeps them apart.
    Raises ``DataError`` (a ``ValueError``) whose message names the spec field at fault.
    """
    _check_sizes(seq_len, micro_batch_size, rank, world_size)
    tok = check_tokenizer(spec_data.tokenizer, vocab_size)
    sources = split_sources(spec_data, split)
    return _loader(spec_data, split, sources, tok, seq_len, micro_batch_size, rank, world_size, seed, vocab_size)


def build_val_loaders(
    spec_data,
    *,
    seq_len: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    vocab_size: int,
) -> dict[str | None, TokenLoader]:
    """One val loader per named ``data.val`` source (key: its name), else one loader (key None) that is
    ``build_loader(spec_data, "val", ...)``. A named source's loader reads exactly what the val loader of
    a spec with ``data.val`` = that source's path reads. Raises ``DataError`` like ``build_loader``."""
    _check_sizes(seq_len, micro_batch_size, rank, world_size)
    tok = check_tokenizer(spec_data.tokenizer, vocab_size)
    return {
        name: _loader(spec_data, "val", sources, tok, seq_len, micro_batch_size, rank, world_size, seed, vocab_size)
        for name, sources in val_sets(spec_data).items()
    }


def _check_sizes(seq_len: int, micro_batch_size: int, rank: int, world_size: int) -> None:
    if seq_len <= 0 or micro_batch_size <= 0:
        raise DataError(f"data.seq_len: seq_len={seq_len} and micro_batch_size={micro_batch_size} must be positive")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def _loader(
    spec_data,
    split: str,
    sources: list[Source],
    tok,
    seq_len: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    vocab_size: int,
) -> TokenLoader:
    check_sources(sources, tok, spec_data.tokenizer, vocab_size)
    cfg = LoaderConfig(
        sources=sources,
        split=split,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=spec_data.num_workers,
        seed=seed,
        shuffle_buffer=spec_data.shuffle_buffer,
        on_error=spec_data.on_error,
        vocab_limit=tok.vocab_size,
        eos_id=tok.eos_id,
        allow_reshuffle=spec_data.allow_reshuffle,
    )
    if cfg.train:
        check_readers(sources, world_size, cfg.num_workers)
    return TokenLoader(cfg)
