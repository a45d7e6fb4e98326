"""Wire records: the messages on Loquetier's Kafka topics (docs/wire-format.md).

Every record is a msgpack map with a ``schema`` version (currently 1). Models are frozen,
strict (no silent type coercion) and reject unknown fields, so a mistyped field name is
an error instead of a silently ignored option. Encoding and decoding with one clear
error per bad record: :func:`decode_record` (the msgpack plumbing is :mod:`loquetier.codec`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, TypeAdapter, ValidationError, model_validator

from loquetier.codec import (
    DEFAULT_LIMITS,
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    Id,
    Int32,
    Limits,
    NonNegInt,
    PositiveInt,
    Record,
    RecordError,
    TokenId,
    WireModel,
    check_schema,
    encode,
    from_validation_error,
    ids_of,
    peek_ids,
    unpack_map,
)
from loquetier.results import (
    CheckpointResult,
    ControlAck,
    ControlAction,
    DeadLetter,
    ErrorResult,
    GenerateResult,
    JobDoneResult,
    JobStatus,
    ProgressResult,
    ResultRecord,
    Timings,
    TokenResult,
    Usage,
)

# --- loquetier.requests ---------------------------------------------------------------


class SamplingSpec(WireModel):
    max_tokens: PositiveInt = 128
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: NonNegInt = 0  # 0 disables top-k
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    logprobs: int | None = Field(default=None, ge=0, le=20)


class SLOSpec(WireModel):
    ttft_ms: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)


class GenerateRequest(Record):
    """One inference request; ``request_id`` is the client's idempotency key."""

    request_id: Id
    adapter_id: Id | None = None
    prompt: str | None = Field(default=None, min_length=1)
    prompt_token_ids: list[TokenId] | None = Field(default=None, min_length=1)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    slo: SLOSpec | None = None
    priority: Int32 = 0
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt_form(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("exactly one of 'prompt' or 'prompt_token_ids' must be given")
        return self


# --- loquetier.training -----------------------------------------------------------------


class LoRASpec(WireModel):
    rank: PositiveInt = 8
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )
    use_rslora: bool = False


class TextExample(WireModel):
    """Tokenized as prompt tokens + completion tokens + EOS; loss on the completion."""

    prompt: str
    completion: str = Field(min_length=1)


class TokenExample(WireModel):
    """Used exactly as given: prompt ids + completion ids, nothing added."""

    prompt_token_ids: list[TokenId]
    completion_token_ids: list[TokenId] = Field(min_length=1)


def _example_form(value: Any) -> str:
    if isinstance(value, TokenExample):
        return "tokens"
    token_keys = {"prompt_token_ids", "completion_token_ids"}
    return "tokens" if isinstance(value, dict) and token_keys & value.keys() else "text"


def _data_form(value: Any) -> str:
    return "path" if isinstance(value, str) else "inline"


Example = Annotated[
    Annotated[TextExample, Tag("text")] | Annotated[TokenExample, Tag("tokens")],
    Discriminator(_example_form),
]
# Inline examples, or a path (local path or URI the worker can read) to a JSONL file of them.
DataSpec = Annotated[
    Annotated[list[Example], Tag("inline")] | Annotated[str, Tag("path"), Field(min_length=1)],
    Discriminator(_data_form),
]


class TrainingParamsSpec(WireModel):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)  # null disables clipping
    epochs: PositiveInt | None = None
    max_steps: PositiveInt | None = None
    micro_batch_tokens: PositiveInt = 4096
    grad_accum: PositiveInt = 1
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: NonNegInt = 0
    seed: int = 0
    checkpoint_every: NonNegInt = 0  # optimizer steps; 0 = only at the end
    eval_every: NonNegInt = 0  # optimizer steps; 0 = only at the end

    @model_validator(mode="before")
    @classmethod
    def _has_a_length(cls, data: Any) -> Any:
        """Neither ``epochs`` nor ``max_steps``: one epoch."""
        if isinstance(data, dict) and data.get("epochs") is None and data.get("max_steps") is None:
            return {**data, "epochs": 1}
        return data


class TrainingJob(Record):
    """A fine-tuning or evaluation job for one adapter."""

    job_id: Id
    kind: Literal["finetune", "evaluate"] = "finetune"
    adapter_id: Id
    base_adapter: Id | None = None
    lora: LoRASpec = Field(default_factory=LoRASpec)
    data: DataSpec
    eval_data: DataSpec | None = None
    params: TrainingParamsSpec = Field(default_factory=TrainingParamsSpec)
    priority: Int32 = 0
    overwrite: bool = False  # finetune into an adapter_id another job or a load made: a new version

    @model_validator(mode="after")
    def _data_not_empty(self) -> TrainingJob:
        if isinstance(self.data, list) and not self.data:
            raise ValueError("'data' must hold at least one example")
        return self


