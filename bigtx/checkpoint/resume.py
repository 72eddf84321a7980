"""Where a run continues from: the resume plan, decided once before the model is built."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from bigtx.checkpoint.compat import spec_changes
from bigtx.checkpoint.store import (
    COMPLETE,
    CheckpointError,
    complete_checkpoints,
    read_meta,
    remove_incomplete,
    to_universal,
    verify,
)

log = logging.getLogger("bigtx")

FINISHED = "FINISHED"


@dataclass(frozen=True)
class ResumePlan:
    """What ``plan_resume`` decided; every rank holds the same plan."""

    checkpoint: Path | None = None  # the verified checkpoint to continue from; None: a fresh start
    meta: dict[str, Any] = field(default_factory=dict)  # its bigtx_meta.json, read once
    reshard: bool = False  # its ZeRO partitions do not fit this run: load the universal copy
    finished: bool = False  # the run already reached its last step: nothing to do

    @property
    def load_dir(self) -> Path:
        """The directory DeepSpeed loads: the checkpoint, or its universal copy when re-sharding."""
        assert self.checkpoint is not None
        return self.checkpoint.parent / "universal" / self.checkpoint.name if self.reshard else self.checkpoint


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _on_rank0(work: Any, is_main: bool) -> None:
    """Collective: rank 0 runs ``work()`` while the others wait; its ``CheckpointError`` is raised on
    every rank, so no rank waits for a peer that has given up."""
    error = None
    if is_main:
        try:
            work()
        except CheckpointError as exc:
            error = str(exc)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        holder = [error]
        dist.broadcast_object_list(holder, src=0)
        error = holder[0]
    if error is not None:
        raise CheckpointError(error)


def prepare_run_dir(run_dir: Path, resume: str, overwrite: bool, is_main: bool) -> None:
    """Refuse to start fresh over an existing run unless told to.

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
        for name in ("metrics.jsonl", FINISHED):
            (run_dir / name).unlink(missing_ok=True)


def find_resume_point(ckpt_root: Path, resume: str, is_main: bool) -> Path | None:
    """Collective. The checkpoint to load: ``none`` -> None; ``auto`` -> the newest that verifies
    (falling back past corrupt ones with a warning), None when there is no complete checkpoint, and a
    ``CheckpointError`` when there are some and every one is damaged (starting over would train from
    step 0 in a run directory whose checkpoints retention then removes); a path -> that one, or an error.
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
    damaged = []
    for path in complete_checkpoints(ckpt_root):
        problems = verify(path)
        if not problems:
            return path
        log.warning("checkpoint %s is damaged, falling back to an older one:\n  %s", path, "\n  ".join(problems))
        damaged.append(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    if damaged:
        raise CheckpointError(
            f"checkpoint.resume=auto: every checkpoint in {ckpt_root} is damaged:\n  "
            + "\n  ".join(damaged)
            + "\nfix: restore the damaged files from a copy, or start over in a new run.dir"
        )
    return None


def needs_universal(meta: dict[str, Any], zero_stage: int, world_size: int) -> bool:
    """Whether the checkpoint's ZeRO partitions must be re-sharded to load at this stage and world size.

    ZeRO-0 keeps the whole optimizer state on every rank, so it loads at any world size as it is.
    """
    same_stage = meta["zero_stage"] == zero_stage
    return not (same_stage and (meta["world_size"] == world_size or zero_stage == 0))


def _check_spec(path: Path, meta: dict[str, Any], spec: dict[str, Any]) -> None:
    """Refuse spec changes that break continuation (``CheckpointError`` with the diff); warn about risky ones."""
    warnings, refusals = spec_changes(meta["spec"], spec)
    if refusals:
        raise CheckpointError(
            "the run spec changed in ways that break continuation:\n  "
            + "\n  ".join(f"{line}  (cannot change when resuming from {path})" for line in refusals)
            + "\nfix: restore these fields, or start a new run (new run.dir, or checkpoint.resume=none)"
        )
    for line in warnings:
        log.warning("spec changed since the checkpoint: %s", line)


def plan_resume(
    run_dir: Path,
    spec: dict[str, Any],
    *,
    world_size: int,
    total_steps: int,
    is_main: bool,
) -> ResumePlan:
    """Collective. Decide how this run starts; ``spec`` is the resolved run spec as plain data.

    In order: a run marked FINISHED at or past ``total_steps`` has nothing to do; a fresh start
    (``checkpoint.resume: none``) refuses to overwrite an existing run unless allowed; otherwise the
    newest checkpoint that verifies (or the one named) is chosen, its spec compared with this one,
    and, when its world size or ZeRO stage differs, converted to DeepSpeed's universal format
    (rank 0 converts, the others wait). Raises ``CheckpointError`` for anything that cannot continue.
    """
    ckpt = spec["checkpoint"]
    zero_stage = spec["zero"]["stage"]
    finished = run_dir / FINISHED
    if finished.exists() and ckpt["resume"] == "auto":
        done = int(finished.read_text().split()[1])
        if done >= total_steps:
            log.info("%s is marked FINISHED at step %d; nothing to do", run_dir, done)
            return ResumePlan(finished=True)
        log.info("%s finished at step %d; continuing to step %d", run_dir, done, total_steps)
    # every rank checks (so all refuse alike); only rank 0 deletes
    prepare_run_dir(run_dir, ckpt["resume"], ckpt["overwrite"], is_main)
    _barrier()
    if is_main:
        finished.unlink(missing_ok=True)
    path = find_resume_point(run_dir / "checkpoints", ckpt["resume"], is_main)
    if path is None:
        return ResumePlan()
    meta = read_meta(path)
    _check_spec(path, meta, spec)
    if meta["world_size"] != world_size:
        log.warning("checkpoint %s was written by %d rank(s); this run has %d", path, meta["world_size"], world_size)
    reshard = needs_universal(meta, zero_stage, world_size)
    if reshard:
        if meta["zero_stage"] == 0:
            raise CheckpointError(
                f"zero.stage: {path} was written at ZeRO-0, which cannot be re-sharded to ZeRO-{zero_stage}; "
                "resume at zero.stage=0"
            )
        log.warning(
            "re-sharding through DeepSpeed's universal checkpoint format (ZeRO-%d x %d ranks -> ZeRO-%d x %d)",
            meta["zero_stage"],
            meta["world_size"],
            zero_stage,
            world_size,
        )
        _on_rank0(lambda: to_universal(path), is_main)
    return ResumePlan(checkpoint=path, meta=meta, reshard=reshard)
