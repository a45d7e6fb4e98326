"""Prometheus metrics of one worker process (``settings.worker.metrics_port``; 0 = off).

Names follow Prometheus conventions (``_seconds``, ``_total``); labels stay low-cardinality
(row type, outcome), never a request or job id.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from loquetier.engine.events import JobProgress, RequestFinished, TokenEvent

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

STEP_SECONDS = Histogram("loquetier_step_seconds", "Wall time of one engine step", buckets=_LATENCY_BUCKETS)
TOKENS = Counter("loquetier_tokens_total", "Tokens processed, by row type", ["row_type"])
TTFT = Histogram("loquetier_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS)
TPOT = Histogram("loquetier_tpot_seconds", "Mean time per output token after the first", buckets=_LATENCY_BUCKETS)
SLO = Counter("loquetier_slo_total", "Finished requests by SLO outcome", ["outcome"])
REQUESTS = Counter("loquetier_requests_total", "Finished requests by outcome", ["outcome"])
RECORDS = Counter("loquetier_records_total", "Consumed records by topic kind and outcome", ["kind", "outcome"])
QUEUE_DEPTH = Gauge("loquetier_queue_depth", "Work waiting or running, by queue", ["queue"])
SLOTS_IN_USE = Gauge("loquetier_adapter_slots_in_use", "Adapter slots in use on the device")
TRAIN_LOSS = Gauge("loquetier_training_loss", "Latest training loss reported by a job on this worker")
PAUSED = Gauge("loquetier_partitions_paused", "Partitions paused for back-pressure, by topic kind", ["kind"])
# fine buckets below 10 ms: the target is a p99 under 10 ms (workers/loop_lag.py)
LOOP_LAG = Histogram(
    "loquetier_event_loop_lag_seconds", "How late a periodic 10 ms timer ran on the worker's event loop",
    buckets=(0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25,
             0.5, 1, 2.5),
)

# the way in of a request, split: the broker's part (record age when taken) and the worker's own
# (its row, checks and the hand-over to the engine); fine buckets, the target is tens of ms
_INTAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
RECORD_AGE = Histogram(
    "loquetier_request_record_age_seconds",
    "Age of a request record when the worker takes it (its Kafka timestamp to now: producer, broker, fetch)",
    buckets=_INTAKE_BUCKETS,
)
INTAKE = Histogram(
    "loquetier_request_intake_seconds",
    "From taking a request record to its start in the engine (database row, checks, hand-over)",
    buckets=_INTAKE_BUCKETS,
)


def serve(port: int | None) -> bool:
    """Start the HTTP endpoint; ``None`` or 0 leaves it off."""
    if not port:
        return False
    start_http_server(port)
    return True


def observe_step(seconds: float, events: list[Any]) -> None:
    """Called on the engine thread after every step (prometheus_client is thread-safe)."""
    STEP_SECONDS.observe(seconds)
    for ev in events:
        if isinstance(ev, TokenEvent):
            TOKENS.labels("decode").inc(len(ev.token_ids))
        elif isinstance(ev, RequestFinished):
            TOKENS.labels("prefill").inc(ev.usage.prompt_tokens)
            if ev.timings.ttft_ms is not None:
                TTFT.observe(ev.timings.ttft_ms / 1000)
            if ev.timings.tpot_ms is not None:
                TPOT.observe(ev.timings.tpot_ms / 1000)
            if ev.slo_met is not None:
                SLO.labels("met" if ev.slo_met else "missed").inc()
        elif isinstance(ev, JobProgress):
            TRAIN_LOSS.set(ev.loss)


def observe_stats(stats: dict[str, Any]) -> None:
    """Gauges from ``engine.stats()`` (keys the engine does not report are skipped)."""
    for key, queue in (
        ("num_waiting", "engine_waiting"),
        ("num_running", "engine_running"),
        ("num_jobs", "engine_jobs"),
    ):
        value = stats.get(key)
        if isinstance(value, int | float):
            QUEUE_DEPTH.labels(queue).set(value)
    slots = stats.get("num_slots_in_use", stats.get("slots_in_use"))
    if isinstance(slots, int | float):
        SLOTS_IN_USE.set(slots)
