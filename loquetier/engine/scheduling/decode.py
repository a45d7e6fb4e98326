"""Decode phase: one row for every running sequence past its prefill, and the time budget they set.

Invariants: decode never starves (TPOT first): rows go most important first, and a row that cannot
get a KV slot preempts by recompute (``RequestQueue.make_room``), possibly itself; the step's time
budget is the tightest of the rows' ``decode_budget``; training's budget may also borrow against
``tpot_lookahead`` future tokens; prefill never borrows.
"""

from __future__ import annotations

from loquetier.engine.scheduling.budget import decode_budget
from loquetier.engine.scheduling.config import SchedulerConfig
from loquetier.engine.scheduling.plan import StepPlan
from loquetier.engine.scheduling.pricing import step_features
from loquetier.engine.scheduling.queue import RequestQueue
from loquetier.engine.scheduling.slo import tpot_s
from loquetier.engine.sequence import SequenceStatus


def add_decode_rows(plan: StepPlan, queue: RequestQueue) -> None:
    """Decode rows, most important first; victims come from the unscheduled tail."""
    batch = plan.batch
    for seq in sorted(queue.running, key=queue.importance, reverse=True):
        if seq.is_prefilling or seq.status is not SequenceStatus.RUNNING:
            continue
        if seq.num_pending and seq.num_output_tokens + seq.num_pending >= seq.sampling.max_tokens:
            continue  # its pending token is its last: it finishes when the token is applied
        if not queue.make_room(seq, plan.scheduled, batch):
            continue
        queue.kv.allocate(seq.seq_id, 1)
        batch.decode_seqs.append(seq)
        plan.scheduled.add(seq.seq_id)
    plan.tokens_left -= batch.num_decode_rows


def set_decode_budgets(plan: StepPlan, config: SchedulerConfig) -> None:
    """The decoders' time budget, training's (with ``tpot_lookahead``) and the burst cap."""
    batch, now = plan.batch, plan.now
    if not batch.decode_seqs:
        return
    plan.time_budget = min(decode_budget(s, now, config) for s in batch.decode_seqs)
    plan.train_budget = plan.time_budget
    if config.tpot_lookahead:
        # a decode-only step of these rows: the rate at which future tokens repay a longer step
        plan.repay_s = plan.cost.predict(step_features(batch, plan.graphs))
        plan.train_budget = min(decode_budget(s, now, config, plan.repay_s) for s in batch.decode_seqs)
    plan.burst_cap = min(tpot_s(s) for s in batch.decode_seqs) * config.tpot_burst
