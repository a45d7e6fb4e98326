"""TrainingParams: how one fine-tuning job optimizes (the wire's ``params`` record, as an engine value)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .schedule import SCHEDULES


@dataclass(frozen=True)
class TrainingParams:
    """Field names follow the wire format (``TrainingJob.params``).

    ``epochs`` and ``max_steps`` (optimizer steps) may both be set: the job ends at whichever comes
    first; neither means one epoch. ``checkpoint_every`` / ``eval_every`` count optimizer steps,
    0 = only at the end. ``priority`` / ``min_share`` are the scheduler's (see ``TrainWork``).
    """

    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    epochs: int | None = None
    max_steps: int | None = None
    micro_batch_tokens: int = 4096
    grad_accum: int = 1
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    seed: int = 0
    checkpoint_every: int = 0
    eval_every: int = 0
    priority: int = 0
    min_share: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}")
        for name in ("epochs", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value!r}")
        for name in ("micro_batch_tokens", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "priority"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not -(2**63) <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"seed must lie in [-2**63, 2**64), got {self.seed!r}")
        if not 0.0 <= self.min_share <= 1.0:
            raise ValueError(f"min_share must lie in [0, 1], got {self.min_share!r}")

    @property
    def num_epochs(self) -> int | None:
        """Epoch limit: ``epochs``, else one epoch when no ``max_steps`` bounds the job."""
        if self.epochs is None and self.max_steps is None:
            return 1
        return self.epochs
