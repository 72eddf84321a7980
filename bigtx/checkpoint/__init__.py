"""Checkpoint service used by the trainer: atomic sharded save, verified resume, re-sharding."""

from bigtx.checkpoint.compat import spec_changes
from bigtx.checkpoint.store import (
    CheckpointError,
    apply_retention,
    complete_checkpoints,
    load_rank_state,
    mark_universal_capable,
    rank_file,
    read_meta,
    remove_incomplete,
    resolve,
    set_aside_after,
    step_of,
    tag_for,
    to_universal,
    verify,
)

__all__ = [
    "CheckpointError",
    "apply_retention",
    "mark_universal_capable",
    "complete_checkpoints",
    "set_aside_after",
    "load_rank_state",
    "rank_file",
    "read_meta",
    "remove_incomplete",
    "resolve",
    "spec_changes",
    "step_of",
    "tag_for",
    "to_universal",
    "verify",
]
