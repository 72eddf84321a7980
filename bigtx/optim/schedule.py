"""Learning rate as a pure function of the step, so a resumed run continues the same curve."""

from __future__ import annotations

import math

from bigtx.config.spec import OptimSection, ScheduleSection


def lr_at(step: int, total_steps: int, optim: OptimSection, schedule: ScheduleSection) -> float:
    """Learning rate for the optimizer step that follows ``step`` completed steps.

    Linear warm-up from lr/warmup to lr over ``warmup_steps``, then ``cosine``, ``linear``,
    ``constant`` or ``wsd`` (warmup-stable-decay: constant, then a linear decay over the last
    ``decay_fraction`` of the run) down to ``min_lr`` at ``total_steps``.
    """
    peak, floor, warmup = optim.lr, optim.min_lr, schedule.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if schedule.decay == "constant":
        return peak
    if schedule.decay == "linear":
        return peak - (peak - floor) * progress
    if schedule.decay == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    stable = 1.0 - schedule.decay_fraction
    if progress <= stable:
        return peak
    return peak - (peak - floor) * (progress - stable) / schedule.decay_fraction
