"""Documents for one reader ("slot" = one DataLoader worker of one rank), in a deterministic order that
can be resumed exactly from a small state. See ``bigtx.data.loader`` for the whole design."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from bigtx.data.errors import DataError
from bigtx.data.shards import CorruptShard, read_shard
from bigtx.data.sources import Shard, Source

log = logging.getLogger("bigtx.data")

_M64 = (1 << 64) - 1


def mix64(*parts: int) -> int:
    """A 64-bit hash of a few integers (splitmix64 chained): cheap, stateless randomness by counter."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h ^ (p & _M64)) + 0x9E3779B97F4A7C15 & _M64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _M64
        h ^= h >> 31
    return h


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([p & _M64 for p in parts])


def shard_plan(
    n_shards: int, *, seed: int, src_idx: int, epoch: int, slot: int, n_slots: int, train: bool
) -> list[int]:
    """Indices of the shards (of one source) that reader ``slot`` of ``n_slots`` reads in ``epoch``, in order."""
    if train:
        order = _rng(seed, 1, src_idx, epoch).permutation(n_shards)
        if n_shards < n_slots:  # fewer shards than readers: a few readers share each shard (see doc_share)
            return [int(order[slot % n_shards])]
        return order[slot::n_slots].tolist()
    if n_shards < n_slots:  # validation with few shards: every reader reads all, keeps every n_slots-th document
        return list(range(n_shards))
    return list(range(slot, n_shards, n_slots))


def doc_share(n_shards: int, *, slot: int, n_slots: int, train: bool) -> tuple[int, int]:
    """``(j, k)``: reader ``slot`` reads positions ``j, j+k, j+2k, ...`` of each of its shards' document order.

    ``(0, 1)`` (whole shards) unless a train source has fewer shards than readers. Then the shard at
    position ``q`` of the epoch's shard permutation is read by slots ``q, q+n_shards, q+2*n_shards, ...``,
    ``k`` of them, the ``j``-th taking every ``k``-th document: every document still goes to exactly one
    slot, and the split depends only on the shard count, the slot and the number of slots."""
    if not train or n_shards >= n_slots:
        return 0, 1
    first = slot % n_shards
    return slot // n_shards, len(range(first, n_slots, n_shards))


@dataclass
class Counters:
    bad_shards: int = 0
    skipped_docs: int = 0


class DocPolicy:
    """What to do with bad shards and unusable documents (``data.on_error``), and the counts of both."""

    def __init__(self, on_error: str, vocab_limit: int, eos_id: int, counters: Counters):
        self.on_error = on_error
        self.vocab_limit = vocab_limit
        self.eos_id = eos_id
        self.counters = counters
        self._warned: set[str] = set()

    def bad_shard(self, label: str, shard: Shard, reason: str) -> None:
        message = f"{label}: shard {shard.url}: {reason}"
        if self.on_error == "raise":
            raise DataError(f"{message} (set data.on_error=skip to skip bad shards)")
        self.counters.bad_shards += 1
        log.warning("%s; skipping it (data.on_error=skip; counted in bad_shards)", message)

    def accept(self, label: str, shard: Shard, key: str, doc: np.ndarray) -> bool:
        """False (and counted) for an empty document or one with ids outside the vocabulary."""
        if doc.shape[0] == 0 or (doc.shape[0] == 1 and doc[0] == self.eos_id):
            self.counters.skipped_docs += 1
            return False
        top = int(doc.max())
        if top < self.vocab_limit and (doc.dtype.kind == "u" or int(doc.min()) >= 0):
            return True
        bad = top if top >= self.vocab_limit else int(doc.min())
        message = (
            f"{label}: shard {shard.url}: document {key!r} has token id {bad}, outside the "
            f"{self.vocab_limit}-token vocabulary of data.tokenizer (shards built with another tokenizer?)"
        )
        if self.on_error == "raise":
            raise DataError(message)
        self.counters.skipped_docs += 1
        if shard.url not in self._warned:
            self._warned.add(shard.url)
            log.warning("%s; skipping such documents (counted in skipped_docs)", message)
        return False


