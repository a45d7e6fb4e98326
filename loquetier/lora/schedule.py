"""Learning-rate schedules: a pure function of the optimizer step (no state to checkpoint)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, *, base_lr: float, schedule: str, warmup_steps: int = 0,
          total_steps: int | None = None) -> float:
    """The LR for optimizer step ``step`` (0-based: the first update uses ``lr_at(0)``).

    Semantics:
        step < warmup:  base_lr * (step + 1) / (warmup + 1)       # linear ramp, never 0
        constant:       base_lr
        linear:         base_lr * max(0, (total - step) / (total - warmup))
        cosine:         base_lr * 0.5 * (1 + cos(pi * min(1, (step - warmup) / (total - warmup))))
    ``linear`` and ``cosine`` need ``total_steps``; with ``total_steps <= warmup`` they stay at base_lr.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; expected one of {SCHEDULES}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return base_lr
    if total_steps is None:
        raise ValueError(f"lr_schedule {schedule!r} needs the total number of steps")
    span = total_steps - warmup_steps
    if span <= 0:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
