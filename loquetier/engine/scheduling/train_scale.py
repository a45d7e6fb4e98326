"""The training share's AIMD factor: cut when inference misses its SLO, grown back while it meets it.

Invariant: ``value`` stays in ``[min_scale, 1]``."""

from __future__ import annotations


class TrainScale:
    """AIMD factor in [min_scale, 1] applied to the training time allowance when inference is present."""

    def __init__(self, decrease: float = 0.5, increase: float = 0.05, min_scale: float = 0.05) -> None:
        if not 0.0 < decrease < 1.0:
            raise ValueError("decrease must be in (0, 1)")
        if not 0.0 < increase <= 1.0:
            raise ValueError("increase must be in (0, 1]")
        if not 0.0 <= min_scale <= 1.0:
            raise ValueError("min_scale must be in [0, 1]")
        self.decrease = decrease
        self.increase = increase
        self.min_scale = min_scale
        self.value = 1.0

    def update(self, *, violated: bool, attainment: float, target: float) -> float:
        if violated:
            self.value = max(self.min_scale, self.value * self.decrease)
        elif attainment >= target:
            self.value = min(1.0, self.value + self.increase)
        return self.value

    def reset(self) -> None:
        self.value = 1.0
