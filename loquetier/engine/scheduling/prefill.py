"""Prefill phase: prompt chunks for running-but-prefilling and waiting sequences.

Invariants:

- order (``prefill_order``): requests that can still meet their TTFT deadline first, then late ones
  (still served, reported as misses), each group by priority-weighted slack;
- a chunk is bounded by ``max_prefill_chunk``, the step's tokens left and the time budget of the
  running decodes (at least ``min_prefill_tokens_per_step`` so prefill always progresses); prefill
  never borrows against future tokens, but a prompt chunk that must run eagerly anyway rides in a
  step that will train, within that step's time (``ride_budget``);
- with decode graphs, a step leaves the graph path for prefill only when the prompt time is worth the
  eager step's fixed price (``mixed_s``, charged once, when a step first takes non-decode rows), unless
  the request's TTFT is at stake (``prefill_is_urgent``);
- with ``prefill_coalesce_ms``, a step that would otherwise be decode-only holds new requests back so
  arrivals are prefilled together (``hold_new_prefills``);
- admission (``RequestQueue.admit``) never preempts, and a sequence preempted in this step is not
  readmitted in the same step.
"""

from __future__ import annotations

from loquetier.engine.scheduling.budget import num_tokens_in, weight
from loquetier.engine.scheduling.config import SchedulerConfig
from loquetier.engine.scheduling.plan import StepPlan
from loquetier.engine.scheduling.pricing import StepCost, step_features
from loquetier.engine.scheduling.queue import RequestQueue
from loquetier.engine.scheduling.slo import deadline, ttft_s
from loquetier.engine.scheduling.training import train_pays
from loquetier.engine.sequence import PrefillChunk, RequestState, SequenceStatus


def prefill_order(queue: RequestQueue, now: float, cost: StepCost) -> list[RequestState]:
    """Requests that can still meet their deadline first, then late ones; each group by weighted slack.

    Slack is the time left to the deadline (EDF order); priority weights it (``slack / w`` while
    positive, ``slack * w`` once late), so a heavier request looks more urgent. Ties go to a prefill
    already in progress, then to the earlier request. Whether a request can still make it uses the
    predicted time of its remaining prefill. Ordering by time left, not by laxity (time left minus
    remaining work), keeps chunked prefill finishing requests one after another instead of
    spreading progress over all of them.
    """

    def key(seq: RequestState) -> tuple[int, float, int, int]:
        slack = deadline(seq) - now
        w = weight(seq.priority)
        is_late = slack - seq.num_uncomputed_tokens * cost.prefill_token_s < 0
        weighted = slack * w if slack < 0 else slack / w
        started = 0 if seq.status is SequenceStatus.RUNNING else 1
        return (int(is_late), weighted, started, queue.order(seq.seq_id))

    candidates = [s for s in queue.running if s.is_prefilling] + queue.waiting
    return sorted(candidates, key=key)


def prefill_is_urgent(seq: RequestState, plan: StepPlan, step_s: float) -> bool:
    """With decode graphs: whether ``seq``'s first token is due within about two steps that would
    prefill the rest of its prompt (``step_s``: the step so far, as a mixed step)."""
    if not plan.graphs.decode:
        return False
    prefill_s = step_s + seq.num_uncomputed_tokens * plan.cost.prefill_token_s
    return deadline(seq) - plan.now <= 2.0 * prefill_s


def hold_new_prefills(plan: StepPlan, queue: RequestQueue, config: SchedulerConfig, mixed_step_s: float) -> bool:
    """Whether this step leaves waiting requests for a later one, so that it stays decode-only.

    Held only while: coalescing is on, the step has decode rows, no admitted prefill is in flight
    (that step is mixed anyway), their prompts would not fill the step's tokens, and every waiting
    request has waited less than ``min(max(prefill_coalesce_ms, mixed_s), TTFT / 2)`` with more than two
    prefill steps' worth of time (``mixed_step_s`` plus its prompt) left to its TTFT deadline.
    """
    cost, now = plan.cost, plan.now
    wait_s = (config.prefill_coalesce_ms or 0.0) / 1e3
    if wait_s <= 0.0 or not plan.batch.decode_seqs or not queue.waiting:
        return False
    # the dearer a mixed step, the more prompts it should carry: hold at least its price
    wait_s = max(wait_s, cost.mixed_s if plan.graphs.decode else 0.0)
    if any(s.is_prefilling for s in queue.running):
        return False
    waiting_tokens = sum(s.num_uncomputed_tokens for s in queue.waiting)
    if waiting_tokens >= plan.tokens_left:
        return False
    step_s = mixed_step_s + waiting_tokens * cost.prefill_token_s
    for seq in queue.waiting:
        waited = now - seq.arrival_time
        if waited >= min(wait_s, 0.5 * ttft_s(seq)) or deadline(seq) - now <= 2.0 * step_s:
            return False
    return True


