"""Wire records: the messages on Loquetier's Kafka topics (docs/wire-format.md).

Every record is a msgpack map with a ``schema`` version (currently 1). Models are frozen,
strict (no silent type coercion) and reject unknown fields, so a mistyped field name is
an error instead of a silently ignored option. Encoding and decoding with one clear
error per bad record: :func:`decode_record` (the msgpack plumbing is :mod:`loquetier.codec`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)

from loquetier.codec import (
    DEFAULT_LIMITS,
    MAX_ID_CHARS,
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    Id,
    Int32,
    Int64,
    Limits,
    PositiveInt,
    Record,
    RecordError,
    TokenIds,
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
    RecordRef,
    ResultRecord,
    Timings,
    TokenResult,
    Usage,
)

# --- loquetier.requests ---------------------------------------------------------------


# Value bounds of the wire records (docs/wire-format.md, "Limits"). A value outside them is refused
# with ``invalid_value`` before any work starts; floats must also be finite (no NaN, no ±Infinity).
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 2**31 - 1  # the engine also clamps it to the model's vocabulary
MAX_STOP_CHARS = 256
MAX_SLO_MS = 3_600_000.0  # one hour
MAX_LORA_RANK = 1024  # the worker's own max_lora_rank is checked before anything is allocated
MAX_LORA_ALPHA = 1000.0  # so the scale alpha / rank (or alpha / sqrt(rank)) stays <= 1000
MAX_TARGET_MODULES = 16
MAX_MODULE_CHARS = 64
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 10.0
MAX_GRAD_NORM = 1e6
MAX_EPOCHS = 10_000
MAX_STEPS = 10_000_000  # max_steps, warmup_steps, checkpoint_every, eval_every
MAX_MICRO_BATCH_TOKENS = 1_048_576
MAX_GRAD_ACCUM = 4096
MAX_PATH_CHARS = 4096
MAX_CHAT_MESSAGES = 1024  # turns in one chat (a request's ``messages`` or a chat example)


def _finite(
    default: float | None,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Any:
    """A float field that refuses NaN and ±Infinity besides its bounds."""
    return Field(default=default, allow_inf_nan=False, gt=gt, ge=ge, lt=lt, le=le)


def _without_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("holds a NUL character (\\u0000), which a job's record cannot store")
    return text


# Text a training job stores with its record (PostgreSQL text and JSON hold no NUL character)
StoredText = Annotated[str, AfterValidator(_without_nul)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
StepCount = Annotated[int, Field(ge=0, le=MAX_STEPS)]


class SamplingSpec(WireModel):
    max_tokens: PositiveInt = 128
    temperature: float = _finite(default=1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = _finite(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K)  # 0 disables top-k
    seed: Int64 | None = None
    stop: Annotated[list[StopString], Field(fail_fast=True)] = Field(default_factory=list)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    ignore_eos: bool = False  # generate max_tokens tokens whatever comes (benchmarks); stop strings still stop


class SLOSpec(WireModel):
    ttft_ms: float | None = _finite(default=None, gt=0, le=MAX_SLO_MS)
    tpot_ms: float | None = _finite(default=None, gt=0, le=MAX_SLO_MS)


ChatRole = Literal["system", "user", "assistant"]


class ChatMessage(WireModel):
    """One chat turn, the OpenAI shape; the worker renders turns with the model's chat template."""

    role: ChatRole
    content: str


ChatMessages = Annotated[list[ChatMessage], Field(fail_fast=True, min_length=1, max_length=MAX_CHAT_MESSAGES)]


