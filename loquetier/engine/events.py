"""What `Engine.step()` reports: engine-side events, turned into wire records by the worker.

The engine never publishes anything itself; the worker converts each event at its boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    queued_ms: float  # arrival → first scheduled
    ttft_ms: float | None  # arrival → first token
    tpot_ms: float | None  # mean gap between output tokens after the first


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of a streaming request (one or more per step)."""

    request_id: str
    token_ids: list[int]
    text: str  # the text these tokens add (detokenized incrementally)


@dataclass(frozen=True)
class RequestFinished:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    usage: Usage
    timings: Timings
    logprobs: list[float] | None = None
    slo_met: bool | None = None
    adapter_id: str | None = None


@dataclass(frozen=True)
class RequestFailed:
    request_id: str
    code: str
    message: str


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    tokens_processed: int
    tokens_per_s: float


@dataclass(frozen=True)
class JobEvaluated:
    job_id: str
    step: int
    loss: float
    token_accuracy: float


@dataclass(frozen=True)
class JobCheckpoint:
    """A checkpoint taken at an optimizer-step boundary; ``data`` restores the run exactly."""

    job_id: str
    step: int
    data: bytes


@dataclass(frozen=True)
class JobFinished:
    """A job ended. For a successful fine-tune ``adapter`` holds the exported adapter bytes."""

    job_id: str
    adapter_id: str
    status: str  # "succeeded" | "failed" | "cancelled"
    metrics: dict[str, float] = field(default_factory=dict)
    adapter: bytes | None = None
    error: str | None = None


EngineEvent = (
    TokenEvent | RequestFinished | RequestFailed | JobProgress | JobEvaluated | JobCheckpoint | JobFinished
)
