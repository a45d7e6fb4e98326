"""Training phases: the floors jobs keep every step, and the fill of what the step has left.

Invariants:

- each job with work keeps ``ceil(min_share * max_num_batched_tokens)`` tokens (and jobs together at
  least ``min_train_tokens_per_step``), even under inference pressure (``reserve_training_floors``);
- with no inference in the system, training takes the whole token budget; with inference, it gets
  ``train_scale × (time budget − predicted step time)``, converted to tokens at the step model's
  prices; the time budget is the tightest of the decoders' (``train_budget``) and each scheduled
  prefill's remaining TTFT slack per remaining step (``fill_training``); the step so far and its
  training are priced at ``plan.margin`` times the fit (``plan.train_cost``), so the whole step
  fits its budget at the quantile ``plan_quantile`` of its time, not at its mean;
- while serving (requests in the system or one arrived within ``serving_idle_s``) and
  ``ttft_step_share`` > 0, no step is planned past that share of the TTFT target
  (``serving_step_cap``), an idle one included (``fill_training_idle``);
- while requests wait un-admitted, training keeps only its floors (longer steps would only delay the
  backlog); prompts held back to be prefilled together are no backlog;
- a step that would otherwise be decode-only takes training only when the work pays for the fixed
  prices it triggers (``train_pays``), and when that rule has kept training out for ``train_probe_s``
  one step trains anyway on fewer tokens than usual, so an inflated fixed price is measured again;
- tokens are shared among jobs by ``FairShare`` (``grant_training``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from loquetier.engine.scheduling.budget import (
    FairShare,
    job_demands,
    num_tokens_in,
    prefill_time_limit,
    reserved_train_tokens,
)
from loquetier.engine.scheduling.config import SchedulerConfig
from loquetier.engine.scheduling.plan import StepPlan
from loquetier.engine.scheduling.pricing import StepCost
from loquetier.engine.sequence import TrainChunk, TrainWork


def reserve_training_floors(plan: StepPlan, jobs: Iterable[TrainWork], config: SchedulerConfig,
                            num_decode_only: int) -> None:
    """The floors (``min_share``, ``min_train_tokens_per_step``); ``num_decode_only``: decode-only
    samples in the step model's window (too few: this step stays decode-only if it can)."""
    plan.demands = job_demands(jobs, config, plan.train_cost)
    if not plan.demands:
        plan.last_train_at = None  # a job that comes later waits train_probe_s from its start
    plan.reserved = min(plan.tokens_left, reserved_train_tokens(plan.demands, config))
    plan.tokens_left -= plan.reserved
    plan.mixed = plan.reserved > 0  # the step carries more than decode rows (no graph replay)
    plan.probe_due = num_decode_only < config.min_decode_only_samples


def train_pays(work: float, fixed: float, plan: StepPlan, config: SchedulerConfig) -> bool:
    """Whether ``work`` seconds of training are worth the ``fixed`` prices they trigger in a step
    with decode rows: at least ``train_amortize`` times those prices, or the most any such step can
    carry (the burst cap bounds its time, the token ceiling its tokens), whichever is less. All at
    the training phases' prices (``plan.train_cost``: the fit times ``plan.margin``)."""
    cost = plan.train_cost
    best = min(max(0.0, plan.burst_cap * config.tpot_headroom - plan.train_predicted - fixed),
               (config.max_num_batched_tokens - plan.batch.num_decode_rows) * cost.train_token_s)
    return work > 0.0 and work >= config.train_amortize * min(fixed, best)


def train_probe_due(plan: StepPlan, config: SchedulerConfig) -> bool:
    """Whether training has waited ``train_probe_s`` for a step the step model says cannot fit."""
    if config.train_probe_s <= 0.0:
        return False
    if plan.last_train_at is None:
        plan.last_train_at = plan.now  # the wait starts now
    return plan.now - plan.last_train_at >= config.train_probe_s


