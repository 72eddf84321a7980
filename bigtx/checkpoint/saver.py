"""Saving checkpoints: DeepSpeed's state dicts captured on the training thread, written and hashed in
one pass, committed once every rank is done; with ``checkpoint.async`` the writing runs in a
background thread while training goes on.

How a save runs (the layout and the commit marker are ``bigtx.checkpoint.store``'s):

1. Main thread, collective: DeepSpeed's own ``save_checkpoint`` runs with a capturing checkpoint
   engine in place of its writer, so its barriers, tag check and choice of which rank writes what
   stay DeepSpeed's and stay on the training thread; it hands over each file's state dict instead
   of writing it.
2. Async only, main thread: the state dicts are copied into host buffers (``HostSnapshot``): ZeRO's
   state dicts alias the live parameters and optimizer state, which the next step overwrites. This
   copy is the whole training stall.
3. Writer (main thread, or the background thread): each file is ``torch.save``d through a hashing
   file object (digest computed from the bytes as they are written, no second read) and renamed
   into place (``hashed_io.save_hashed``); then the rank writes ``digests/rankNNNNN.json`` listing its files.
4. Commit, rank 0's writer: once every rank's digest list is there it writes ``COMPLETE.json`` and
   then ``newest``, and applies retention. A crash before that leaves the previous checkpoint newest.

Why files and not a collective for "every rank has written": a collective issued from the background
thread would run concurrently with the training thread's collectives on the same process group,
whose order gloo and NCCL require to match on every rank. The checkpoint directory is on a
filesystem all ranks share anyway (rank 0 already listed and hashed its peers' files there).

Why not DeepSpeed's own engines (checked against DeepSpeed 0.19.8): ``TorchCheckpointEngine`` writes
synchronously; ``DecoupledCheckpointEngine`` pickles each state dict through a multiprocessing queue
on the save call (on the CPU a full serialization on the training thread, on GPUs CUDA IPC handles to
live tensors that the next step overwrites), commits at the next ``save_checkpoint`` with a blocking
wait, writes DeepSpeed's ``latest`` and hashes nothing; ``FastCheckpointEngine`` needs DeepSpeed's
compiled async-io op, Nebula an Azure service, DataStates an external package. None gives "commit
only after every rank's files are written and hashed" without the rest of this module anyway.

At most one save is in flight: the next ``save`` and ``wait`` block until it is written (and, on
rank 0, committed).

Test-only: ``BIGTX_TEST_COMMIT_DELAY_S`` makes rank 0 sleep that long before each commit, so that a
test can kill a run whose background save is written but not committed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from bigtx.checkpoint.hashed_io import digest_bytes, digest_file, save_hashed
from bigtx.checkpoint.store import (
    COMPLETE,
    META,
    NEWEST,
    CheckpointError,
    _barrier,
    _fsync_write,
    _world,
    apply_retention,
    rank_file,
    tag_for,
)

log = logging.getLogger("bigtx")

_Free = dict[tuple[int, bool], list[torch.UntypedStorage]]  # spare host buffers by (bytes, pinned)

DIGESTS = "digests"  # per-rank lists of written files, inside the checkpoint until it is committed


class _Capture(CheckpointEngine):
    """A DeepSpeed checkpoint engine that keeps the state dicts it is asked to save (interface of
    DeepSpeed 0.19.8's ``CheckpointEngine``); installed only for the duration of one ``save_checkpoint``."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "bigtx-capture"
        self.files: dict[str, Any] = {}

    def create(self, info: CheckpointCommitInfo) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        self.files[path] = state_dict

    def load(self, path: str, map_location: Any = None) -> Any:
        raise CheckpointError(f"{path}: the capturing checkpoint engine only saves")

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return True


def capture(engine: Any, ckpt_root: Path, tag: str) -> dict[str, Any]:
    """Collective: DeepSpeed's ``save_checkpoint`` with its writes captured; returns this rank's files
    (name inside the checkpoint -> state dict). The state dicts may alias live tensors. Swaps the
    engine's ``checkpoint_engine`` attribute, which DeepSpeed 0.19.8 writes every file through."""
    path = ckpt_root / tag
    catcher = _Capture()
    own, engine.checkpoint_engine = engine.checkpoint_engine, catcher
    try:
        engine.save_checkpoint(str(ckpt_root), tag=tag, save_latest=False)
    finally:
        engine.checkpoint_engine = own
    return {str(Path(name).relative_to(path)): state for name, state in catcher.files.items()}


class HostSnapshot:
    """Copies of state dicts in host memory (pinned for GPU tensors), whose buffers are reused by the
    next snapshot: after the first save, taking a snapshot allocates nothing.

    Buffers are reused by size, not by the tensor they copied: the storages behind the state dicts
    change between saves (in a 2-rank ZeRO-2 run, one fp32 state tensor per parameter group at every
    save; after a load, every optimizer state tensor: tools/bench_ckpt.py saw 6 of a rank's 8-10 new),
    and a fresh buffer costs a page fault per page on its first write: the copy ran at half of
    ``memcpy``'s speed. A snapshot's buffers are reused by the next ``take``, so the caller must be done
    with a snapshot before taking the next one (``Saver`` waits for the save in flight first).

    Tensors are copied storage by storage, so tensors sharing a storage share it in the copy too and
    ``torch.save`` writes the same bytes it would have written from the live tensors.
    """

    def __init__(self) -> None:
        self._held: _Free = {}  # the buffers of the last snapshot

    def take(self, obj: Any) -> Any:
        """A copy of ``obj`` (nested dicts, lists, tuples) whose tensors no longer alias the originals."""
        free, used = self._held, {}
        out = self._copy(obj, used, free)
        if any(key[2].startswith("cuda") for key in used):
            torch.cuda.synchronize()  # a CPU-GPU sync point: the non-blocking copies are complete only now
        self._held = {}  # buffers left in ``free`` fit nothing this time: released
        for (_, nbytes, device), host in used.items():
            self._held.setdefault((nbytes, device.startswith("cuda")), []).append(host)
        return out

    def _copy(self, obj: Any, used: dict[tuple[int, int, str], torch.UntypedStorage], free: _Free) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, used, free)
        if isinstance(obj, dict):
            out = copy.copy(obj)  # keeps the mapping's type (OrderedDict, defaultdict)
            for key, value in obj.items():
                out[key] = self._copy(value, used, free)
            return out
        if isinstance(obj, list):
            return [self._copy(v, used, free) for v in obj]
        if type(obj) is tuple:
            return tuple(self._copy(v, used, free) for v in obj)
        if isinstance(obj, (str, bytes, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)):
            return obj
        return copy.deepcopy(obj)  # small objects in DeepSpeed's state (e.g. its loss scaler)

    def _tensor(
        self, t: torch.Tensor, used: dict[tuple[int, int, str], torch.UntypedStorage], free: _Free
    ) -> torch.Tensor:
        if t.layout != torch.strided:
            return t.detach().to("cpu", copy=True)
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), str(storage.device))
        host = used.get(key)
        if host is None:
            pinned = storage.device.type == "cuda"
            spare = free.get((storage.nbytes(), pinned))
            if spare:
                host = spare.pop()
            else:
                host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
            host.copy_(storage, non_blocking=True)
            used[key] = host
        view = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(view, requires_grad=t.requires_grad)
        return view.requires_grad_(t.requires_grad)


