"""Records on ``loquetier.results`` (key = request_id or job_id) and ``loquetier.dlq``.

Result records form one union discriminated by ``type``; see docs/wire-format.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from loquetier.codec import Id, NonNegInt, Record, TokenId, WireModel

# --- loquetier.results ------------------------------------------------------------------


class Usage(WireModel):
    prompt_tokens: NonNegInt
    completion_tokens: NonNegInt


class Timings(WireModel):
    queued_ms: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None


class TokenResult(Record):
    type: Literal["token"] = "token"
    request_id: Id
    index: NonNegInt  # position of token_ids[0] in the completion
    token_ids: list[TokenId]
    text: str = ""
    logprobs: list[float] | None = None


FinishReason = Literal["stop", "length", "cancelled", "error"]


class GenerateResult(Record):
    type: Literal["result"] = "result"
    request_id: Id
    adapter_id: Id | None = None
    token_ids: list[TokenId]
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings = Field(default_factory=Timings)
    logprobs: list[float] | None = None


class RecordRef(WireModel):
    """Where one consumed record stood: a refusal of that record alone names it, so that a reader
    who sent another record under the same id can tell the refusal is not its answer."""

    topic: str = Field(min_length=1, max_length=249)
    partition: NonNegInt
    offset: NonNegInt

    def key(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)


class ErrorResult(Record):
    type: Literal["error"] = "error"
    request_id: Id | None = None
    job_id: Id | None = None
    code: str = Field(min_length=1)
    message: str
    # set: this refuses only the record there (unreadable, or an id another record holds), not the
    # request or job under the id; nil: the outcome of the request or job
    record: RecordRef | None = None

    @model_validator(mode="after")
    def _has_an_id(self) -> ErrorResult:
        if self.request_id is None and self.job_id is None:
            raise ValueError("an error result needs 'request_id' or 'job_id'")
        return self


JobStatus = Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]


class ProgressResult(Record):
    type: Literal["progress"] = "progress"
    job_id: Id
    adapter_id: Id | None = None
    status: JobStatus = "running"
    step: NonNegInt
    total_steps: NonNegInt | None = None
    epoch: float = Field(default=0.0, ge=0)
    loss: float | None = None
    eval_loss: float | None = None
    lr: float | None = None
    tokens_processed: NonNegInt = 0
    tokens_per_s: float | None = None


class CheckpointResult(Record):
    type: Literal["checkpoint"] = "checkpoint"
    job_id: Id
    adapter_id: Id
    step: NonNegInt
    uri: str | None = None  # null: stored in the database (checkpoints table)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: NonNegInt


class JobDoneResult(Record):
    type: Literal["job_done"] = "job_done"
    job_id: Id
    adapter_id: Id
    status: Literal["succeeded", "failed", "cancelled"]
    step: NonNegInt
    loss: float | None = None
    eval_loss: float | None = None
    adapter_version: NonNegInt | None = None
    error: str | None = None


ControlAction = Literal["load", "unload", "cancel", "pause", "resume", "drain"]


class ControlAck(Record):
    """The answer to one control command (keyed by ``command_id``): done, or why not."""

    type: Literal["control_ack"] = "control_ack"
    command_id: Id
    action: ControlAction | None = None  # null: the command could not be read (it is in the DLQ)
    target_id: Id | None = None
    worker_id: Id | None = None  # the worker that applied it
    ok: bool
    code: str | None = None  # null on success
    message: str = ""
    adapter_version: NonNegInt | None = None  # load: the version now served
    record: RecordRef | None = None  # the command record answered (nil from workers before it was added)


ResultRecord = Annotated[
    TokenResult | GenerateResult | ErrorResult | ProgressResult | CheckpointResult | JobDoneResult | ControlAck,
    Field(discriminator="type"),
]


# --- loquetier.dlq ----------------------------------------------------------------------


class DeadLetter(Record):
    """An undecodable or invalid record with the reason: its key and value whole when small,
    else their first bytes, always with their full size and sha256 (the letter stays bounded)."""

    topic: str
    partition: NonNegInt
    offset: NonNegInt
    key: bytes | None = None
    value: bytes | None = None
    code: str
    reason: str
    request_id: str | None = None
    job_id: str | None = None
    worker_id: str | None = None
    key_size_bytes: NonNegInt | None = None
    value_size_bytes: NonNegInt | None = None
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    value_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
