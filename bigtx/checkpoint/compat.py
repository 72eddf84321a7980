"""Which spec changes a resumed run may make."""

from __future__ import annotations

from typing import Any

# Changing these cannot break continuation.
SAFE = (
    "run.name",
    "run.dir",
    "train.max_steps",
    "train.max_tokens",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.progress_bar",
    "checkpoint.",
    "deepspeed.log_level",
    "data.on_error",
    "data.allow_reshuffle",
    # when a step counts as a spike, not what a step computes
    "stability",
    # these change how the same function is computed or where it started, not the function itself;
    # the preset's effect is compared field by field
    "model.preset",
    "model.init_from",
    "model.compile",
    "model.activation_checkpointing",
    # the same teacher logits, replicated on every rank or partitioned (checked equal)
    "distill.placement",
)
# Allowed, but the run no longer follows the curve it started on: warn.
WARN = (
    "schedule.",
    "optim.lr",
    "optim.min_lr",
    "optim.grad_clip",
    "optim.weight_decay",
    "optim.z_loss",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.global_batch_size",
    "zero.",
    "deepspeed.base",
    "data.num_workers",
    # online <-> a cache, or another cache (for a new number of data slots): the same teacher, its
    # top-k log-probabilities rounded to fp16 in a cache; the cache's own checks decide if it fits
    "distill.source",
)

# Fields added after checkpoints were written: an older spec lacks them, and their value here is what
# that run did.
ADDED = {"optim.z_loss": 0.0}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def spec_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(warnings, refusals): ``field: old -> new`` lines for changes that are risky or unsafe."""
    a, b = ADDED | _flatten(old), ADDED | _flatten(new)
    warnings, refusals = [], []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) == b.get(key) or key.startswith(SAFE):
            continue
        line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        (warnings if key.startswith(WARN) else refusals).append(line)
    return warnings, refusals
