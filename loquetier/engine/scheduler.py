"""SLO-aware scheduler: one step's mix of decode rows, prefill chunks and training/eval tokens.

Each ``schedule(now)``:

1. **Decode** — every running sequence past its prefill gets one row (TPOT first; decode never
   starves). A row that cannot get a KV slot preempts by recompute the least important unscheduled
   running sequence (lowest priority, then latest arrival; prefilling ones included), possibly
   itself. TPOT is a mean over a request's tokens, so a sequence ahead of its target has banked
   time: with ``tpot_burst > 1`` a step may last until the earliest sequence's mean would reach its
   target, between one and ``tpot_burst`` targets (``_decode_budget``). Short decode-only steps (CUDA
   graphs) bank time that an occasional long step (a big prefill chunk, a training micro-batch) spends.
   With ``tpot_lookahead = j > 0`` training (not prefill) may also borrow against each sequence's
   next ``j`` tokens (at most what ``max_tokens`` leaves), priced at the predicted decode-only step
   time: a young sequence, which has banked nothing yet, no longer caps every training step at one
   target while its remaining tokens would bring its mean back under it. A sequence that then stops
   early (EOS, a stop string) may end above its target. Prefill never borrows: under saturation,
   borrowed prefill steps keep every sequence at its limit, where any later urgent step breaks it;
   but a prompt chunk that must run eagerly anyway rides in a step that will train, within that step's
   time. Banked time is planned against ``tpot_headroom`` of the target, not the target itself.
2. **Training floors** — each job with work keeps ``ceil(min_share * max_num_batched_tokens)``
   tokens (and jobs together at least ``min_train_tokens_per_step``), even under inference pressure.
3. **Prefill** — running-but-prefilling and waiting sequences in order of weighted TTFT slack
   (requests still able to meet their deadline first, then late ones; see ``_prefill_order``; late
   ones are still served and reported as misses). A chunk is bounded by ``max_prefill_chunk``, the
   step's token budget and the time budget of the running decodes (at least
   ``min_prefill_tokens_per_step`` so prefill always progresses). With ``prefill_coalesce_ms``, a
   step that would otherwise be decode-only holds new requests back until the oldest has waited that
   long (at most half its TTFT, and never past two prefill steps before its deadline) or a step's
   worth of prompt tokens waits, so arrivals are prefilled together and most steps stay decode-only
   (``_hold_new_prefills``). Admission needs a free sequence slot, KV for the chunk
   (``KVAllocator``) and a GPU slot for the adapter (``AdapterSlots``); a waiting request never
   preempts a running one. KV for the whole sequence is reserved at admission (prefix-cache hits
   skip ahead), so later chunks need no allocation. With ``decode_graphs``, the step model's
   ``mixed_s`` (the fixed price of a step that is not decode-only) is charged once, when a step
   first takes non-decode rows.
4. **Training/eval** — the rest of the step, shared among jobs by ``FairShare`` (weight
   ``1 + priority``). With no inference in the system, training takes the whole token budget. With
   inference, it gets ``TrainScale × (time budget − predicted step time)``, converted to tokens by
   the online ``StepTimeModel``. The time budget is the tightest of: running decodes' TPOT
   (× ``tpot_headroom``) and each scheduled prefill's remaining TTFT slack per remaining step. While
   requests wait un-admitted (no sequence slot, KV or adapter slot), training keeps only its floors:
   longer steps would only delay the backlog. A step that would otherwise be decode-only takes
   training only when the training time it can get is at least the fixed prices it triggers
   (``mixed_s``, ``train_step_s``), or the most any step can carry when that is less
   (``_train_pays``: the burst cap bounds a step's time, the token ceiling its tokens). When that
   rule has kept training out for ``train_probe_s``, one step trains anyway on fewer tokens than
   usual: a fixed price inflated by one slow step would otherwise never be measured again.

``postprocess(batch, result)`` feeds the measured step time to the step model, advances sequences,
records SLO events, finishes sequences (EOS / stop ids / max_tokens) and runs the AIMD update.

Pure: no I/O, no clocks (``now`` is passed in, seconds), no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from loquetier.engine.budget import FairShare, JobDemand, TrainScale
from loquetier.engine.sequence import (
    PrefillChunk,
    ScheduledBatch,
    Sequence,
    SequenceStatus,
    StepResult,
    TrainChunk,
    TrainWork,
)
from loquetier.engine.slo import RequestMetrics, SchedulerMetrics, SloTracker, StepRecord
from loquetier.engine.step_model import StepCost, StepFeatures, StepTimeModel


class KVAllocator(Protocol):
    """KV memory, implemented by the block manager (through a thin adapter). Counts are per sequence.

    The scheduler calls ``allocate`` in two ways:

    - **admission** (the sequence holds nothing yet): ``allocate(seq_id, seq.num_tokens)`` reserves
      the whole prompt (plus outputs so far, after a preemption). It returns how many leading tokens
      already have K/V (prefix-cache hits, at most ``num_tokens - 1``; 0 without a prefix cache); the
      scheduler starts the prefill there. Chunked prefill then needs no further allocation.
    - **decode**: ``allocate(seq_id, 1)`` makes room for ``seq.token_ids[-1]`` (the token fed this
      step, at position ``seq.num_computed_tokens``), i.e. ``BlockManager.append(seq_id, [token])``.

    ``can_allocate`` is asked first with the same arguments; ``free`` releases everything (finish,
    abort, preemption). The adapter can look sequences up with ``Scheduler.get(seq_id)``.
    """

    def can_allocate(self, seq_id: str, num_new_tokens: int) -> bool: ...

    def allocate(self, seq_id: str, num_new_tokens: int) -> int: ...

    def free(self, seq_id: str) -> None: ...

    @property
    def num_free_blocks(self) -> int: ...


class AdapterSlots(Protocol):
    """GPU adapter slots, implemented by the adapter manager.

    ``ensure_loaded`` is called once when a sequence is admitted (WAITING/PREEMPTED -> RUNNING);
    True means the adapter has a slot now and is pinned for that sequence (a reference count);
    ``release`` is called once when that sequence finishes, is aborted or is preempted. The base
    model (``adapter_id`` None) never calls either.
    """

    def ensure_loaded(self, adapter_id: str) -> bool: ...

    def release(self, adapter_id: str) -> None: ...


@dataclass(frozen=True)
class SchedulerConfig:
    """Engine limits of the scheduler (validated). Times in ms, shares in [0, 1]."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-step token ceiling (decode rows + prefill + train + eval)
    max_prefill_chunk: int = 512
    min_prefill_tokens_per_step: int = 16
    default_ttft_ms: float = 1000.0
    default_tpot_ms: float = 100.0
    tpot_headroom: float = 0.9  # plan steps to this fraction of the tightest target
    slo_window: int = 256  # SLO events in the attainment window
    slo_target: float = 0.95  # window attainment below which training stops growing
    min_train_tokens_per_step: int = 0
    train_decrease: float = 0.5
    train_increase: float = 0.05
    min_train_scale: float = 0.05
    step_model_window: int = 128
    # A step may spend time decode rows banked by running ahead of their mean TPOT, up to this many
    # TPOT targets (1: every step within one target, i.e. TPOT enforced per token gap).
    tpot_burst: float = 1.0
    # With tpot_burst > 1: tokens of a sequence's future (at most what max_tokens leaves) whose
    # predicted decode-only steps may repay a longer training step now (0: spend only what was banked).
    tpot_lookahead: int = 0
    # When the step model says no training step fits the decoders' budget and no step has trained for
    # this long, one step trains on what half the spare time buys anyway (0: never), so an
    # overestimated fixed training price is measured again instead of starving training for good.
    train_probe_s: float = 2.0
    # > 0: a decode-only step holds new prefills back until the oldest waited this long (see above).
    prefill_coalesce_ms: float = 0.0
    # Decode-only steps replay CUDA graphs: a step with other rows costs the step model's mixed_s
    # more, which the prefill and training decisions then charge (see the module docstring).
    decode_graphs: bool = False
    # With decode_graphs: inference steps (prefill + decode rows, no training) of at most this many
    # rows replay graphs too, so they are not "mixed" (0: only decode-only steps replay graphs).
    graph_max_rows: int = 0
    # With graph_max_rows: a step whose prompt rows read more keys than this each, on average, runs
    # eagerly all the same (the runner's rule: graphs attend row by row; 0 = no such limit).
    graph_max_mean_context: int = 0
    # With decode_graphs: keep at least this many decode-only steps in the step model's window (a
    # step now and then skips optional training), so mixed_s stays identifiable from const_s.
    min_decode_only_samples: int = 8
    # A step that would otherwise be decode-only takes training only for at least this many times the
    # fixed prices the training triggers (mixed_s, train_step_s) in training work, or this many times
    # the most training work any step can carry, when that is less.
    train_amortize: float = 1.0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one decode row each)")
        if not 1 <= self.max_prefill_chunk <= self.max_num_batched_tokens:
            raise ValueError("max_prefill_chunk must be in [1, max_num_batched_tokens]")
        if not 0 <= self.min_prefill_tokens_per_step <= self.max_prefill_chunk:
            raise ValueError("min_prefill_tokens_per_step must be in [0, max_prefill_chunk]")
        if self.default_ttft_ms <= 0 or self.default_tpot_ms <= 0:
            raise ValueError("default SLO targets must be > 0")
        if not 0.0 < self.tpot_headroom <= 1.0:
            raise ValueError("tpot_headroom must be in (0, 1]")
        if self.slo_window < 1:
            raise ValueError("slo_window must be >= 1")
        if not 0.0 <= self.slo_target <= 1.0:
            raise ValueError("slo_target must be in [0, 1]")
        if not 0 <= self.min_train_tokens_per_step <= self.max_num_batched_tokens:
            raise ValueError("min_train_tokens_per_step must be in [0, max_num_batched_tokens]")
        if self.step_model_window < 2:
            raise ValueError("step_model_window must be >= 2")
        if not 1.0 <= self.tpot_burst <= 100.0:
            raise ValueError("tpot_burst must be in [1, 100]")
        if not 0.0 <= self.train_probe_s <= 3600.0:
            raise ValueError("train_probe_s must be in [0, 3600]")
        if not 0 <= self.tpot_lookahead <= 4096:
            raise ValueError("tpot_lookahead must be in [0, 4096]")
        if not 0.0 < self.train_amortize <= 100.0:
            raise ValueError("train_amortize must be in (0, 100]")
        if not 0.0 <= self.prefill_coalesce_ms <= 60_000.0:
            raise ValueError("prefill_coalesce_ms must be in [0, 60000]")
        if not 0 <= self.min_decode_only_samples < self.step_model_window:
            raise ValueError("min_decode_only_samples must be in [0, step_model_window)")
        # TrainScale validates the AIMD parameters.
        TrainScale(self.train_decrease, self.train_increase, self.min_train_scale)


