"""SLO contracts: each request's targets and deadlines, attainment, and the scheduler's counters.

A request's contract is its TTFT and TPOT targets (``ttft_ms`` / ``tpot_ms``, filled from the config's
defaults at admission); ``deadline`` is the next moment it is due (its first token, then each next
token).

Two attainment notions:

- **Event attainment** (the control signal): every first token is a TTFT event (met when
  ``ttft <= ttft_ms``) and every later token a TPOT event (met when the gap since the previous token
  ``<= tpot_ms``). The last ``window`` events form a sliding window; it reacts within a step.
- **Request attainment** (the reported metric): a finished request met its SLO when its TTFT and its
  mean TPOT are both within target. Aborted requests are not counted.

Everything here is plain counters; the service side exports them (Prometheus) without the engine
importing any client library.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from loquetier.engine.sequence import RequestState


@dataclass(frozen=True)
class RequestMetrics:
    """One finished request. Times in seconds; targets in milliseconds."""

    seq_id: str
    adapter_id: str | None
    priority: int
    arrival_time: float
    finish_time: float
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    ttft_s: float | None
    mean_tpot_s: float | None
    ttft_target_ms: float
    tpot_target_ms: float
    num_preemptions: int
    num_tpot_misses: int

    @property
    def met_ttft(self) -> bool:
        return self.ttft_s is not None and self.ttft_s * 1e3 <= self.ttft_target_ms

    @property
    def met_tpot(self) -> bool:
        return self.mean_tpot_s is None or self.mean_tpot_s * 1e3 <= self.tpot_target_ms

    @property
    def met_slo(self) -> bool:
        return self.met_ttft and self.met_tpot

    @staticmethod
    def of(seq: RequestState, ttft_target_ms: float, tpot_target_ms: float) -> RequestMetrics:
        assert seq.finish_time is not None and seq.finish_reason is not None
        return RequestMetrics(
            seq_id=seq.seq_id,
            adapter_id=seq.adapter_id,
            priority=seq.priority,
            arrival_time=seq.arrival_time,
            finish_time=seq.finish_time,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            ttft_s=seq.ttft_s,
            mean_tpot_s=seq.mean_tpot_s,
            ttft_target_ms=ttft_target_ms,
            tpot_target_ms=tpot_target_ms,
            num_preemptions=seq.num_preemptions,
            num_tpot_misses=seq.num_tpot_misses,
        )


class SloTracker:
    """Sliding window of token-level SLO events plus request-level totals."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._events: deque[bool] = deque(maxlen=window)
        self._num_met_in_window = 0
        self.num_events = 0
        self.num_event_misses = 0
        self.num_requests = 0
        self.num_requests_met = 0
        self.num_ttft_misses = 0
        self.num_tpot_misses = 0

    def record_event(self, met: bool) -> None:
        if len(self._events) == self._events.maxlen and self._events[0]:
            self._num_met_in_window -= 1
        self._events.append(met)
        self._num_met_in_window += int(met)
        self.num_events += 1
        self.num_event_misses += int(not met)

    def record_request(self, m: RequestMetrics) -> None:
        if m.finish_reason == "abort":
            return
        self.num_requests += 1
        self.num_requests_met += int(m.met_slo)
        self.num_ttft_misses += int(not m.met_ttft)
        self.num_tpot_misses += int(not m.met_tpot)

    @property
    def window_attainment(self) -> float:
        """Fraction of the last ``window`` events that met their target (1.0 when there are none)."""
        return self._num_met_in_window / len(self._events) if self._events else 1.0

    @property
    def request_attainment(self) -> float:
        return self.num_requests_met / self.num_requests if self.num_requests else 1.0


@dataclass
class StepRecord:
    """Composition and time of one step (measured and predicted)."""

    step_id: int
    now: float
    step_time_s: float
    predicted_time_s: float
    time_budget_s: float | None
    num_decode_rows: int
    num_prefill_tokens: int
    num_train_tokens: int
    num_eval_tokens: int
    num_kv_tokens_read: int
    train_scale: float
    margin: float = 1.0  # the step model's margin its plan was scaled by (SchedulerConfig.plan_quantile)


@dataclass
class SchedulerMetrics:
    """Cumulative counters. ``busy_time_s`` is the sum of measured step times."""

    num_steps: int = 0
    busy_time_s: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_train_tokens: int = 0
    num_eval_tokens: int = 0
    num_requests_added: int = 0
    num_requests_finished: int = 0
    num_requests_aborted: int = 0
    num_preemptions: int = 0
    num_step_overruns: int = 0  # measured step time above its time budget
    train_tokens_by_job: dict[str, int] = field(default_factory=dict)
    eval_tokens_by_job: dict[str, int] = field(default_factory=dict)
    last_step: StepRecord | None = None

    def train_tokens_per_s(self, job_id: str) -> float:
        """Average training throughput of one job over the engine's busy time."""
        if self.busy_time_s <= 0:
            return 0.0
        return self.train_tokens_by_job.get(job_id, 0) / self.busy_time_s


def ttft_s(seq: RequestState) -> float:
    assert seq.ttft_ms is not None
    return seq.ttft_ms / 1e3


def tpot_s(seq: RequestState) -> float:
    assert seq.tpot_ms is not None
    return seq.tpot_ms / 1e3


def deadline(seq: RequestState) -> float:
    """Next latency deadline: TTFT before the first token, else the next token's TPOT deadline."""
    if seq.last_token_time is None:
        return seq.arrival_time + ttft_s(seq)
    return seq.last_token_time + tpot_s(seq)