class Saver:
    """Writes the trainer's checkpoints into ``ckpt_root``; at most one save in flight.

    ``background``: ``save`` returns once the snapshot is taken and the files are written, hashed
    and committed by a background thread; otherwise ``save`` returns once the checkpoint is committed.
    ``commit_timeout_s``: how long rank 0 waits for its peers' files before giving up the save.
    """

    def __init__(
        self,
        engine: Any,
        ckpt_root: Path,
        *,
        background: bool,
        keep_last: int,
        keep_every: int,
        commit_timeout_s: float,
    ) -> None:
        self._engine, self._root, self._background = engine, ckpt_root, background
        self._keep = (keep_last, keep_every)
        self._timeout = commit_timeout_s
        self._rank, self._world = _world()
        self._snapshot = HostSnapshot()
        self._thread: threading.Thread | None = None
        self._failure: str | None = None

    def save(self, step: int, rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: checkpoint ``step`` with DeepSpeed's shards, this rank's ``rank_state`` and (rank 0)
        ``meta``; returns the checkpoint directory. Waits for the save in flight first."""
        self.wait()
        path = self._root / tag_for(step)
        if self._rank == 0:
            self._root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a leftover of a run killed while saving this very step
                shutil.rmtree(path)
        _barrier()
        files = capture(self._engine, self._root, path.name)
        files[rank_file(path, self._rank).name] = rank_state
        meta_text = json.dumps(meta, indent=2, sort_keys=True) if self._rank == 0 else None
        if not self._background:
            self._write(path, step, files, meta_text)
            _barrier()  # rank 0 has committed
            return path
        files = self._snapshot.take(files)
        self._thread = threading.Thread(
            target=self._write_reporting, args=(path, step, files, meta_text), name="bigtx-ckpt", daemon=True
        )
        self._thread.start()
        return path

    def wait(self) -> None:
        """Block until the save in flight (if any) is written, and on rank 0 committed; raises
        ``CheckpointError`` if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise CheckpointError(failure)

    def _write_reporting(self, path: Path, step: int, files: dict[str, Any], meta_text: str | None) -> None:
        try:
            self._write(path, step, files, meta_text)
        except Exception as exc:  # raised on the training thread by the next save or wait
            self._failure = f"background save of {path} failed: {type(exc).__name__}: {exc}"

    def _write(self, path: Path, step: int, files: dict[str, Any], meta_text: str | None) -> None:
        """Write this rank's files hashing them as they go, then its digest list; rank 0 then commits."""
        t0 = time.perf_counter()
        digests = {name: save_hashed(state, path / name) for name, state in sorted(files.items())}
        if meta_text is not None:
            _fsync_write(path / META, meta_text)
            digests[META] = digest_bytes(meta_text.encode())
        (path / DIGESTS).mkdir(exist_ok=True)
        _fsync_write(path / DIGESTS / f"rank{self._rank:05d}.json", json.dumps(digests))
        if self._rank == 0:
            self._commit(path, step)
            log.info("saved checkpoint %s in %.1fs", path, time.perf_counter() - t0)

    def _commit(self, path: Path, step: int) -> None:
        """Rank 0: once every rank's digest list is there, write ``COMPLETE.json`` (every file, with the
        files DeepSpeed wrote itself hashed here), then ``newest``; then apply retention."""
        lists = [path / DIGESTS / f"rank{r:05d}.json" for r in range(self._world)]
        deadline = time.monotonic() + self._timeout
        while not all(f.is_file() for f in lists):
            if time.monotonic() > deadline:
                missing = [f.name for f in lists if not f.is_file()]
                raise CheckpointError(f"{path}: no files from {', '.join(missing)} after {self._timeout:.0f}s")
            time.sleep(0.01)
        digests = {name: entry for f in lists for name, entry in json.loads(f.read_text()).items()}
        for f in path.rglob("*"):  # written by DeepSpeed directly (its zero_to_fp32.py), small
            name = str(f.relative_to(path))
            if f.is_file() and name not in digests and f.parent != path / DIGESTS:
                digests[name] = digest_file(f)
        delay = float(os.environ.get("BIGTX_TEST_COMMIT_DELAY_S", "0"))
        if delay:
            time.sleep(delay)
        _fsync_write(path / COMPLETE, json.dumps({"step": step, "files": digests}, indent=1, sort_keys=True))
        shutil.rmtree(path / DIGESTS)
        _fsync_write(self._root / NEWEST, path.name + "\n")
        for old in apply_retention(self._root, *self._keep):
            log.info("retention: removed %s", old.name)