@dataclass
class StepEvents:
    """What ``postprocess`` changed: new tokens (seq_id, token), finished sequences + their metrics."""

    step: StepRecord
    new_tokens: list[tuple[str, int]] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    request_metrics: list[RequestMetrics] = field(default_factory=list)


def _weight(priority: int) -> float:
    return 1.0 + priority


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVAllocator,
        adapters: AdapterSlots | None = None,
        *,
        step_model: StepTimeModel | None = None,
        prior_cost: StepCost | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.adapters = adapters
        self.step_model = step_model or StepTimeModel(prior_cost, window=config.step_model_window)
        self.eos_token_id = eos_token_id
        self.waiting: list[Sequence] = []  # WAITING or PREEMPTED
        self.running: list[Sequence] = []  # RUNNING (prefilling or decoding)
        self.jobs: dict[str, TrainWork] = {}
        self.fair_share = FairShare()
        self.train_scale = TrainScale(config.train_decrease, config.train_increase, config.min_train_scale)
        self.slo = SloTracker(config.slo_window)
        self.metrics = SchedulerMetrics()
        self._seqs: dict[str, Sequence] = {}
        self._order: dict[str, int] = {}  # admission order: the last tie-break of importance
        self._last_train_at: float | None = None  # when a step last trained (see _train_probe_due)
        self._repay_s = 0.0  # predicted decode-only step of the current decode rows (tpot_lookahead)
        self._num_added = 0
        self._step_id = 0

    # ---- requests and jobs ---------------------------------------------------------------------

    def add_request(self, seq: Sequence) -> None:
        if seq.seq_id in self._seqs:
            raise ValueError(f"duplicate seq_id {seq.seq_id!r}")
        if seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"sequence {seq.seq_id!r} must be WAITING, is {seq.status}")
        if seq.ttft_ms is None:
            seq.ttft_ms = self.config.default_ttft_ms
        if seq.tpot_ms is None:
            seq.tpot_ms = self.config.default_tpot_ms
        self._seqs[seq.seq_id] = seq
        self._order[seq.seq_id] = self._num_added
        self._num_added += 1
        self.waiting.append(seq)
        self.metrics.num_requests_added += 1

    def abort(self, seq_id: str, now: float) -> RequestMetrics | None:
        """Abort a request wherever it is; frees its KV and adapter pin. None if unknown/finished."""
        return self.finish(seq_id, "abort", now)

    def finish(self, seq_id: str, reason: str, now: float) -> RequestMetrics | None:
        """Finish a request from outside (``"stop"`` on a stop string, ``"abort"``)."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        return self._finish(seq, reason, now)

    def get(self, seq_id: str) -> Sequence | None:
        return self._seqs.get(seq_id)

    def add_job(self, job: TrainWork) -> None:
        if job.job_id in self.jobs:
            raise ValueError(f"duplicate job_id {job.job_id!r}")
        if job.priority < 0:
            raise ValueError(f"job {job.job_id!r}: priority must be >= 0")
        if not 0.0 <= job.min_share <= 1.0:
            raise ValueError(f"job {job.job_id!r}: min_share must be in [0, 1]")
        self.jobs[job.job_id] = job

    def remove_job(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self.fair_share.forget(job_id)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- the step ------------------------------------------------------------------------------

    def schedule(self, now: float) -> ScheduledBatch:
        cfg = self.config
        cost = self.step_model.cost
        batch = ScheduledBatch(step_id=self._step_id, now=now)
        self._step_id += 1
        scheduled: set[str] = set()

        # 1. Decode rows, most important first; victims come from the unscheduled tail.
        for seq in sorted(self.running, key=self._importance, reverse=True):
            if seq.is_prefilling or seq.status is not SequenceStatus.RUNNING:
                continue
            if not self._make_room(seq, scheduled, batch):
                continue
            self.kv.allocate(seq.seq_id, 1)
            batch.decode_seqs.append(seq)
            scheduled.add(seq.seq_id)
        tokens_left = cfg.max_num_batched_tokens - batch.num_decode_rows
        time_budget: float | None = None
        burst_cap = 0.0  # the longest step any decode row allows: tpot_burst targets
        train_budget: float | None = None  # the same with tpot_lookahead: what training may use
        if batch.decode_seqs:
            time_budget = min(self._decode_budget(s, now) for s in batch.decode_seqs)
            train_budget = time_budget
            if cfg.tpot_lookahead:
                self._repay_s = self._predict(batch, cost)  # a decode-only step of these rows: the repayment rate
                train_budget = min(self._decode_budget(s, now, self._repay_s) for s in batch.decode_seqs)
            burst_cap = min(_tpot_s(s) for s in batch.decode_seqs) * cfg.tpot_burst

        # 2. Training floors (min_share and min_train_tokens_per_step).
        demands = self._job_demands(cost)
        if not demands:
            self._last_train_at = None  # a job that comes later waits train_probe_s from its start
        reserved = min(tokens_left, self._reserved_train_tokens(demands))
        tokens_left -= reserved
        mixed = reserved > 0  # the step carries more than decode rows (no graph replay)
        mixed_s = cost.mixed_s  # ~0 without graphs, but charged as fitted: predictions must add up
        # too few decode-only steps in the step model's window: this one stays decode-only if it can
        probe_due = self.step_model.num_decode_only < cfg.min_decode_only_samples

        # 3. Prefill by weighted slack.
        predicted = self._predict(batch, cost) + reserved * cost.train_token_s
        if reserved:
            predicted += mixed_s + cost.train_step_s
        prefill_budget = tokens_left
        # Whether this step will likely train beside its decode rows (borrowing with tpot_lookahead):
        # it runs eagerly then, so a prompt tail that must run eagerly rides along at no extra fixed
        # price, within the step's time, instead of waiting behind long training steps for its turn.
        fixed_train = mixed_s + cost.train_step_s
        ride_budget: float | None = None
        if cfg.tpot_lookahead and demands and not probe_due and train_budget is not None:
            work = self.train_scale.value * (train_budget * cfg.tpot_headroom - predicted - fixed_train)
            if self._train_pays(work, fixed_train, predicted, burst_cap, batch.num_decode_rows, cost):
                ride_budget = train_budget
        hold_new = not mixed and self._hold_new_prefills(batch, now, tokens_left, cost, predicted + mixed_s)
        if hold_new and demands and time_budget is not None:
            # training will take this step off the graph path anyway: the held prompts join it
            pre_spare = max(0.0, time_budget * cfg.tpot_headroom - predicted - mixed_s)
            hold_new = probe_due or self.train_scale.value * pre_spare < mixed_s
        for seq in self._prefill_order(now, cost):
            if prefill_budget <= 0:
                break
            if seq.seq_id in scheduled or seq in batch.preempted:
                continue  # a sequence preempted in this step is not readmitted in the same step
            if hold_new and seq.status is not SequenceStatus.RUNNING:
                continue
            allowance = prefill_budget
            # rows this step can still take and stay a graph step (prefill graphs), else 0
            graph_room = 0
            if cfg.decode_graphs and not mixed and cfg.graph_max_rows:
                graph_room = cfg.graph_max_rows - batch.num_decode_rows - batch.num_prefill_tokens
                if graph_room > 0 and cfg.graph_max_mean_context:
                    # this chunk's rows read start + 1, start + 2, ... keys: a graph step while their
                    # mean stays within the limit (a prompt's tail far into it runs eagerly)
                    fit = 2 * (cfg.graph_max_mean_context - seq.num_computed_tokens) - 1
                    graph_room = min(graph_room, max(0, fit))
            if time_budget is not None:
                extra = 0.0 if mixed or graph_room > 0 else mixed_s  # the eager price this chunk would add
                spare = time_budget * cfg.tpot_headroom - predicted - extra
                if ride_budget is not None and graph_room <= 0:  # an eager chunk in a training step
                    spare = max(spare, ride_budget * cfg.tpot_headroom - predicted - fixed_train)
                by_time = _num_tokens_in(spare, cost.prefill_token_s)
                if self._prefill_is_urgent(seq, now, cost, predicted + extra):
                    # its TTFT is at stake: up to the burst cap, even past what the decoders banked
                    cap = burst_cap * cfg.tpot_headroom - predicted - extra
                    by_time = max(by_time, _num_tokens_in(cap, cost.prefill_token_s),
                                  cfg.min_prefill_tokens_per_step)
                elif (cfg.decode_graphs and not mixed and graph_room <= 0 and ride_budget is None
                      and by_time * cost.prefill_token_s < mixed_s):
                    # a sliver of prefill would take the step off the graph path for little progress:
                    # decode-only steps bank time for one large prefill step instead
                    by_time = 0
                elif not batch.prefill_chunks:
                    by_time = max(by_time, cfg.min_prefill_tokens_per_step)
                allowance = min(allowance, by_time)
            if graph_room > 0:
                allowance = min(allowance, graph_room)  # stay on the graph path
            if allowance <= 0:
                if cfg.decode_graphs:
                    continue  # a later, urgent request may still need its prefill in this step
                break
            if seq.status is not SequenceStatus.RUNNING and not self._admit(seq):
                continue
            length = min(seq.num_uncomputed_tokens, cfg.max_prefill_chunk, allowance)
            chunk = PrefillChunk(seq, seq.num_computed_tokens, length)
            batch.prefill_chunks.append(chunk)
            scheduled.add(seq.seq_id)
            prefill_budget -= length
            predicted += length * cost.prefill_token_s + (chunk.start + length) * cost.kv_token_s
            if not mixed and graph_room <= 0:
                predicted += mixed_s
                mixed = True
        tokens_left = prefill_budget

        # 4. Training/eval fill what is left.
        has_inference = bool(self.running or self.waiting)
        train_time: float | None = None
        if has_inference:
            time_budget = train_budget
            limit = self._prefill_time_limit(batch, now)
            if time_budget is None or (limit is not None and limit < time_budget):
                time_budget = limit
            if time_budget is None:  # inference waits on memory or slots: keep steps short anyway
                time_budget = cfg.default_tpot_ms / 1e3
            spare = max(0.0, time_budget * cfg.tpot_headroom - predicted)
            if self.waiting and not hold_new:
                # A backlog that could not be admitted waits for running sequences to finish: a
                # longer step only delays it, so training keeps its floors and nothing more. (Prompts
                # held back to be prefilled together are no backlog.)
                spare = 0.0
            if probe_due and cfg.decode_graphs and not mixed and batch.decode_seqs:
                spare = 0.0  # a probe: this step stays decode-only, so the model sees that regime
            # Training here makes the step pay fixed prices: leaving the decode graph path (mixed_s)
            # and, if no floor already did, the backward pass and optimizer launches (train_step_s).
            # Worth it only for at least as much training work as that overhead.
            fixed = (0.0 if mixed else mixed_s) + (0.0 if reserved else cost.train_step_s)
            if fixed > 0.0 and batch.decode_seqs:
                raw, spare = spare, max(0.0, spare - fixed)
                # The work must amortize the fixed prices, in time and in the tokens the step has left,
                # or be the most any step can carry: the burst cap bounds the time and the step's
                # token ceiling the tokens, so a fixed price above that work (a slow host, or a fit
                # that put part of the per-token price into it) would otherwise keep training out of
                # every step with decoders for good.
                work = min(self.train_scale.value * spare, tokens_left * cost.train_token_s)
                if not self._train_pays(work, fixed, predicted, burst_cap, batch.num_decode_rows, cost):
                    spare = 0.0
                    if demands and self._train_probe_due(now):
                        # The fitted fixed price says no training step fits; it may be wrong (a slow
                        # step can inflate it, and a step never run never corrects it). Now and then
                        # one step trains anyway, on the tokens half the time buys at the larger of
                        # the fitted and the prior token price: fewer tokens than the full steps the
                        # window holds, so the fixed and the per-token price come apart.
                        token_s = max(cost.train_token_s, self.step_model.prior.train_token_s)
                        spare = _num_tokens_in(0.5 * raw, token_s) * cost.train_token_s
            train_time = self.train_scale.value * spare + reserved * cost.train_token_s
        else:
            self.train_scale.reset()
        grants = self.fair_share.allocate(demands, reserved + tokens_left, train_time)
        if any(grants.values()):
            self._last_train_at = now
        for job_id, num_tokens in grants.items():
            chunk_list = batch.eval_chunks if self.jobs[job_id].is_eval else batch.train_chunks
            chunk_list.append(TrainChunk(job_id, num_tokens))
        batch.time_budget_s = time_budget
        batch.predicted_time_s = self.step_model.predict(_features(batch, cfg))
        return batch

    def postprocess(self, batch: ScheduledBatch, result: StepResult) -> StepEvents:
        now = result.now
        train_used = result.train_tokens
        if train_used is None:
            train_used = {c.job_id: c.num_tokens for c in batch.train_chunks}
        eval_used = result.eval_tokens
        if eval_used is None:
            eval_used = {c.job_id: c.num_tokens for c in batch.eval_chunks}
        features = StepFeatures(
            prefill_tokens=batch.num_prefill_tokens,
            decode_rows=batch.num_decode_rows,
            train_tokens=sum(train_used.values()),
            eval_tokens=sum(eval_used.values()),
            kv_tokens_read=batch.num_kv_tokens_read,
            mixed=_mixed(self.config, batch.num_prefill_tokens, batch.num_decode_rows,
                         sum(train_used.values()) + sum(eval_used.values()), batch.num_prefill_row_reads),
            training=int(bool(any(train_used.values()) or any(eval_used.values()))),
        )
        self.step_model.observe(features, result.step_time_s)
        events = StepEvents(step=self._record(batch, result, features))
        misses_before = self.slo.num_event_misses

        for chunk in batch.prefill_chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING or seq.num_computed_tokens != chunk.start:
                continue  # aborted or preempted after scheduling
            seq.num_computed_tokens += chunk.length
            if chunk.is_final:
                self._append_token(seq, _sampled(result, seq), now, events)
        for seq in batch.decode_seqs:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += 1
            self._append_token(seq, _sampled(result, seq), now, events)

        for used, by_job in (
            (train_used, self.metrics.train_tokens_by_job),
            (eval_used, self.metrics.eval_tokens_by_job),
        ):
            for job_id, num_tokens in used.items():
                self.fair_share.charge(job_id, num_tokens)
                by_job[job_id] = by_job.get(job_id, 0) + num_tokens

        overran = batch.time_budget_s is not None and result.step_time_s > batch.time_budget_s
        self.metrics.num_step_overruns += int(overran)
        if self.running or self.waiting:
            violated = overran or self.slo.num_event_misses > misses_before
            self.train_scale.update(
                violated=violated, attainment=self.slo.window_attainment, target=self.config.slo_target
            )
        return events

    # ---- helpers -------------------------------------------------------------------------------

    def _importance(self, seq: Sequence) -> tuple[int, float, int]:
        """Higher is more important: priority, then earlier arrival, then earlier add_request."""
        return (seq.priority, -seq.arrival_time, -self._order[seq.seq_id])

    def _make_room(self, seq: Sequence, scheduled: set[str], batch: ScheduledBatch) -> bool:
        """Preempt the least important unscheduled running sequences until ``seq`` can decode one more
        token; when none is left, ``seq`` itself is preempted and False returned."""
        while not self.kv.can_allocate(seq.seq_id, 1):
            candidates = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
            if not candidates:
                self._preempt(seq, batch)
                return False
            self._preempt(min(candidates, key=self._importance), batch)
        return True

    def _admit(self, seq: Sequence) -> bool:
        """WAITING / PREEMPTED -> RUNNING: a sequence slot, KV for all its tokens, an adapter slot."""
        if len(self.running) >= self.config.max_num_seqs:
            return False
        if not self.kv.can_allocate(seq.seq_id, seq.num_tokens):
            return False
        if seq.adapter_id is not None and self.adapters is not None:
            if not self.adapters.ensure_loaded(seq.adapter_id):
                return False
        num_cached = self.kv.allocate(seq.seq_id, seq.num_tokens)
        seq.num_computed_tokens = max(0, min(num_cached, seq.num_tokens - 1))
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.append(seq)
        batch.preempted.append(seq)
        self.metrics.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        """Free the KV and the adapter pin of a RUNNING sequence."""
        self.kv.free(seq.seq_id)
        if seq.adapter_id is not None and self.adapters is not None:
            self.adapters.release(seq.adapter_id)

    def _finish(self, seq: Sequence, reason: str, now: float) -> RequestMetrics | None:
        if seq.status is SequenceStatus.FINISHED:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self._release(seq)
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = now
        del self._seqs[seq.seq_id]
        del self._order[seq.seq_id]
        assert seq.ttft_ms is not None and seq.tpot_ms is not None
        m = RequestMetrics.of(seq, seq.ttft_ms, seq.tpot_ms)
        self.slo.record_request(m)
        if reason == "abort":
            self.metrics.num_requests_aborted += 1
        else:
            self.metrics.num_requests_finished += 1
        return m

    def _append_token(self, seq: Sequence, token: int, now: float, events: StepEvents) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.slo.record_event(now - seq.arrival_time <= _ttft_s(seq))
        else:
            assert seq.last_token_time is not None and seq.first_token_time is not None
            met_gap = now - seq.last_token_time <= _tpot_s(seq)
            seq.num_tpot_misses += int(not met_gap)
            if self.config.tpot_burst > 1.0:
                # TPOT is the mean gap: met while the request's mean so far is within target, or could
                # be brought back within it by the tokens the scheduler may borrow against
                ahead = self._lookahead(seq)
                repaid = ahead * (_tpot_s(seq) - self._repay_s)
                self.slo.record_event(now - seq.first_token_time <= seq.num_output_tokens * _tpot_s(seq) + repaid)
            else:
                self.slo.record_event(met_gap)
        seq.last_token_time = now
        seq.output_token_ids.append(token)
        events.new_tokens.append((seq.seq_id, token))
        sp = seq.sampling
        reason: str | None = None
        if token in sp.stop_token_ids or (token == self.eos_token_id and not sp.ignore_eos):
            reason = "stop"
        elif seq.num_output_tokens >= sp.max_tokens:
            reason = "length"
        if reason is not None:
            m = self._finish(seq, reason, now)
            assert m is not None
            events.finished.append(seq)
            events.request_metrics.append(m)

    def _prefill_order(self, now: float, cost: StepCost) -> list[Sequence]:
        """Requests that can still meet their deadline first, then late ones; each group by weighted slack.

        Slack is the time left to the deadline (EDF order); priority weights it (``slack / w`` while
        positive, ``slack * w`` once late), so a heavier request looks more urgent. Ties go to a prefill
        already in progress, then to the earlier request. Whether a request can still make it uses the
        predicted time of its remaining prefill. Ordering by time left, not by laxity (time left minus
        remaining work), keeps chunked prefill finishing requests one after another instead of
        spreading progress over all of them.
        """

        def key(seq: Sequence) -> tuple[int, float, int, int]:
            slack = _deadline(seq) - now
            w = _weight(seq.priority)
            is_late = slack - seq.num_uncomputed_tokens * cost.prefill_token_s < 0
            weighted = slack * w if slack < 0 else slack / w
            started = 0 if seq.status is SequenceStatus.RUNNING else 1
            return (int(is_late), weighted, started, self._order[seq.seq_id])

        candidates = [s for s in self.running if s.is_prefilling] + self.waiting
        return sorted(candidates, key=key)

    def _decode_budget(self, seq: Sequence, now: float, decode_s: float | None = None) -> float:
        """How long this step may last for ``seq``: one TPOT target, or with ``tpot_burst > 1`` the time
        until its mean TPOT would exceed ``tpot_headroom`` of the target (time banked by earlier short
        steps, plus, given ``decode_s``, what its next ``tpot_lookahead`` tokens would repay at
        ``decode_s`` a step), clamped to [1, tpot_burst] targets."""
        tpot = _tpot_s(seq)
        if self.config.tpot_burst <= 1.0 or seq.first_token_time is None:
            return tpot
        # after this step's token and j more at decode_s each, the mean over num_output_tokens + j
        # gaps must stay <= tpot
        ahead = 0 if decode_s is None else self._lookahead(seq)
        decode_s = decode_s or 0.0
        # planned against the headroom's share of the target: steps are predicted, not known, and a
        # mean planned to the target itself ends above it about half the time
        mean = tpot * self.config.tpot_headroom
        banked = seq.first_token_time + (seq.num_output_tokens + ahead) * mean - ahead * decode_s - now
        return min(max(banked, tpot), self.config.tpot_burst * tpot)

    def _train_pays(self, work: float, fixed: float, predicted: float, burst_cap: float,  # noqa: PLR0917
                    decode_rows: int, cost: StepCost) -> bool:
        """Whether ``work`` seconds of training are worth the ``fixed`` prices they trigger in a step
        with decode rows: at least ``train_amortize`` times those prices, or the most any such step can
        carry (the burst cap bounds its time, the token ceiling its tokens), whichever is less."""
        cfg = self.config
        best = min(max(0.0, burst_cap * cfg.tpot_headroom - predicted - fixed),
                   (cfg.max_num_batched_tokens - decode_rows) * cost.train_token_s)
        return work > 0.0 and work >= cfg.train_amortize * min(fixed, best)

    def _train_probe_due(self, now: float) -> bool:
        """Whether training has waited ``train_probe_s`` for a step the step model says cannot fit."""
        probe_s = self.config.train_probe_s
        if probe_s <= 0.0:
            return False
        if self._last_train_at is None:
            self._last_train_at = now  # the wait starts now
        return now - self._last_train_at >= probe_s

    def _lookahead(self, seq: Sequence) -> int:
        """Future tokens of ``seq`` (after the one this step makes) a longer step may borrow against."""
        return max(0, min(self.config.tpot_lookahead, seq.sampling.max_tokens - seq.num_output_tokens - 1))

    def _prefill_is_urgent(self, seq: Sequence, now: float, cost: StepCost, step_s: float) -> bool:
        """With decode graphs: whether ``seq``'s first token is due within about two steps that would
        prefill the rest of its prompt (``step_s``: the step so far, as a mixed step)."""
        if not self.config.decode_graphs:
            return False
        prefill_s = step_s + seq.num_uncomputed_tokens * cost.prefill_token_s
        return _deadline(seq) - now <= 2.0 * prefill_s

    def _hold_new_prefills(  # noqa: PLR0917
        self, batch: ScheduledBatch, now: float, tokens_left: int, cost: StepCost, mixed_step_s: float
    ) -> bool:
        """Whether this step leaves waiting requests for a later one, so that it stays decode-only.

        Held only while: coalescing is on, the step has decode rows, no admitted prefill is in flight
        (that step is mixed anyway), their prompts would not fill the step's tokens, and every waiting
        request has waited less than ``min(max(prefill_coalesce_ms, mixed_s), TTFT / 2)`` with more than two
        prefill steps' worth of time (``mixed_step_s`` plus its prompt) left to its TTFT deadline.
        """
        wait_s = self.config.prefill_coalesce_ms / 1e3
        if wait_s <= 0.0 or not batch.decode_seqs or not self.waiting:
            return False
        # the dearer a mixed step, the more prompts it should carry: hold at least its price
        wait_s = max(wait_s, cost.mixed_s if self.config.decode_graphs else 0.0)
        if any(s.is_prefilling for s in self.running):
            return False
        waiting_tokens = sum(s.num_uncomputed_tokens for s in self.waiting)
        if waiting_tokens >= tokens_left:
            return False
        step_s = mixed_step_s + waiting_tokens * cost.prefill_token_s
        for seq in self.waiting:
            waited = now - seq.arrival_time
            if waited >= min(wait_s, 0.5 * _ttft_s(seq)) or _deadline(seq) - now <= 2.0 * step_s:
                return False
        return True

    def _prefill_time_limit(self, batch: ScheduledBatch, now: float) -> float | None:
        """Tightest per-step time that keeps each scheduled prefill on its TTFT deadline."""
        limit: float | None = None
        for chunk in batch.prefill_chunks:
            seq = chunk.seq
            remaining = seq.num_uncomputed_tokens - chunk.length
            steps = 1 + math.ceil(remaining / self.config.max_prefill_chunk)
            slack = _deadline(seq) - now
            per_step = slack / steps if slack > 0 else _tpot_s(seq)
            limit = per_step if limit is None else min(limit, per_step)
        return limit

    def _job_demands(self, cost: StepCost) -> list[JobDemand]:
        cfg = self.config
        demands = []
        for job in self.jobs.values():
            cap = min(job.num_ready_tokens(), cfg.max_num_batched_tokens)
            if cap <= 0:
                continue
            demands.append(
                JobDemand(
                    job_id=job.job_id,
                    weight=_weight(job.priority),
                    floor_tokens=min(cap, math.ceil(job.min_share * cfg.max_num_batched_tokens)),
                    cap_tokens=cap,
                    token_cost_s=cost.eval_token_s if job.is_eval else cost.train_token_s,
                )
            )
        return demands

    def _reserved_train_tokens(self, demands: list[JobDemand]) -> int:
        floors = sum(d.floor_tokens for d in demands)
        caps = sum(d.cap_tokens for d in demands)
        return min(caps, max(floors, self.config.min_train_tokens_per_step if demands else 0))

    def _predict(self, batch: ScheduledBatch, cost: StepCost) -> float:
        return cost.predict(_features(batch, self.config))

    def _record(self, batch: ScheduledBatch, result: StepResult, f: StepFeatures) -> StepRecord:
        m = self.metrics
        m.num_steps += 1
        m.busy_time_s += result.step_time_s
        m.num_prefill_tokens += f.prefill_tokens
        m.num_decode_tokens += f.decode_rows
        m.num_train_tokens += f.train_tokens
        m.num_eval_tokens += f.eval_tokens
        m.last_step = StepRecord(
            step_id=batch.step_id,
            now=result.now,
            step_time_s=result.step_time_s,
            predicted_time_s=batch.predicted_time_s,
            time_budget_s=batch.time_budget_s,
            num_decode_rows=f.decode_rows,
            num_prefill_tokens=f.prefill_tokens,
            num_train_tokens=f.train_tokens,
            num_eval_tokens=f.eval_tokens,
            num_kv_tokens_read=f.kv_tokens_read,
            train_scale=self.train_scale.value,
        )
        return m.last_step


def _num_tokens_in(seconds: float, token_s: float) -> int:
    """Tokens that fit in ``seconds`` at ``token_s`` each: 0 for no time (or NaN), at most 2**40, so an
    infinite or absurd time budget never reaches ``math.floor`` (OverflowError on infinity)."""
    num = seconds / max(token_s, 1e-12)
    return math.floor(min(num, 2.0**40)) if num > 0 else 0


def _ttft_s(seq: Sequence) -> float:
    assert seq.ttft_ms is not None
    return seq.ttft_ms / 1e3


def _tpot_s(seq: Sequence) -> float:
    assert seq.tpot_ms is not None
    return seq.tpot_ms / 1e3


def _deadline(seq: Sequence) -> float:
    """Next latency deadline: TTFT before the first token, else the next token's TPOT deadline."""
    if seq.last_token_time is None:
        return seq.arrival_time + _ttft_s(seq)
    return seq.last_token_time + _tpot_s(seq)