def start_prefill(plan: StepPlan, queue: RequestQueue, config: SchedulerConfig) -> None:
    """The price of the step so far, whether it will likely train (``ride_budget``) and whether new
    requests are held back (``hold_new``)."""
    cost = plan.cost
    plan.predicted = cost.predict(step_features(plan.batch, plan.graphs)) + plan.reserved * cost.train_token_s
    if plan.reserved:
        plan.predicted += cost.mixed_s + cost.train_step_s
    # Whether this step will likely train beside its decode rows (borrowing with tpot_lookahead): it
    # runs eagerly then, so a prompt tail that must run eagerly rides along at no extra fixed price,
    # within the step's time, instead of waiting behind long training steps for its turn.
    train_cost = plan.train_cost  # what fill_training will plan at
    fixed_train = train_cost.mixed_s + train_cost.train_step_s
    if config.tpot_lookahead and plan.demands and not plan.probe_due and plan.train_budget is not None:
        work = plan.train_scale * (plan.train_budget * config.tpot_headroom - plan.train_predicted
                                   - fixed_train)
        if train_pays(work, fixed_train, plan, config):
            plan.ride_budget = plan.train_budget
    plan.hold_new = not plan.mixed and hold_new_prefills(plan, queue, config, plan.predicted + cost.mixed_s)
    if plan.hold_new and plan.demands and plan.time_budget is not None:
        # training will take this step off the graph path anyway: the held prompts join it
        pre_spare = max(0.0, plan.time_budget * config.tpot_headroom - plan.predicted - cost.mixed_s)
        plan.hold_new = plan.probe_due or plan.train_scale * pre_spare < cost.mixed_s


def graph_room(plan: StepPlan, seq: RequestState) -> int:
    """Prompt rows of ``seq`` this step can still take and stay a graph step (prefill graphs), else 0."""
    graphs, batch = plan.graphs, plan.batch
    if not (graphs.decode and not plan.mixed and graphs.max_rows):
        return 0
    room = graphs.max_rows - batch.num_decode_rows - batch.num_prefill_tokens
    if room > 0 and graphs.max_mean_context:
        # this chunk's rows read start + 1, start + 2, ... keys: a graph step while their mean stays
        # within the limit (a prompt's tail far into it runs eagerly)
        fit = 2 * (graphs.max_mean_context - seq.num_computed_tokens) - 1
        room = min(room, max(0, fit))
    return room


def chunk_allowance(plan: StepPlan, seq: RequestState, config: SchedulerConfig, tokens_left: int, room: int) -> int:
    """The most prompt tokens of ``seq`` this step may take (``room``: its ``graph_room``)."""
    cost = plan.cost
    allowance = tokens_left
    if plan.time_budget is not None:
        extra = 0.0 if plan.mixed or room > 0 else cost.mixed_s  # the eager price this chunk would add
        spare = plan.time_budget * config.tpot_headroom - plan.predicted - extra
        if plan.ride_budget is not None and room <= 0:  # an eager chunk in a training step
            fixed_train = cost.mixed_s + cost.train_step_s
            spare = max(spare, plan.ride_budget * config.tpot_headroom - plan.predicted - fixed_train)
        by_time = num_tokens_in(spare, cost.prefill_token_s)
        if prefill_is_urgent(seq, plan, plan.predicted + extra):
            # its TTFT is at stake: up to the burst cap, even past what the decoders banked
            cap = plan.burst_cap * config.tpot_headroom - plan.predicted - extra
            by_time = max(by_time, num_tokens_in(cap, cost.prefill_token_s), config.min_prefill_tokens_per_step)
        elif (plan.graphs.decode and not plan.mixed and room <= 0 and plan.ride_budget is None
              and by_time * cost.prefill_token_s < cost.mixed_s):
            # a sliver of prefill would take the step off the graph path for little progress:
            # decode-only steps bank time for one large prefill step instead
            by_time = 0
        elif not plan.batch.prefill_chunks:
            by_time = max(by_time, config.min_prefill_tokens_per_step)
        allowance = min(allowance, by_time)
    if room > 0:
        allowance = min(allowance, room)  # stay on the graph path
    return allowance


def add_prefill_chunks(plan: StepPlan, queue: RequestQueue, config: SchedulerConfig) -> None:
    """Prompt chunks by ``prefill_order`` until the step's tokens or time run out."""
    batch, cost = plan.batch, plan.cost
    tokens_left = plan.tokens_left
    for seq in prefill_order(queue, plan.now, cost):
        if tokens_left <= 0:
            break
        if seq.seq_id in plan.scheduled or seq in batch.preempted:
            continue  # a sequence preempted in this step is not readmitted in the same step
        if plan.hold_new and seq.status is not SequenceStatus.RUNNING:
            continue
        room = graph_room(plan, seq)
        allowance = chunk_allowance(plan, seq, config, tokens_left, room)
        if allowance <= 0:
            if plan.graphs.decode:
                continue  # a later, urgent request may still need its prefill in this step
            break
        if seq.status is not SequenceStatus.RUNNING and not queue.admit(seq):
            continue
        length = min(seq.num_uncomputed_tokens, config.max_prefill_chunk, allowance)
        chunk = PrefillChunk(seq, seq.num_computed_tokens, length)
        batch.prefill_chunks.append(chunk)
        plan.scheduled.add(seq.seq_id)
        tokens_left -= length
        plan.predicted += length * cost.prefill_token_s + (chunk.start + length) * cost.kv_token_s
        if not plan.mixed and room <= 0:
            plan.predicted += cost.mixed_s
            plan.mixed = True
    plan.tokens_left = tokens_left
