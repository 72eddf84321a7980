"""Sharded, atomic checkpoints on top of DeepSpeed's own ``save_checkpoint``/``load_checkpoint``.

Layout of ``RUN_DIR/checkpoints``::

    step_00000020/                 one checkpoint (the DeepSpeed tag)
        mp_rank_00_model_states.pt, *_optim_states.pt ...   written by DeepSpeed, each rank its shards
        bigtx_rank00000.pt         per rank: data-loader position and RNG states
        bigtx_meta.json            step, tokens, resolved spec and hash, bigtx version, world size
        digests/rank00000.json     per rank: the files it wrote, with size and digest (until the commit)
        COMPLETE.json              the commit: every file with size and XXH3-128 digest, written last
    newest                         name of the newest complete checkpoint, replaced atomically
    universal/step_00000020/       DeepSpeed universal form, made when the world size changes

DeepSpeed writes its own ``latest`` before its final barrier, so a crash can leave it pointing at
a partial checkpoint; bigtx never writes or reads it. A checkpoint counts only once every rank has
written and hashed its files (its digest list is there) and rank 0 has written ``COMPLETE.json``;
anything without it is ignored on resume and removed. ``bigtx.checkpoint.saver`` writes them.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bigtx.checkpoint.hashed_io import check_file

COMPLETE = "COMPLETE.json"
META = "bigtx_meta.json"
NEWEST = "newest"
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, corrupt)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    match = _TAG.match(path.name)
    if not match:
        raise CheckpointError(f"{path}: not a bigtx checkpoint directory (expected step_NNNNNNNN)")
    return int(match.group(1))


def rank_file(path: Path, rank: int) -> Path:
    return path / f"bigtx_rank{rank:05d}.pt"


def load_rank_state(path: Path, rank: int) -> dict[str, Any]:
    """One rank's data-loader position and RNG states, loaded with ``weights_only=True``: plain
    Python and tensors, no code runs. Checkpoints of bigtx 0.1 stored numpy's RNG state as an array;
    for those numpy's array reconstruction (and nothing else) is allowed as well."""
    file = rank_file(path, rank)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        import numpy as np

        try:
            from numpy._core.multiarray import _reconstruct  # numpy >= 2
        except ImportError:
            from numpy.core.multiarray import _reconstruct

        allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(
                f"{file}: not a bigtx rank state: it holds Python objects other than plain data and tensors, "
                "which bigtx refuses to unpickle"
            ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{file}: cannot be read ({type(exc).__name__}: {exc})") from None


def _fsync_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _share(items: list[str]) -> list[str]:
    """This rank's share of a list, so that hashing a large checkpoint runs on every rank at once."""
    rank, world = _world()
    return items[rank::world]


def _all_gather(local: Any) -> list[Any]:
    """Every rank's ``local`` object, in rank order."""
    world = _world()[1]
    if world == 1:
        return [local]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    return parts


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and _TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=step_of, reverse=True)