def fill_training(plan: StepPlan, config: SchedulerConfig, *, has_backlog: bool, prior: StepCost) -> None:
    """With inference in the system: the step's time budget and the time training may use.
    ``has_backlog``: requests still wait after the prefill phase; ``prior``: the step model's prior."""
    batch, cost = plan.batch, plan.train_cost
    time_budget = plan.train_budget
    limit = prefill_time_limit(batch, plan.now, config)
    if time_budget is None or (limit is not None and limit < time_budget):
        time_budget = limit
    if time_budget is None:  # inference waits on memory or slots: keep steps short anyway
        time_budget = config.default_tpot_ms / 1e3
    if plan.step_cap is not None:
        time_budget = min(time_budget, plan.step_cap)
    plan.time_budget = time_budget
    spare = max(0.0, time_budget * config.tpot_headroom - plan.train_predicted)
    if has_backlog and not plan.hold_new:
        # A backlog that could not be admitted waits for running sequences to finish: a longer step
        # only delays it, so training keeps its floors and nothing more.
        spare = 0.0
    if plan.probe_due and plan.graphs.decode and not plan.mixed and batch.decode_seqs:
        spare = 0.0  # a probe: this step stays decode-only, so the model sees that regime
    # Training here makes the step pay fixed prices: leaving the decode graph path (mixed_s) and, if
    # no floor already did, the backward pass and optimizer launches (train_step_s). Worth it only
    # for at least as much training work as that overhead.
    fixed = (0.0 if plan.mixed else cost.mixed_s) + (0.0 if plan.reserved else cost.train_step_s)
    if fixed > 0.0 and batch.decode_seqs:
        raw, spare = spare, max(0.0, spare - fixed)
        # The work must amortize the fixed prices, in time and in the tokens the step has left, or
        # be the most any step can carry, so a fixed price above that work (a slow host, or a fit
        # that put part of the per-token price into it) cannot keep training out for good.
        work = min(plan.train_scale * spare, plan.tokens_left * cost.train_token_s)
        if not train_pays(work, fixed, plan, config):
            spare = 0.0
            if plan.demands and train_probe_due(plan, config):
                # The fitted fixed price may be wrong and a step never run never corrects it: one
                # step trains on the tokens half the time buys at the larger of the fitted and the
                # prior token price, fewer than a full step, so fixed and per-token prices come apart.
                token_s = max(cost.train_token_s, prior.train_token_s)
                spare = num_tokens_in(0.5 * raw, token_s) * cost.train_token_s
    plan.train_time = plan.train_scale * spare + plan.reserved * cost.train_token_s


def fill_training_idle(plan: StepPlan, config: SchedulerConfig) -> None:
    """No request in the system: training takes the whole step, unless one arrived lately
    (``plan.step_cap`` set), when the step keeps to that cap, so the next arrival does not wait
    for a step longer than its TTFT allows."""
    if plan.step_cap is None:
        return
    plan.time_budget = plan.step_cap
    cost = plan.train_cost
    spare = max(0.0, plan.step_cap * config.tpot_headroom - plan.train_predicted - cost.train_step_s)
    plan.train_time = spare + plan.reserved * cost.train_token_s


def serving_step_cap(config: SchedulerConfig, now: float, *, serving: bool, last_arrival: float | None) -> float | None:
    """The longest step while serving (``ttft_step_share`` of the default TTFT target), or None when
    the share is 0 or nothing was served within ``serving_idle_s``."""
    if config.ttft_step_share <= 0.0:
        return None
    if not serving and (last_arrival is None or now - last_arrival > config.serving_idle_s):
        return None
    return config.ttft_step_share * config.default_ttft_ms / 1e3


def grant_training(plan: StepPlan, fair_share: FairShare, jobs: Mapping[str, TrainWork]) -> None:
    """Share the floors plus what is left of the step among jobs, within ``plan.train_time``."""
    grants = fair_share.allocate(plan.demands, plan.reserved + plan.tokens_left, plan.train_time)
    if any(grants.values()):
        plan.last_train_at = plan.now
    for job_id, num_tokens in grants.items():
        chunks = plan.batch.eval_chunks if jobs[job_id].is_eval else plan.batch.train_chunks
        chunks.append(TrainChunk(job_id, num_tokens))