@dataclass
class _Loaded:
    shard: Shard
    keys: list[str]
    docs: list[np.ndarray]
    order: list[int] | range


def fresh_source_state(epoch: int = 0) -> dict:
    return {"epoch": epoch, "cursor": 0, "offset": 0, "seen": 0, "docs": 0, "picks": 0, "buffer": []}


class SourceStream:
    """One source's documents for one reader.

    Training: epoch ``e``'s shard order is a permutation seeded by (seed, source, e); this reader takes
    every ``n_slots``-th shard of it (with fewer shards than readers, one shard shared with others: see
    ``doc_share``). Within a shard, documents follow a permutation seeded by
    (seed, source, e, shard). A buffer of ``buffer_size`` document *references* mixes across shard
    boundaries: the pick is a hash of (seed, source, slot, epoch, pick counter); the buffer is drained
    at the end of each epoch, so epochs never mix. Validation: no shuffling; shard striding, or document
    striding when there are fewer shards than readers; one pass.

    The state is a handful of integers plus the buffered references, so a restored stream reloads at
    most the current shard and the shards its buffer still points into.
    """

    def __init__(
        self,
        source: Source,
        src_idx: int,
        slot: int,
        n_slots: int,
        *,
        seed: int,
        train: bool,
        buffer_size: int,
        policy: DocPolicy,
        state: dict | None = None,
    ):
        self.source = source
        self.src_idx = src_idx
        self.slot = slot
        self.n_slots = n_slots
        self.seed = seed
        self.train = train
        self.buffer_size = buffer_size if train else 1
        self.policy = policy
        self._stride_docs = not train and len(source.shards) < n_slots
        self._share = doc_share(len(source.shards), slot=slot, n_slots=n_slots, train=train)
        st = state or fresh_source_state()
        self._start_epoch(int(st["epoch"]))
        self.cursor, self.offset, self.seen = int(st["cursor"]), int(st["offset"]), int(st["seen"])
        self.docs, self.picks = int(st["docs"]), int(st["picks"])
        flat = [int(v) for v in st["buffer"]]
        self._buffer = list(zip(flat[0::2], flat[1::2]))
        self._refs = Counter(c for c, _ in self._buffer)

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "offset": self.offset,
            "seen": self.seen,
            "docs": self.docs,
            "picks": self.picks,
            "buffer": [v for ref in self._buffer for v in ref],
        }

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.cursor = self.offset = self.seen = self.docs = self.picks = 0
        self._buffer: list[tuple[int, int]] = []
        self._refs: Counter = Counter()
        self._cache: dict[int, _Loaded | None] = {}
        self._plan = shard_plan(
            len(self.source.shards),
            seed=self.seed,
            src_idx=self.src_idx,
            epoch=epoch,
            slot=self.slot,
            n_slots=self.n_slots,
            train=self.train,
        )
        self._key = mix64(self.seed, 3, self.src_idx, self.slot, self.n_slots, epoch)

    def _load(self, cursor: int) -> _Loaded | None:
        if cursor in self._cache:
            return self._cache[cursor]
        shard_idx = self._plan[cursor]
        shard = self.source.shards[shard_idx]
        loaded: _Loaded | None = None
        try:
            data = read_shard(shard.url, shard.sha256, shard.samples, shard.size)
        except CorruptShard as exc:
            self.policy.bad_shard(self.source.label, shard, str(exc))
        else:
            n = len(data.docs)
            order: list[int] | range = range(n)
            if self.train:
                order = _rng(self.seed, 2, self.src_idx, self.epoch, shard_idx).permutation(n).tolist()
                j, k = self._share
                if k > 1:  # the same permutation on every reader sharing the shard, each its own residue
                    order = order[j::k]
            loaded = _Loaded(shard, data.keys, data.docs, order)
        self._cache[cursor] = loaded
        return loaded

    def _release(self, cursor: int) -> None:
        if cursor != self.cursor and self._refs[cursor] <= 0:
            self._cache.pop(cursor, None)
            self._refs.pop(cursor, None)

    def _read_next(self) -> tuple[int, int] | None:
        """The next accepted document of this epoch as (cursor, index in shard); None at the epoch's end."""
        while self.cursor < len(self._plan):
            loaded = self._load(self.cursor)
            if loaded is not None and self.offset < len(loaded.order):
                idx = loaded.order[self.offset]
                self.offset += 1
                if self._stride_docs:
                    self.seen += 1
                    if (self.seen - 1) % self.n_slots != self.slot:
                        continue
                if self.policy.accept(self.source.label, loaded.shard, loaded.keys[idx], loaded.docs[idx]):
                    return self.cursor, idx
                continue
            old = self.cursor
            self.cursor += 1
            self.offset = 0
            self._release(old)
        return None

    def _doc(self, ref: tuple[int, int]) -> np.ndarray | None:
        loaded = self._load(ref[0])  # reloads after a restore
        if loaded is None:
            return None
        doc = loaded.docs[ref[1]]
        if doc[-1] != self.policy.eos_id:  # shards from elsewhere may lack the terminator
            doc = np.append(doc, np.asarray(self.policy.eos_id, dtype=doc.dtype))
        return doc

    def next_doc(self) -> np.ndarray | None:
        """The next document; None only at the end of a validation pass."""
        while True:
            if self.buffer_size > 1:
                while len(self._buffer) < self.buffer_size:
                    ref = self._read_next()
                    if ref is None:
                        break
                    self._buffer.append(ref)
                    self._refs[ref[0]] += 1
                if self._buffer:
                    j = mix64(self._key, self.picks) % len(self._buffer)
                    self.picks += 1
                    ref = self._buffer[j]
                    self._buffer[j] = self._buffer[-1]
                    self._buffer.pop()
                    self._refs[ref[0]] -= 1
                    doc = self._doc(ref)
                    self._release(ref[0])
                    if doc is None:
                        continue
                    self.docs += 1
                    return doc
            else:
                ref = self._read_next()
                if ref is not None:
                    doc = self._doc(ref)
                    if doc is None:
                        continue
                    self.docs += 1
                    return doc
            if not self.train:
                return None
            if self.docs == 0:
                k = self._share[1]
                part = f"{len(self._plan)} shard(s)" if k == 1 else f"share (every {k}th document) of a shard"
                raise DataError(
                    f"{self.source.label}: reader {self.slot} of {self.n_slots} got no usable document from its "
                    f"{part} of {self.source.spec} in epoch {self.epoch} (see the warnings above)"
                )
            self._start_epoch(self.epoch + 1)