# --- loquetier.control ------------------------------------------------------------------

class ControlCommand(Record):
    """Operator command. ``target_id``: adapter_id (load/unload), job_id or request_id
    (cancel/pause/resume), worker_id or "*" (drain)."""

    command_id: Id | None = None
    action: ControlAction
    target_id: Id
    path: str | None = Field(default=None, min_length=1)  # load: PEFT directory
    source: str | None = Field(default=None, min_length=1)  # load: "db" or "job:<job_id>"
    worker_id: Id | None = None  # only this worker acts; null = every worker
    token: str | None = Field(default=None, max_length=1024)  # drain: the operator token

    @model_validator(mode="after")
    def _load_has_one_source(self) -> ControlCommand:
        has_path, has_source = self.path is not None, self.source is not None
        if self.action == "load" and has_path == has_source:
            raise ValueError("'load' needs exactly one of 'path' or 'source'")
        if self.action != "load" and (has_path or has_source):
            raise ValueError(f"'{self.action}' takes no 'path' or 'source'")
        return self


# --- codec ------------------------------------------------------------------------------

TopicKind = Literal["requests", "training", "control", "results", "dlq"]
AnyRecord = GenerateRequest | TrainingJob | ControlCommand | ResultRecord | DeadLetter

_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "requests": TypeAdapter(GenerateRequest),
    "training": TypeAdapter(TrainingJob),
    "control": TypeAdapter(ControlCommand),
    "results": TypeAdapter(ResultRecord),
    "dlq": TypeAdapter(DeadLetter),
}


def encode_record(record: Record) -> bytes:
    """A record as msgpack bytes, ready to be a Kafka record value."""
    return encode(record)


def decode_record(kind: TopicKind, data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Bytes from topic ``kind`` -> its record model, or one :class:`RecordError`.

    Returns GenerateRequest / TrainingJob / ControlCommand / a result record / DeadLetter.
    """
    obj = unpack_map(data, limits)
    check_schema(obj, SUPPORTED_SCHEMA_VERSIONS)
    try:
        record = _ADAPTERS[kind].validate_python(obj)
    except ValidationError as exc:
        raise from_validation_error(exc, obj) from None
    problem = _over_limit(record, limits)
    if problem:
        raise RecordError("too_large", problem, *ids_of(obj))
    return record


def _over_limit(record: object, limits: Limits) -> str | None:
    if isinstance(record, GenerateRequest):
        sampling = record.sampling
        if record.prompt is not None and len(record.prompt) > limits.max_prompt_chars:
            return f"prompt has {len(record.prompt)} chars, the limit is {limits.max_prompt_chars}"
        ids = record.prompt_token_ids
        if ids is not None and len(ids) > limits.max_prompt_tokens:
            return f"prompt_token_ids has {len(ids)} tokens, the limit is {limits.max_prompt_tokens}"
        if sampling.max_tokens > limits.max_new_tokens:
            return f"sampling.max_tokens is {sampling.max_tokens}, the limit is {limits.max_new_tokens}"
        if len(sampling.stop) > limits.max_stop_sequences:
            return f"sampling.stop has {len(sampling.stop)} items, the limit is {limits.max_stop_sequences}"
    if isinstance(record, TrainingJob):
        for name, data in (("data", record.data), ("eval_data", record.eval_data)):
            if isinstance(data, list) and len(data) > limits.max_inline_examples:
                return f"{name} has {len(data)} examples, the limit is {limits.max_inline_examples}"
    return None


__all__ = [
    "SCHEMA_VERSION",
    "AnyRecord",
    "CheckpointResult",
    "ControlAck",
    "ControlAction",
    "ControlCommand",
    "DeadLetter",
    "ErrorResult",
    "GenerateRequest",
    "GenerateResult",
    "JobStatus",
    "JobDoneResult",
    "Limits",
    "Record",
    "LoRASpec",
    "ProgressResult",
    "RecordError",
    "ResultRecord",
    "SLOSpec",
    "SamplingSpec",
    "TextExample",
    "Timings",
    "TokenExample",
    "TokenResult",
    "TopicKind",
    "TrainingJob",
    "TrainingParamsSpec",
    "Usage",
    "decode_record",
    "encode_record",
    "peek_ids",
]