class ChatTrainingTurn(ChatMessage):
    """A turn of a chat training example: a request's turn, with OpenAI's optional ``name`` (kept out
    of the template) and, on an assistant turn, ``weight`` 0 (context only, not learned) or 1
    (learned, the default), as in a data file. Unset ones are left out of the dump, so a turn without
    them reads and compares as before they existed."""

    content: StoredText
    name: StoredText | None = Field(default=None, max_length=MAX_ID_CHARS)
    weight: int | None = Field(default=None, ge=0, le=1)  # strict: true and false are not weights

    @model_validator(mode="after")
    def _weight_on_answers(self) -> ChatTrainingTurn:
        for key in ("name", "weight"):
            if key in self.model_fields_set and getattr(self, key) is None:
                raise ValueError(f"'{key}' may be left out, not null")
        if self.weight is not None and self.role != "assistant":
            raise ValueError("'weight' is 0 or 1, on assistant turns only")
        return self

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("name", "weight"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class GenerateRequest(Record):
    """One inference request; ``request_id`` is the client's idempotency key."""

    request_id: Id
    adapter_id: Id | None = None
    prompt: str | None = Field(default=None, min_length=1)
    prompt_token_ids: TokenIds | None = Field(default=None, min_length=1)
    messages: ChatMessages | None = None  # chat turns; the worker applies the model's chat template
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    slo: SLOSpec | None = None
    priority: Int32 = 0
    stream: bool = False
    # Publish this request's records to this topic instead of the shared results topic; the
    # worker accepts only names under its ``LOQUETIER_KAFKA__REPLY_PREFIX`` (docs/gateway.md).
    reply_to: str | None = Field(default=None, min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")

    @model_validator(mode="after")
    def _one_prompt_form(self) -> GenerateRequest:
        forms = (self.prompt, self.prompt_token_ids, self.messages)
        if sum(form is not None for form in forms) != 1:
            raise ValueError("exactly one of 'prompt', 'prompt_token_ids' or 'messages' must be given")
        return self


# --- loquetier.training -----------------------------------------------------------------


ModuleName = Annotated[str, Field(min_length=1, max_length=MAX_MODULE_CHARS)]


class LoRASpec(WireModel):
    rank: int = Field(default=8, ge=1, le=MAX_LORA_RANK)
    alpha: float = _finite(default=16.0, gt=0, le=MAX_LORA_ALPHA)
    dropout: float = _finite(default=0.0, ge=0.0, lt=1.0)
    target_modules: Annotated[list[ModuleName], Field(fail_fast=True)] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, max_length=MAX_TARGET_MODULES
    )
    use_rslora: bool = False


class TextExample(WireModel):
    """Tokenized as prompt tokens + completion tokens + EOS; loss on the completion."""

    prompt: StoredText
    completion: StoredText = Field(min_length=1)


class TokenExample(WireModel):
    """Used exactly as given: prompt ids + completion ids, nothing added."""

    prompt_token_ids: TokenIds
    completion_token_ids: TokenIds = Field(min_length=1)


class ChatExample(WireModel):
    """Chat turns rendered with the model's chat template; loss on the assistant turns only."""

    messages: Annotated[list[ChatTrainingTurn], Field(fail_fast=True, min_length=1, max_length=MAX_CHAT_MESSAGES)]

    @model_validator(mode="after")
    def _ends_with_an_answer(self) -> ChatExample:
        last = self.messages[-1]
        if last.role != "assistant" or not last.content:
            raise ValueError("the last message must be the assistant's non-empty answer (what the model learns)")
        if not any(m.role == "assistant" and m.weight != 0 for m in self.messages):
            raise ValueError("every assistant turn has weight 0: nothing to learn")
        return self


def _example_form(value: Any) -> str:
    if isinstance(value, TokenExample):
        return "tokens"
    if isinstance(value, ChatExample):
        return "chat"
    if isinstance(value, dict) and "messages" in value:
        return "chat"
    token_keys = {"prompt_token_ids", "completion_token_ids"}
    return "tokens" if isinstance(value, dict) and token_keys & value.keys() else "text"


def _data_form(value: Any) -> str:
    return "path" if isinstance(value, str) else "inline"


Example = Annotated[
    Annotated[TextExample, Tag("text")]
    | Annotated[TokenExample, Tag("tokens")]
    | Annotated[ChatExample, Tag("chat")],
    Discriminator(_example_form),
]
# Inline examples, or a path (local path or URI the worker can read) to a JSONL file of them.
DataSpec = Annotated[
    Annotated[list[Example], Field(fail_fast=True), Tag("inline")]
    | Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS), AfterValidator(_without_nul), Tag("path")],
    Discriminator(_data_form),
]