class SlotStream:
    """All sources of one reader. Training mixes them by tokens: the next document comes from the source
    whose share of tokens so far is furthest below its weight (ties: lower index), so realised proportions
    track the weights to within one document, with no randomness. Validation reads sources in turn."""

    def __init__(self, sources: list[Source], slot: int, n_slots: int, *, state: dict | None = None, **kw):
        st = state or {}
        saved = st.get("sources") or [None] * len(sources)
        self.train = kw["train"]
        self.streams = [SourceStream(s, i, slot, n_slots, state=saved[i], **kw) for i, s in enumerate(sources)]
        self.weights = [s.weight for s in sources]
        self.taken = [int(t) for t in st.get("taken", [0] * len(sources))]
        self.current = int(st.get("current", 0))

    def state(self) -> dict:
        return {"sources": [s.state() for s in self.streams], "taken": list(self.taken), "current": self.current}

    def next_doc(self) -> np.ndarray | None:
        if self.train:
            n = len(self.streams)
            i = 0 if n == 1 else min(range(n), key=lambda k: self.taken[k] / self.weights[k])
            doc = self.streams[i].next_doc()
            assert doc is not None  # training streams never end
            self.taken[i] += doc.shape[0]
            return doc
        while self.current < len(self.streams):
            doc = self.streams[self.current].next_doc()
            if doc is not None:
                self.taken[self.current] += doc.shape[0]
                return doc
            self.current += 1
        return None
