"""SLO-aware scheduler: one step's mix of decode rows, prefill chunks and training/eval tokens.

``schedule(now)`` is a spine of phases over one ``StepPlan`` (``plan.py``):

1. **decode** (``decode.py``): every running sequence past its prefill gets one row; the rows set
   the step's time budget (mean-TPOT banking, ``budget.decode_budget``);
2. **training floors** (``training.py``): each job with work keeps its ``min_share``;
3. **prefill** (``prefill.py``): prompt chunks by weighted TTFT slack, within the step's tokens and
   the decoders' time;
4. **training fill** (``training.py``): the rest of the step, shared among jobs by ``FairShare``.

``postprocess(batch, result)`` feeds the measured step time to the step model (``pricing.py``),
advances sequences, records SLO events (``slo.py``), finishes sequences (EOS / stop ids /
max_tokens) and runs the AIMD update of the training scale. An asynchronous step (queued on the
device before the previous step's tokens are read, ``engine/async_step.py``) is split in two:
``launch(batch)`` advances its sequences when it is queued (each sampled token pending), and
``postprocess(batch, result, launched)`` applies its tokens once they are read; a sequence that
finished in between (a stop seen one step late, an abort) drops its token.

Invariants: pure (no I/O, no clocks: ``now`` is passed in, seconds; no torch); the scheduler's
picture of the runner (``graphs``: which steps replay CUDA graphs) changes only through
``fall_back_from_prefill_graphs``, never by editing ``config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loquetier.engine.scheduling.budget import FairShare, lookahead
from loquetier.engine.scheduling.config import SchedulerConfig, resolve_coalesce
from loquetier.engine.scheduling.decode import add_decode_rows, set_decode_budgets
from loquetier.engine.scheduling.plan import StepPlan
from loquetier.engine.scheduling.prefill import add_prefill_chunks, start_prefill
from loquetier.engine.scheduling.pricing import GraphPaths, StepCost, StepFeatures, StepTimeModel, step_features
from loquetier.engine.scheduling.queue import AdapterSlots, KVAllocator, RequestQueue
from loquetier.engine.scheduling.slo import RequestMetrics, SchedulerMetrics, SloTracker, StepRecord, tpot_s, ttft_s
from loquetier.engine.scheduling.train_scale import TrainScale
from loquetier.engine.scheduling.training import (
    fill_training,
    fill_training_idle,
    grant_training,
    reserve_training_floors,
    serving_step_cap,
)
from loquetier.engine.sequence import RequestState, ScheduledBatch, SequenceStatus, StepResult, TrainWork


@dataclass
class Launched:
    """An asynchronous step as ``Scheduler.launch`` advanced it: its features (taken before the
    advance, as ``postprocess`` takes a plain step's) and the sequences whose token it samples."""

    features: StepFeatures
    sampled: list[RequestState]


@dataclass
class StepEvents:
    """What ``postprocess`` changed: new tokens (seq_id, token), finished sequences + their metrics."""

    step: StepRecord
    new_tokens: list[tuple[str, int]] = field(default_factory=list)
    finished: list[RequestState] = field(default_factory=list)
    request_metrics: list[RequestMetrics] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVAllocator,
        adapters: AdapterSlots | None = None,
        *,
        graphs: GraphPaths | None = None,
        step_model: StepTimeModel | None = None,
        prior_cost: StepCost | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        self.graphs = graphs or GraphPaths()
        self.config = resolve_coalesce(config, self.graphs)
        self.queue = RequestQueue(config.max_num_seqs, kv, adapters)
        self.step_model = step_model or StepTimeModel(prior_cost, window=config.step_model_window)
        self.eos_token_id = eos_token_id
        self.jobs: dict[str, TrainWork] = {}
        self.fair_share = FairShare()
        self.train_scale = TrainScale(config.train_decrease, config.train_increase, config.min_train_scale)
        self.slo = SloTracker(config.slo_window)
        self.metrics = SchedulerMetrics()
        self.num_graph_fallbacks = 0  # times the runner gave prefill graphs up
        self._last_train_at: float | None = None  # when a step last trained (training.train_probe_due)
        self._repay_s = 0.0  # predicted decode-only step of the current decode rows (tpot_lookahead)
        self._step_id = 0
        self._last_arrival: float | None = None  # the latest request's arrival (serving_step_cap)
        self.margin = 1.0  # the step model's margin the last step was planned at (plan_quantile)

    # ---- requests and jobs ---------------------------------------------------------------------

    @property
    def waiting(self) -> list[RequestState]:
        """WAITING or PREEMPTED sequences (the queue's list: read it, do not edit it)."""
        return self.queue.waiting

    @property
    def running(self) -> list[RequestState]:
        """RUNNING sequences, prefilling or decoding (the queue's list: read it, do not edit it)."""
        return self.queue.running

    def add_request(self, seq: RequestState) -> None:
        self.queue.add(seq)
        if self._last_arrival is None or seq.arrival_time > self._last_arrival:
            self._last_arrival = seq.arrival_time
        if seq.ttft_ms is None:
            seq.ttft_ms = self.config.default_ttft_ms
        if seq.tpot_ms is None:
            seq.tpot_ms = self.config.default_tpot_ms
        self.metrics.num_requests_added += 1

    def abort(self, seq_id: str, now: float) -> RequestMetrics | None:
        """Abort a request wherever it is; frees its KV and adapter pin. None if unknown/finished."""
        return self.finish(seq_id, "abort", now)

    def finish(self, seq_id: str, reason: str, now: float) -> RequestMetrics | None:
        """Finish a request from outside (``"stop"`` on a stop string, ``"abort"``)."""
        seq = self.queue.get(seq_id)
        if seq is None:
            return None
        return self._finish(seq, reason, now)

    def get(self, seq_id: str) -> RequestState | None:
        return self.queue.get(seq_id)

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

    def fall_back_from_prefill_graphs(self, *, decode_graphs: bool) -> None:
        """The runner gave graphs for steps with prompt rows up (a capture failed): price those steps
        as eager from now on; ``decode_graphs``: whether decode-only steps still replay graphs."""
        self.graphs = GraphPaths(decode=decode_graphs, max_rows=0, max_mean_context=self.graphs.max_mean_context)
        self.num_graph_fallbacks += 1

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.queue.waiting or self.queue.running)

    @property
    def num_waiting(self) -> int:
        return len(self.queue.waiting)

    @property
    def num_running(self) -> int:
        return len(self.queue.running)

    # ---- the step ------------------------------------------------------------------------------

    def schedule(self, now: float) -> ScheduledBatch:
        cfg = self.config
        self.margin = self.step_model.margin(cfg.plan_quantile)
        plan = StepPlan(batch=ScheduledBatch(step_id=self._step_id, now=now), cost=self.step_model.cost,
                        graphs=self.graphs, train_scale=self.train_scale.value,
                        tokens_left=cfg.max_num_batched_tokens, last_train_at=self._last_train_at,
                        margin=self.margin)
        self._step_id += 1
        add_decode_rows(plan, self.queue)
        self.metrics.num_preemptions += len(plan.batch.preempted)
        set_decode_budgets(plan, cfg)
        if plan.repay_s is not None:
            self._repay_s = plan.repay_s
        reserve_training_floors(plan, self.jobs.values(), cfg, self.step_model.num_decode_only)
        start_prefill(plan, self.queue, cfg)
        add_prefill_chunks(plan, self.queue, cfg)
        serving = self.has_unfinished_requests
        plan.step_cap = serving_step_cap(cfg, now, serving=serving, last_arrival=self._last_arrival)
        if serving:
            fill_training(plan, cfg, has_backlog=bool(self.queue.waiting), prior=self.step_model.prior)
        else:
            self.train_scale.reset()
            fill_training_idle(plan, cfg)
        grant_training(plan, self.fair_share, self.jobs)
        self._last_train_at = plan.last_train_at
        batch = plan.batch
        batch.time_budget_s = plan.time_budget
        batch.predicted_time_s = self.step_model.predict(step_features(batch, self.graphs))
        return batch

    def continue_decode(self, batch: ScheduledBatch, now: float) -> ScheduledBatch:
        """The next step of a decode window (``Engine``: several decode steps run on the device with one
        synchronization): ``batch``'s decode rows whose sequences still run, one token each, with
        ``batch``'s budgets. The KV their tokens need was reserved when the window began."""
        step = ScheduledBatch(step_id=self._step_id, now=now, time_budget_s=batch.time_budget_s,
                              predicted_time_s=batch.predicted_time_s)
        self._step_id += 1
        for seq in batch.decode_seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.queue.kv.allocate(seq.seq_id, 1)
                step.decode_seqs.append(seq)
        return step

    def launch(self, batch: ScheduledBatch) -> Launched:
        """``batch`` (inference rows only) is queued on the device and its tokens will be read later:
        its sequences advance now, so that the next step can be scheduled while it runs. Each token it
        samples is pending until ``postprocess(batch, result, launched)`` applies it."""
        if batch.train_chunks or batch.eval_chunks:
            raise ValueError("an asynchronous step holds inference rows only")
        features = step_features(batch, self.graphs, 0, 0)
        sampled: list[RequestState] = []
        for chunk in batch.prefill_chunks:
            seq = chunk.seq
            final = chunk.is_final
            seq.num_computed_tokens += chunk.length
            if final:
                seq.num_pending += 1
                sampled.append(seq)
        for seq in batch.decode_seqs:
            seq.num_computed_tokens += 1
            seq.num_pending += 1
            sampled.append(seq)
        return Launched(features, sampled)

    def postprocess(self, batch: ScheduledBatch, result: StepResult, launched: Launched | None = None) -> StepEvents:
        """Apply a step's outcome; ``launched``: the step was advanced by ``launch`` when it was queued."""
        now = result.now
        train_used = result.train_tokens
        if train_used is None:
            train_used = {c.job_id: c.num_tokens for c in batch.train_chunks}
        eval_used = result.eval_tokens
        if eval_used is None:
            eval_used = {c.job_id: c.num_tokens for c in batch.eval_chunks}
        if launched is None:
            features = step_features(batch, self.graphs, sum(train_used.values()), sum(eval_used.values()))
        else:
            features = launched.features
        self.step_model.observe(features, result.step_time_s)
        events = StepEvents(step=self._record(batch, result, features))
        misses_before = self.slo.num_event_misses

        if launched is not None:  # advanced when it was queued: its tokens only
            for seq in launched.sampled:
                seq.num_pending -= 1
                if seq.status is not SequenceStatus.FINISHED:  # finished since: a stop seen late, an abort
                    self._append_token(seq, _sampled(result, seq), now, events)
        else:
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
        if self.has_unfinished_requests:
            violated = overran or self.slo.num_event_misses > misses_before
            self.train_scale.update(
                violated=violated, attainment=self.slo.window_attainment, target=self.config.slo_target
            )
        return events

    # ---- helpers -------------------------------------------------------------------------------

    def _finish(self, seq: RequestState, reason: str, now: float) -> RequestMetrics | None:
        if seq.status is SequenceStatus.FINISHED:
            return None
        self.queue.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = now
        assert seq.ttft_ms is not None and seq.tpot_ms is not None
        m = RequestMetrics.of(seq, seq.ttft_ms, seq.tpot_ms)
        self.slo.record_request(m)
        if reason == "abort":
            self.metrics.num_requests_aborted += 1
        else:
            self.metrics.num_requests_finished += 1
        return m

    def _append_token(self, seq: RequestState, token: int, now: float, events: StepEvents) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.slo.record_event(now - seq.arrival_time <= ttft_s(seq))
        else:
            assert seq.last_token_time is not None and seq.first_token_time is not None
            met_gap = now - seq.last_token_time <= tpot_s(seq)
            seq.num_tpot_misses += int(not met_gap)
            if self.config.tpot_burst > 1.0:
                # TPOT is the mean gap: met while the request's mean so far is within target, or could
                # be brought back within it by the tokens the scheduler may borrow against
                repaid = lookahead(seq, self.config) * (tpot_s(seq) - self._repay_s)
                self.slo.record_event(now - seq.first_token_time <= seq.num_output_tokens * tpot_s(seq) + repaid)
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
            margin=self.margin,
        )
        return m.last_step


def _sampled(result: StepResult, seq: RequestState) -> int:
    try:
        return result.sampled_token_ids[seq.seq_id]
    except KeyError:
        raise KeyError(f"runner returned no sampled token for sequence {seq.seq_id!r}") from None