def _mixed(cfg: SchedulerConfig, prefill_tokens: int, decode_rows: int, train_tokens: int,
           prefill_reads: int = 0) -> int:
    """1 for a step that runs eagerly: training or eval rows, or prefill rows past the graphs' rows,
    or prompt rows reading more than ``graph_max_mean_context`` keys each on average (``prefill_reads``:
    the keys all of them read). A step counted as a graph step that ran eagerly would price the
    eager step's fixed cost into its few prompt tokens (on the H200: 130 ms for a 2-token tail)."""
    if train_tokens:
        return 1
    if not prefill_tokens:
        return 0
    if not (cfg.decode_graphs and cfg.graph_max_rows) or prefill_tokens + decode_rows > cfg.graph_max_rows:
        return 1
    return int(bool(cfg.graph_max_mean_context) and prefill_reads > cfg.graph_max_mean_context * prefill_tokens)


def _features(batch: ScheduledBatch, cfg: SchedulerConfig) -> StepFeatures:
    return StepFeatures(
        prefill_tokens=batch.num_prefill_tokens,
        decode_rows=batch.num_decode_rows,
        train_tokens=batch.num_train_tokens,
        eval_tokens=batch.num_eval_tokens,
        kv_tokens_read=batch.num_kv_tokens_read,
        mixed=_mixed(cfg, batch.num_prefill_tokens, batch.num_decode_rows,
                     batch.num_train_tokens + batch.num_eval_tokens, batch.num_prefill_row_reads),
        training=int(bool(batch.num_train_tokens or batch.num_eval_tokens)),
    )


def _sampled(result: StepResult, seq: Sequence) -> int:
    try:
        return result.sampled_token_ids[seq.seq_id]
    except KeyError:
        raise KeyError(f"runner returned no sampled token for sequence {seq.seq_id!r}") from None
