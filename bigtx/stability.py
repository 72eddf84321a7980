"""Loss and gradient-norm spikes (the ``stability`` spec section): what each step's update becomes.

``SpikeGuard.judge`` takes a step's loss and gradient norm, both as every rank holds them after the
step's all-reduce, and says whether its update is applied, skipped, or whether the run rewinds to a
checkpoint. It is pure (no clock, no randomness, no I/O), so every rank decides alike and a resumed
run decides as the uninterrupted one did: its state is saved with every checkpoint (``saved`` /
``restore``).

A step is a spike when, once the window holds ``warmup`` steps, its loss exceeds mean + ``loss_k`` x
std of the window's losses, or its gradient norm (before clipping) exceeds mean + ``grad_norm_k`` x
std of the window's norms (population std over the last ``window`` applied steps). A spike's update
is skipped and its values stay out of the window. ``rewind_spikes`` spikes within ``rewind_within``
steps, or a non-finite loss or gradient norm, call for a rewind to the last checkpoint before the
first of those spikes.

A rewind is recorded in ``checkpoints/rewind.json`` (``RewindRecord``) before the run continues, so
that a run that is requeued before its next checkpoint, and resumes from the same one, skips the same
data and counts the same rewinds.
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bigtx.config.spec import StabilitySection

REWIND_RECORD = "rewind.json"


class Verdict(enum.Enum):
    APPLY = "apply"
    SKIP = "skip"
    REWIND = "rewind"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    why: str = ""  # for a skip or rewind: what was exceeded, for the log
    first_spike: int = 0  # for a rewind: the step to rewind to a checkpoint before


class StabilityStop(RuntimeError):
    """A rewind that cannot happen (no checkpoint before the spikes, or no rewinds left): the run stops."""


def _mean_std(values: deque[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


class SpikeGuard:
    """The per-step decision and the counters logged with the metrics (see the module docstring)."""

    def __init__(self, cfg: StabilitySection) -> None:
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.norms: deque[float] = deque(maxlen=cfg.window)
        self.spikes: list[int] = []  # steps of the spikes within the last rewind_within steps
        self.skipped_spikes = 0
        self.rewinds = 0
        self.skipped_batches = 0

    def limits(self) -> tuple[float, float] | None:
        """(loss, gradient norm) above which a step is a spike; None during the warm-up."""
        if len(self.losses) < self.cfg.warmup:
            return None
        (loss_mean, loss_std), (norm_mean, norm_std) = _mean_std(self.losses), _mean_std(self.norms)
        return loss_mean + self.cfg.loss_k * loss_std, norm_mean + self.cfg.grad_norm_k * norm_std

    def judge(self, step: int, loss: float, grad_norm: float) -> Decision:
        """The fate of step ``step``'s update (``loss`` and ``grad_norm`` as all-reduced); updates the state."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Decision(Verdict.REWIND, "non-finite loss or gradient norm", min([*self.spikes, step]))
        limits = self.limits()
        over = []
        if limits is not None and loss > limits[0]:
            over.append(f"loss {loss:.4g} > {limits[0]:.4g}")
        if limits is not None and grad_norm > limits[1]:
            over.append(f"grad norm {grad_norm:.4g} > {limits[1]:.4g}")
        if not over:
            self.losses.append(loss)
            self.norms.append(grad_norm)
            return Decision(Verdict.APPLY)
        self.spikes = [s for s in self.spikes if s > step - self.cfg.rewind_within] + [step]
        why = ", ".join(over)
        if len(self.spikes) >= self.cfg.rewind_spikes:
            steps = ", ".join(map(str, self.spikes))
            return Decision(Verdict.REWIND, f"{why}: spikes at steps {steps}", self.spikes[0])
        self.skipped_spikes += 1
        return Decision(Verdict.SKIP, why)

    def check_rewind(self, first_spike: int, checkpoint_step: int | None) -> None:
        """Raise ``StabilityStop`` (with the fix) when the rewind for spikes from ``first_spike`` on cannot
        happen: no rewinds left, or no checkpoint before them (``checkpoint_step`` None)."""
        if self.rewinds >= self.cfg.max_rewinds:
            raise StabilityStop(
                f"stability.max_rewinds: the run needs rewind {self.rewinds + 1} (spikes from step {first_spike}) "
                f"and {self.cfg.max_rewinds} are allowed; stopping. Fix: lower optim.lr, raise "
                "schedule.warmup_steps or optim.z_loss, or allow more with stability.max_rewinds"
            )
        if checkpoint_step is None:
            raise StabilityStop(
                f"stability: no complete checkpoint before step {first_spike} to rewind to; stopping. "
                "Fix: save more often (checkpoint.every_steps), or lower optim.lr"
            )

    def saved(self) -> dict[str, Any]:
        """The state as plain data (JSON: floats round-trip exactly), for the checkpoint's metadata."""
        return {
            "losses": list(self.losses),
            "norms": list(self.norms),
            "spikes": self.spikes,
            "skipped_spikes": self.skipped_spikes,
            "rewinds": self.rewinds,
            "skipped_batches": self.skipped_batches,
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from ``saved()``'s result (with a smaller ``window``, its newest values)."""
        self.losses = deque(map(float, saved["losses"]), maxlen=self.cfg.window)
        self.norms = deque(map(float, saved["norms"]), maxlen=self.cfg.window)
        self.spikes = [int(s) for s in saved["spikes"]]
        self.skipped_spikes = int(saved["skipped_spikes"])
        self.rewinds = int(saved["rewinds"])
        self.skipped_batches = int(saved["skipped_batches"])

    def metrics(self) -> dict[str, int]:
        return {"skipped_spikes": self.skipped_spikes, "rewinds": self.rewinds, "skipped_batches": self.skipped_batches}


@dataclass(frozen=True)
class RewindRecord:
    """A rewind to ``checkpoint``: after restoring it, ``skip_batches`` global batches are skipped and the
    counters are these (the spikes skipped on the abandoned steps stay counted)."""

    checkpoint: str  # the checkpoint directory's name (step_NNNNNNNN)
    skip_batches: int  # in total after restoring it: more rewinds to the same checkpoint skip further
    rewinds: int
    skipped_spikes: int
    skipped_batches: int

    @classmethod
    def after(cls, guard: SpikeGuard, checkpoint: Path, previous: RewindRecord | None) -> RewindRecord:
        """The record of one more rewind to ``checkpoint``, ``guard`` holding the state before it."""
        again = previous.skip_batches if previous is not None and previous.checkpoint == checkpoint.name else 0
        skip = again + guard.cfg.skip_batches
        return cls(checkpoint.name, skip, guard.rewinds + 1, guard.skipped_spikes, guard.skipped_batches + skip - again)

    def apply(self, guard: SpikeGuard) -> None:
        """Set ``guard``'s counters to the record's (its window and spikes are the checkpoint's)."""
        guard.rewinds, guard.skipped_spikes, guard.skipped_batches = (
            self.rewinds,
            self.skipped_spikes,
            self.skipped_batches,
        )


def read_record(ckpt_root: Path) -> RewindRecord | None:
    """The last rewind's record, or None."""
    path = ckpt_root / REWIND_RECORD
    if not path.is_file():
        return None
    return RewindRecord(**json.loads(path.read_text()))


def write_record(ckpt_root: Path, record: RewindRecord) -> None:
    """Replace the record atomically (rank 0)."""
    tmp = ckpt_root / (REWIND_RECORD + ".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1) + "\n")
    os.replace(tmp, ckpt_root / REWIND_RECORD)