def resolve(path: Path, tag: str | None = None) -> Path:
    """The checkpoint directory meant by a run directory, its ``checkpoints/`` or a checkpoint itself.

    A run directory means ``tag`` (``step_00000020``, ``20`` or ``universal/step_00000020``) or else
    its newest checkpoint: the ``newest`` pointer (written only after the commit marker), or the
    highest complete step when the pointer is missing (a copied run). Raises ``CheckpointError``
    naming the complete checkpoints to choose from, or saying what ``path`` is not.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    known = [p.name for p in complete_checkpoints(root)]
    known += [f"universal/{p.name}" for p in complete_checkpoints(root / "universal")]
    if root == path and not known and not (path / NEWEST).is_file():
        if not ((path / COMPLETE).is_file() or (path / META).is_file() or _TAG.match(path.name)):
            raise CheckpointError(
                f"{path}: not a bigtx run directory, checkpoints/ directory or checkpoint "
                f"(no checkpoints/, {NEWEST}, {COMPLETE} or {META} in it)"
            )
        if tag is not None and tag != path.name:
            raise CheckpointError(f"--tag {tag}: {path} is a single checkpoint; give the run directory to choose a tag")
        return path
    if tag is not None:
        wanted, name = f"--tag {tag}", tag_for(int(tag)) if tag.isdigit() else tag
    elif (root / NEWEST).is_file():
        wanted, name = str(root / NEWEST), (root / NEWEST).read_text().strip()
    elif known:
        return root / known[0]
    else:
        raise CheckpointError(f"{root}: no complete checkpoint yet")
    candidate = root / name
    if not candidate.is_dir():
        raise CheckpointError(
            f"{wanted}: no checkpoint {candidate}; "
            f"complete checkpoints (choose with --tag): {', '.join(known) or 'none'}"
        )
    return candidate


def set_aside_after(ckpt_root: Path, step: int, dest: Path) -> list[Path]:
    """Move the checkpoints after ``step``, complete or not, under ``dest`` (their universal copies under
    ``dest/universal``), and point ``newest`` at the newest one left (rank 0). A rewind to ``step``
    abandons them, but nothing the user did not ask to delete is deleted: they stay readable there."""
    moved = []
    if ckpt_root.is_dir():
        for p in sorted(ckpt_root.iterdir()):
            if p.is_dir() and _TAG.match(p.name) and step_of(p) > step:
                dest.mkdir(parents=True, exist_ok=True)
                p.rename(dest / p.name)
                universal = ckpt_root / "universal" / p.name
                if universal.is_dir():
                    (dest / "universal").mkdir(exist_ok=True)
                    universal.rename(dest / "universal" / p.name)
                moved.append(p)
    left = complete_checkpoints(ckpt_root)
    if moved and left:
        _fsync_write(ckpt_root / NEWEST, left[0].name + "\n")
    return moved


def remove_incomplete(ckpt_root: Path) -> list[Path]:
    """Delete checkpoint directories that never got their commit marker (rank 0 only)."""
    removed = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.is_dir() and _TAG.match(p.name) and not (p / COMPLETE).is_file():
                shutil.rmtree(p)
                removed.append(p)
    return removed


def verify(path: Path) -> list[str]:
    """Collective: check every file against ``COMPLETE.json``; returns the problems found (all ranks)."""
    marker = path / COMPLETE
    if not marker.is_file():
        return [f"{path}: incomplete (no {COMPLETE}); it was interrupted while saving"]
    files: dict[str, dict[str, Any]] = json.loads(marker.read_text())["files"]
    problems = []
    for name in _share(sorted(files)):
        if problem := check_file(path / name, files[name]):
            problems.append(problem)
    return sorted(p for part in _all_gather(problems) for p in part)


def read_meta(path: Path) -> dict[str, Any]:
    meta = path / META
    if not meta.is_file():
        raise CheckpointError(f"{path}: no {META}; not a bigtx checkpoint (or an incomplete one)")
    return json.loads(meta.read_text())


def apply_retention(ckpt_root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last``, sparing multiples of ``keep_every``."""
    removed = []
    for path in complete_checkpoints(ckpt_root)[keep_last:]:
        if keep_every and step_of(path) % keep_every == 0:
            continue
        shutil.rmtree(path)
        universal = ckpt_root / "universal" / path.name
        if universal.exists():
            shutil.rmtree(universal)
        removed.append(path)
    return removed


def to_universal(path: Path, out: Path | None = None) -> Path:
    """Convert a checkpoint to DeepSpeed's universal format (world-size independent) with DeepSpeed's
    converter, run through its command-line entry point (``python -m deepspeed.checkpoint.ds_to_universal``,
    options checked against DeepSpeed 0.16-0.19). Raises ``CheckpointError`` with the converter's output."""
    out = out or path.parent / "universal" / path.name
    if (out / COMPLETE).is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(path),
        "--output_folder",
        str(out),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--inject_missing_state",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise CheckpointError(f"{path}: DeepSpeed's universal converter failed (exit {done.returncode}):\n{tail}")
    for name in (META,):
        shutil.copy2(path / name, out / name)
    for f in path.glob("bigtx_rank*.pt"):
        shutil.copy2(f, out / f.name)
    _fsync_write(out / COMPLETE, json.dumps({"step": step_of(path), "files": {}, "universal_of": str(path)}))
    return out


def mark_universal_capable(module: torch.nn.Module) -> None:
    """Make DeepSpeed store the ``universal_checkpoint_info`` its universal converter needs.

    bigtx models use no tensor or pipeline parallelism, so the info is just the format version.
    """
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    setattr(module, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
