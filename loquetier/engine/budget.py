"""Training-token budget: weighted fair sharing among jobs and the AIMD training scale.

``FairShare`` splits a step's training tokens among jobs by weight (``1 + priority``), keeping each
job's ``served`` token count; allocation is water-filling on the virtual time ``served / weight``::

    a_j(L) = max(floor_j, min(cap_j, weight_j * L - served_j))
    L* = max L such that sum_j a_j(L) <= token_budget and sum_j cost_j * a_j(L) <= time_budget

so jobs with equal weight converge to equal token totals, heavier jobs get proportionally more, and
``floor_j`` (the job's ``min_share`` of the step) is always granted. A job that becomes active again
(or is new) starts at the current minimum virtual time, so idling does not bank credit.

``TrainScale`` is the multiplicative-decrease / additive-increase factor on the training time
allowance: a step that overran its time budget or produced an SLO miss halves it; a clean step with
window attainment at or above target adds a little back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class JobDemand:
    job_id: str
    weight: float
    floor_tokens: int  # guaranteed this step
    cap_tokens: int  # the most the job can use this step
    token_cost_s: float  # predicted seconds per token (train: fwd+bwd, eval: fwd)


class FairShare:
    def __init__(self) -> None:
        self.served: dict[str, float] = {}
        self._active: set[str] = set()

    def forget(self, job_id: str) -> None:
        self.served.pop(job_id, None)
        self._active.discard(job_id)

    def charge(self, job_id: str, num_tokens: int) -> None:
        self.served[job_id] = self.served.get(job_id, 0.0) + num_tokens

    def allocate(
        self, demands: list[JobDemand], token_budget: int, time_budget_s: float | None
    ) -> dict[str, int]:
        """Tokens per job for one step (jobs with 0 are omitted). ``time_budget_s`` None: no time cap."""
        demands = [d for d in demands if d.cap_tokens > 0]
        if not demands:
            self._active = set()
            return {}
        self._catch_up(demands)
        floors = {d.job_id: min(d.floor_tokens, d.cap_tokens) for d in demands}
        time_cap = math.inf if time_budget_s is None else time_budget_s

        def amounts(level: float) -> dict[str, int]:
            return {
                d.job_id: max(
                    floors[d.job_id], min(d.cap_tokens, math.floor(d.weight * level - self.served[d.job_id]))
                )
                for d in demands
            }

        def fits(a: dict[str, int]) -> bool:
            tokens = sum(a.values())
            time = sum(d.token_cost_s * a[d.job_id] for d in demands)
            return tokens <= token_budget and time <= time_cap + 1e-12

        lo = min(self.served[d.job_id] / d.weight for d in demands)
        hi = max((self.served[d.job_id] + d.cap_tokens) / d.weight for d in demands)
        if fits(amounts(hi)):
            return {k: v for k, v in amounts(hi).items() if v > 0}
        if not fits(amounts(lo)):
            return {k: v for k, v in floors.items() if v > 0}
        for _ in range(60):
            mid = (lo + hi) / 2
            if fits(amounts(mid)):
                lo = mid
            else:
                hi = mid
        alloc = amounts(lo)
        # Rounding leftovers: one token at a time to the job furthest behind, while the budget allows.
        by_need = sorted(demands, key=lambda d: (self.served[d.job_id] + alloc[d.job_id]) / d.weight)
        for d in by_need:
            if alloc[d.job_id] < d.cap_tokens:
                alloc[d.job_id] += 1
                if not fits(alloc):
                    alloc[d.job_id] -= 1
        return {k: v for k, v in alloc.items() if v > 0}

    def _catch_up(self, demands: list[JobDemand]) -> None:
        returning = [d for d in demands if d.job_id not in self._active]
        staying = [d for d in demands if d.job_id in self._active]
        if staying:
            base = min(self.served.get(d.job_id, 0.0) / d.weight for d in staying)
        else:
            base = min(self.served.get(d.job_id, 0.0) / d.weight for d in demands)
        for d in returning:
            self.served[d.job_id] = max(self.served.get(d.job_id, 0.0), base * d.weight)
        self._active = {d.job_id for d in demands}


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