class TrainingParamsSpec(WireModel):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = _finite(default=1e-4, gt=0, le=MAX_LR)
    weight_decay: float = _finite(default=0.0, ge=0, le=MAX_WEIGHT_DECAY)
    max_grad_norm: float | None = _finite(default=1.0, gt=0, le=MAX_GRAD_NORM)  # null disables clipping
    epochs: int | None = Field(default=None, ge=1, le=MAX_EPOCHS)
    max_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    micro_batch_tokens: int = Field(default=4096, ge=1, le=MAX_MICRO_BATCH_TOKENS)
    grad_accum: int = Field(default=1, ge=1, le=MAX_GRAD_ACCUM)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: StepCount = 0
    seed: Int64 = 0
    checkpoint_every: StepCount = 0  # optimizer steps; 0 = only at the end
    eval_every: StepCount = 0  # optimizer steps; 0 = only at the end

    @model_validator(mode="before")
    @classmethod
    def _has_a_length(cls, data: Any) -> Any:
        """Neither ``epochs`` nor ``max_steps``: one epoch."""
        if isinstance(data, dict) and data.get("epochs") is None and data.get("max_steps") is None:
            return {**data, "epochs": 1}
        return data


class TrainingJobRecord(Record):
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
    def _data_not_empty(self) -> TrainingJobRecord:
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
    path: str | None = Field(default=None, min_length=1, max_length=MAX_PATH_CHARS)  # load: PEFT directory
    # load: "db" or "job:<job_id>"; anything else is refused, never read as "db"
    source: str | None = Field(default=None, pattern=rf"^(db|job:[^\x00]{{1,{MAX_ID_CHARS}}})$")
    # drain: the worker to drain (else target_id). The other commands act on the state every worker
    # shares (PostgreSQL), whichever worker reads them: they refuse a worker_id rather than ignore it.
    worker_id: Id | None = None
    token: str | None = Field(default=None, max_length=1024)  # drain: the operator token

    @model_validator(mode="after")
    def _load_has_one_source(self) -> ControlCommand:
        has_path, has_source = self.path is not None, self.source is not None
        if self.action == "load" and has_path == has_source:
            raise ValueError("'load' needs exactly one of 'path' or 'source'")
        if self.action != "load" and (has_path or has_source):
            raise ValueError(f"'{self.action}' takes no 'path' or 'source'")
        if self.action != "drain" and self.worker_id is not None:
            raise ValueError(f"'{self.action}' takes no 'worker_id': it acts on every worker "
                             "(only 'drain' targets one)")
        return self


# --- codec ------------------------------------------------------------------------------

TopicKind = Literal["requests", "training", "control", "results", "dlq"]
AnyRecord = GenerateRequest | TrainingJobRecord | ControlCommand | ResultRecord | DeadLetter

_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "requests": TypeAdapter(GenerateRequest),
    "training": TypeAdapter(TrainingJobRecord),
    "control": TypeAdapter(ControlCommand),
    "results": TypeAdapter(ResultRecord),
    "dlq": TypeAdapter(DeadLetter),
}


def encode_record(record: Record) -> bytes:
    """A record as msgpack bytes, ready to be a Kafka record value."""
    return encode(record)


