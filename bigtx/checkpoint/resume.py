"""Choosing the checkpoint a run continues from."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch.distributed as dist

from bigtx.checkpoint.store import COMPLETE, CheckpointError, complete_checkpoints, remove_incomplete, verify

log = logging.getLogger("bigtx")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def prepare_run_dir(run_dir: Path, resume: str, overwrite: bool, is_main: bool) -> None:
    """Before any process group: refuse to start fresh over an existing run unless told to.

    With ``overwrite`` the old checkpoints, metrics and TensorBoard logs are deleted (rank 0).
    """
    ckpt_root = run_dir / "checkpoints"
    existing = complete_checkpoints(ckpt_root)
    if resume != "none" or not (existing or (run_dir / "metrics.jsonl").exists()):
        return
    if not overwrite:
        raise CheckpointError(
            f"run.dir {run_dir} already holds a run ({len(existing)} checkpoint(s)); "
            "use checkpoint.resume=auto to continue it, or checkpoint.overwrite=true to delete it and start over"
        )
    if is_main:
        for name in ("checkpoints", "tb"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "FINISHED"):
            (run_dir / name).unlink(missing_ok=True)


def find_resume_point(ckpt_root: Path, resume: str, is_main: bool) -> Path | None:
    """Collective. The checkpoint to load: ``none`` -> None; ``auto`` -> the newest that verifies
    (falling back past corrupt ones with a warning); a path -> that one, or an error.
    """
    if resume == "none":
        return None
    if is_main:
        for path in remove_incomplete(ckpt_root):
            log.warning("removed incomplete checkpoint %s (interrupted while saving)", path)
    _barrier()
    if resume != "auto":
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"checkpoint.resume: {path} is not a complete bigtx checkpoint (no {COMPLETE})")
        problems = verify(path)
        if problems:
            raise CheckpointError(f"checkpoint.resume: {path} is damaged:\n  " + "\n  ".join(problems))
        return path
    for path in complete_checkpoints(ckpt_root):
        problems = verify(path)
        if not problems:
            return path
        log.warning("checkpoint %s is damaged, falling back to an older one:\n  %s", path, "\n  ".join(problems))
    return None
