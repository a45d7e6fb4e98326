"""Step budgets: how long a step may last (time) and how many training tokens each job gets (tokens).

Time: ``decode_budget`` is how long one decoding sequence lets the step last. TPOT is a mean over a
request's tokens, so a sequence ahead of its target has banked time: with ``tpot_burst > 1`` a step
may last until its mean would reach ``tpot_headroom`` of the target, clamped to [1, ``tpot_burst``]
targets; with ``tpot_lookahead = j`` it may also borrow against its next ``j`` tokens (at most what
``max_tokens`` leaves) priced at the predicted decode-only step. ``prefill_time_limit`` is the
tightest per-step time that keeps each scheduled prefill on its TTFT deadline.

Tokens: ``FairShare`` splits a step's training tokens among jobs by weight (``1 + priority``),
keeping each job's ``served`` token count; allocation is water-filling on the virtual time
``served / weight``::

    a_j(L) = max(floor_j, min(cap_j, weight_j * L - served_j))
    L* = max L such that sum_j a_j(L) <= token_budget and sum_j cost_j * a_j(L) <= time_budget

so jobs with equal weight converge to equal token totals, heavier jobs get proportionally more, and
``floor_j`` (the job's ``min_share`` of the step, ``job_demands``) is always granted. A job that
becomes active again (or is new) starts at the current minimum virtual time, so idling does not bank
credit.

``TrainScale`` (``train_scale.py``) is the multiplicative-decrease / additive-increase factor on the training time
allowance: a step that overran its time budget or produced an SLO miss halves it; a clean step with
window attainment at or above target adds a little back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loquetier.engine.scheduling.slo import deadline, tpot_s
from loquetier.engine.sequence import RequestState, TrainWork

if TYPE_CHECKING:
    from loquetier.engine.scheduling.config import SchedulerConfig
    from loquetier.engine.scheduling.pricing import StepCost
    from loquetier.engine.sequence import ScheduledBatch


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


def weight(priority: int) -> float:
    """A request's or job's weight in orderings and shares."""
    return 1.0 + priority


def num_tokens_in(seconds: float, token_s: float) -> int:
    """Tokens that fit in ``seconds`` at ``token_s`` each: 0 for no time (or NaN), at most 2**40, so an
    infinite or absurd time budget never reaches ``math.floor`` (OverflowError on infinity)."""
    num = seconds / max(token_s, 1e-12)
    return math.floor(min(num, 2.0**40)) if num > 0 else 0


def lookahead(seq: RequestState, config: SchedulerConfig) -> int:
    """Future tokens of ``seq`` (after the one this step makes) a longer step may borrow against."""
    return max(0, min(config.tpot_lookahead, seq.sampling.max_tokens - seq.num_output_tokens - 1))


def decode_budget(seq: RequestState, now: float, config: SchedulerConfig, decode_s: float | None = None) -> float:
    """How long this step may last for ``seq``: one TPOT target, or with ``tpot_burst > 1`` the time
    until its mean TPOT would exceed ``tpot_headroom`` of the target (time banked by earlier short
    steps, plus, given ``decode_s``, what its next ``tpot_lookahead`` tokens would repay at
    ``decode_s`` a step), clamped to [1, tpot_burst] targets."""
    tpot = tpot_s(seq)
    if config.tpot_burst <= 1.0 or seq.first_token_time is None:
        return tpot
    # after this step's token and j more at decode_s each, the mean over num_output_tokens + j
    # gaps must stay <= tpot
    ahead = 0 if decode_s is None else lookahead(seq, config)
    decode_s = decode_s or 0.0
    # planned against the headroom's share of the target: steps are predicted, not known, and a
    # mean planned to the target itself ends above it about half the time
    mean = tpot * config.tpot_headroom
    banked = seq.first_token_time + (seq.num_output_tokens + ahead) * mean - ahead * decode_s - now
    return min(max(banked, tpot), config.tpot_burst * tpot)


def prefill_time_limit(batch: ScheduledBatch, now: float, config: SchedulerConfig) -> float | None:
    """Tightest per-step time that keeps each scheduled prefill on its TTFT deadline: its remaining
    slack over its remaining steps, of which a step may be planned to ``ttft_headroom`` (the limit is
    a budget the training fill plans to ``tpot_headroom`` of, hence the ratio)."""
    limit: float | None = None
    share = config.ttft_headroom / config.tpot_headroom
    for chunk in batch.prefill_chunks:
        seq = chunk.seq
        remaining = seq.num_uncomputed_tokens - chunk.length
        steps = 1 + math.ceil(remaining / config.max_prefill_chunk)
        slack = deadline(seq) - now
        per_step = share * slack / steps if slack > 0 else tpot_s(seq)
        limit = per_step if limit is None else min(limit, per_step)
    return limit


def job_demands(jobs: Iterable[TrainWork], config: SchedulerConfig, cost: StepCost) -> list[JobDemand]:
    """What each job with work asks of this step: its floor (``min_share``), its cap, its token price."""
    demands = []
    for job in jobs:
        cap = min(job.num_ready_tokens(), config.max_num_batched_tokens)
        if cap <= 0:
            continue
        demands.append(
            JobDemand(
                job_id=job.job_id,
                weight=weight(job.priority),
                floor_tokens=min(cap, math.ceil(job.min_share * config.max_num_batched_tokens)),
                cap_tokens=cap,
                token_cost_s=cost.eval_token_s if job.is_eval else cost.train_token_s,
            )
        )
    return demands


def reserved_train_tokens(demands: list[JobDemand], config: SchedulerConfig) -> int:
    """Tokens the jobs keep even under inference pressure: their floors, at least
    ``min_train_tokens_per_step`` while any job has work, never more than they can use."""
    floors = sum(d.floor_tokens for d in demands)
    caps = sum(d.cap_tokens for d in demands)
    return min(caps, max(floors, config.min_train_tokens_per_step if demands else 0))