def decode_record(kind: TopicKind, data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Bytes from topic ``kind`` -> its record model, or one :class:`RecordError`.

    Returns GenerateRequest / TrainingJobRecord / ControlCommand / a result record / DeadLetter.
    """
    obj = unpack_map(data, limits)
    check_schema(obj, SUPPORTED_SCHEMA_VERSIONS)
    ids = obj.get("prompt_token_ids") if kind == "requests" else None
    if isinstance(ids, list) and len(ids) > limits.max_prompt_tokens:  # before validating each id
        raise RecordError("too_large", _too_many_ids(len(ids), limits), *ids_of(obj))
    try:
        record = _ADAPTERS[kind].validate_python(obj)
    except ValidationError as exc:
        raise from_validation_error(exc, obj) from None
    problem = _over_limit(record, limits)
    if problem:
        raise RecordError("too_large", problem, *ids_of(obj))
    return record


def _too_many_ids(num: int, limits: Limits) -> str:
    return f"prompt_token_ids has {num} tokens, the limit is {limits.max_prompt_tokens}"


def _over_limit(record: object, limits: Limits) -> str | None:
    if isinstance(record, GenerateRequest):
        sampling = record.sampling
        if record.prompt is not None and len(record.prompt) > limits.max_prompt_chars:
            return f"prompt has {len(record.prompt)} chars, the limit is {limits.max_prompt_chars}"
        num_chat_chars = sum(len(m.content) for m in record.messages or ())
        if num_chat_chars > limits.max_prompt_chars:
            return f"messages have {num_chat_chars} chars of content, the limit is {limits.max_prompt_chars}"
        ids = record.prompt_token_ids
        if ids is not None and len(ids) > limits.max_prompt_tokens:
            return _too_many_ids(len(ids), limits)
        if sampling.max_tokens > limits.max_new_tokens:
            return f"sampling.max_tokens is {sampling.max_tokens}, the limit is {limits.max_new_tokens}"
        if len(sampling.stop) > limits.max_stop_sequences:
            return f"sampling.stop has {len(sampling.stop)} items, the limit is {limits.max_stop_sequences}"
    if isinstance(record, TrainingJobRecord):
        for name, data in (("data", record.data), ("eval_data", record.eval_data)):
            if isinstance(data, list):
                problem = _examples_over_limit(name, data, limits)
                if problem:
                    return problem
    return None


def _examples_over_limit(
    name: str, examples: list[TextExample | TokenExample | ChatExample], limits: Limits
) -> str | None:
    if len(examples) > limits.max_inline_examples:
        return f"{name} has {len(examples)} examples, the limit is {limits.max_inline_examples}"
    renders = sum(len(ex.messages) * sum(m.role == "assistant" for m in ex.messages)
                  for ex in examples if isinstance(ex, ChatExample))
    if renders > limits.max_chat_turn_renders:
        return (f"{name}'s chat examples have {renders} (turns x assistant turns) summed, the limit is "
                f"{limits.max_chat_turn_renders}: send fewer or shorter conversations a record")
    for index, ex in enumerate(examples):
        if isinstance(ex, TextExample):
            size, limit, unit = len(ex.prompt) + len(ex.completion), limits.max_example_chars, "chars"
        elif isinstance(ex, ChatExample):
            size, limit, unit = sum(len(m.content) for m in ex.messages), limits.max_example_chars, "chars"
        else:
            size = len(ex.prompt_token_ids) + len(ex.completion_token_ids)
            limit, unit = limits.max_example_tokens, "tokens"
        if size > limit:
            return f"{name}[{index}] has {size} {unit}, the limit is {limit}"
    return None


__all__ = [
    "SCHEMA_VERSION",
    "AnyRecord",
    "ChatExample",
    "ChatMessage",
    "CheckpointResult",
    "ControlAck",
    "ControlAction",
    "ControlCommand",
    "DeadLetter",
    "ErrorResult",
    "RecordRef",
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
    "TrainingJobRecord",
    "TrainingParamsSpec",
    "Usage",
    "decode_record",
    "encode_record",
    "peek_ids",
]
