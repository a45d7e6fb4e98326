"""HTTP bodies in OpenAI's shapes, validated strictly: a wrong type is a 400 naming the field.

Fields that OpenAI's clients send and that change nothing here (``user``, ``metadata``,
``store``, ...) are accepted and ignored; fields that would change the answer in a way we do
not support (tools, penalties, ``echo``, ``min_p``) are refused with a 400 that says so, never
silently dropped. Any other unknown field is refused too (a misspelt option is an error).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from loquetier.codec import DEFAULT_LIMITS

from .errors import bad_request

IGNORED = frozenset({
    "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "parallel_tool_calls",
    "modalities", "verbosity", "reasoning_effort", "prompt_cache_retention",
})
Name = Annotated[str, Field(min_length=1, max_length=256)]
MAX_STOPS = 16
# Validation errors whose message already names its place (``prompt[1][3] is ...``)
NAMED = frozenset({"invalid_prompt", "invalid_field"})
# A union member's tag in an error's location ('str', 'list[str]', 'constrained-int', "literal['auto']",
# 'function-after[...]'): not a field, left out of the path a 400 names
_UNION_TAG = re.compile(r"(str|int|float|bool|bytes|none|list|dict)|[a-z]+(-[a-z]+)+|[\w-]+\[.*\]", re.DOTALL)


def field_path(loc: tuple[int | str, ...]) -> str:
    """An error's location as the body's field path (``messages.2.content``), union tags left out."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or not _UNION_TAG.fullmatch(p))


def error_text(err: Any) -> str:
    """A validation error's message. A JSON integer too large for 64 bits reaches the models as a
    float (that is how the JSON parser reads it), which pydantic calls "not a valid integer": say
    that the number is too large instead."""
    value = err.get("input")
    if err["type"] == "int_type" and isinstance(value, float) and (not math.isfinite(value) or abs(value) >= 2**63):
        return f"the number {value:g} is out of range: integers here lie between -2**63 and 2**63 - 1"
    return str(err["msg"])


def _check_stop(value: Any) -> Any:
    """``stop``: null, a string, or a list of at most 16 strings; each problem named as it is."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise PydanticCustomError("invalid_field", "stop is {what}: it must be a string, a list of strings or null",
                                  {"what": _json_type(value)})
    if len(value) > MAX_STOPS:
        raise PydanticCustomError("invalid_field", "stop holds {n} strings, more than {limit}",
                                  {"n": len(value), "limit": MAX_STOPS})
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise PydanticCustomError("invalid_field", "stop[{i}] is {what}: stop sequences are strings",
                                      {"i": i, "what": _json_type(item)})
    return value


Stop = Annotated[str | list[str] | None, BeforeValidator(_check_stop)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # asks for padding we never add; harmless


class TextPart(Body):
    type: Literal["text"]
    text: str
    cache_control: Any = None  # a prompt-caching hint some clients attach to parts: nothing to do here


class ChatMessage(Body):
    """One turn. An assistant turn may be a previous answer sent back as the SDK returned it: its
    ``refusal``, ``audio`` and ``annotations`` are accepted and ignored, ``content`` may be null,
    and ``tool_calls`` / ``function_call`` may be null or empty (real ones are refused)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(fail_fast=True)] | None
    name: str | None = None  # accepted, not used by chat templates
    refusal: str | None = None
    audio: Any = None
    annotations: list[Any] | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def check_supported(self, index: int) -> None:
        if self.tool_calls or self.function_call is not None:
            raise bad_request("tool calls are not supported", param=f"messages.{index}.tool_calls",
                              code="unsupported_value")
        if self.content is None and self.role != "assistant":
            raise bad_request(f"messages.{index}.content: only an assistant turn may have no content",
                              param=f"messages.{index}.content")


class RequestOptions(Body):
    """Our own request knobs under the body's ``loquetier`` field (the SDK's ``extra_body``)."""

    priority: Annotated[int, Field(ge=-(2**31), lt=2**31)] = 0
    ttft_ms: Annotated[float, Field(gt=0)] | None = None
    tpot_ms: Annotated[float, Field(gt=0)] | None = None
    top_k: Annotated[int, Field(ge=0)] = 0


MAX_CHOICES = 64  # n x prompts of one call: each is its own request record


class Sampling(Body):
    """What chat and text completions share."""

    model: Name
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    loquetier: RequestOptions | None = None
    # what vLLM's and SGLang's servers take at the top level (``extra_body`` in the SDKs)
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off
    ignore_eos: bool | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None

    def check_supported(self) -> None:
        for name, neutral in (("frequency_penalty", 0), ("presence_penalty", 0), ("min_p", 0),
                              ("repetition_penalty", 1), ("min_tokens", 0)):
            if getattr(self, name) not in (None, neutral):
                raise bad_request(f"{name} is not supported (only {neutral})", param=name, code="unsupported_value")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias", code="unsupported_value")
        if self.skip_special_tokens is False or self.spaces_between_special_tokens is False:
            raise bad_request("special tokens are always left out of the text", param="skip_special_tokens",
                              code="unsupported_value")
        if self.top_k not in (None, -1, 0) and self.loquetier is not None and self.loquetier.top_k not in (
                0, self.top_k):
            raise bad_request("top_k and loquetier.top_k differ: send one", param="top_k")

    def num_choices(self) -> int:
        return self.n or 1

    def sampling_top_k(self) -> int:
        """The top_k to sample with, from either place it may be sent (0: off)."""
        if self.top_k not in (None, -1, 0):
            return self.top_k or 0
        return self.loquetier.top_k if self.loquetier is not None else 0

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(fail_fast=True, min_length=1)]
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for index, message in enumerate(self.messages):
            message.check_supported(index)
        if self.chat_template_kwargs:
            raise bad_request("chat_template_kwargs are not supported: the worker renders turns with the model's "
                              "own template", param="chat_template_kwargs", code="unsupported_value")
        if self.tools or self.functions or self.tool_choice not in (None, "none") or self.function_call is not None:
            raise bad_request("tools and function calling are not supported", param="tools", code="unsupported_value")
        if self.response_format not in (None, {"type": "text"}):
            raise bad_request("only response_format {'type': 'text'} is supported", param="response_format",
                              code="unsupported_value")
        if self.top_logprobs:
            raise bad_request("top_logprobs above 0 is not supported: the worker returns the chosen token's "
                              "log-probability only", param="top_logprobs", code="unsupported_value")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


PROMPT_SHAPES = "a string, a list of token ids, a list of strings or a list of token-id lists"


def _json_type(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _prompt_error(where: str, what: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_prompt", "{where} {what}", {"where": where, "what": what})


def _check_tokens(ids: list[Any], where: str) -> None:
    if not ids:
        raise _prompt_error(where, "is an empty token list")
    if len(ids) > DEFAULT_LIMITS.max_prompt_tokens:
        raise _prompt_error(where, f"holds {len(ids)} token ids, more than {DEFAULT_LIMITS.max_prompt_tokens}")
    for i, t in enumerate(ids):
        if type(t) is not int:  # bool is an int to Python, not to JSON
            raise _prompt_error(f"{where}[{i}]", f"is {_json_type(t)}: token ids are integers")
        if not 0 <= t < 2**31:
            raise _prompt_error(f"{where}[{i}]", f"= {t}: token ids are in [0, 2^31)")


def check_prompt(value: Any) -> str | list[int] | list[str] | list[list[int]]:
    """``prompt`` as OpenAI takes it, every problem named with its position (``prompt[1][3]``)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _prompt_error("prompt", f"is {_json_type(value)}: it must be {PROMPT_SHAPES}")
    if not value:
        raise _prompt_error("prompt", f"is an empty list: it must be {PROMPT_SHAPES}")
    first = value[0]
    if type(first) is int:
        _check_tokens(value, "prompt")
        return value
    if len(value) > MAX_CHOICES:
        raise _prompt_error("prompt", f"holds {len(value)} prompts, more than {MAX_CHOICES} a call")
    if isinstance(first, str):
        for i, p in enumerate(value):
            if not isinstance(p, str):
                raise _prompt_error(f"prompt[{i}]", f"is {_json_type(p)} in a list of strings")
        return value
    if isinstance(first, list):
        for i, p in enumerate(value):
            if not isinstance(p, list):
                raise _prompt_error(f"prompt[{i}]", f"is {_json_type(p)} in a list of token-id lists")
            _check_tokens(p, f"prompt[{i}]")
        return value
    raise _prompt_error("prompt[0]", f"is {_json_type(first)}: prompt must be {PROMPT_SHAPES}")


class CompletionRequest(Sampling):
    """``prompt``: a string, token ids, or a list of either (one completion each, ``n`` times)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=1)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[int] | list[str] | list[list[int]]:
        return check_prompt(value)

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo is not supported", param="echo", code="unsupported_value")
        if self.suffix:
            raise bad_request("suffix is not supported", param="suffix", code="unsupported_value")
        if self.best_of not in (None, 1, self.n):
            raise bad_request("best_of above n is not supported", param="best_of", code="unsupported_value")
        if len(self.prompts()) * self.num_choices() > MAX_CHOICES:
            raise bad_request(f"at most {MAX_CHOICES} completions a call (prompts x n)", param="n")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per entry (a bare string or token list is one prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)


class Hyperparameters(Body):
    n_epochs: Annotated[int, Field(gt=0, le=1000)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(gt=0, le=1024)] | Literal["auto"] = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0.0, le=1000.0)] | Literal["auto"] = "auto"


class LoquetierOptions(Body):
    """Our own knobs under the body's ``loquetier`` field (the SDK's ``extra_body``)."""

    lora: dict[str, Any] | None = None  # TrainingJobRecord.lora: rank, alpha, dropout, target_modules, use_rslora
    params: dict[str, Any] | None = None  # TrainingJobRecord.params: lr, max_steps, micro_batch_tokens, ...
    priority: Annotated[int, Field(ge=-(2**31), lt=2**31)] = 0


class FineTuneRequest(Body):
    model: Name
    training_file: Name
    validation_file: Name | None = None
    suffix: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] | None = None
    hyperparameters: Hyperparameters | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    method: dict[str, Any] | None = None
    integrations: list[Any] | None = None
    loquetier: LoquetierOptions | None = None

    def check_supported(self) -> None:
        if self.method is not None and self.method.get("type", "supervised") != "supervised":
            raise bad_request("only supervised fine-tuning is supported", param="method", code="unsupported_value")
        method = self.method_hyperparameters()
        if method is not None and self.hyperparameters is not None and method != self.hyperparameters:
            raise bad_request("hyperparameters and method.supervised.hyperparameters differ: send one",
                              param="method.supervised.hyperparameters")
        if self.integrations:
            raise bad_request("integrations are not supported", param="integrations", code="unsupported_value")

    def method_hyperparameters(self) -> Hyperparameters | None:
        """``method.supervised.hyperparameters`` (where the SDKs now send them), validated."""
        if self.method is None:
            return None
        unknown = set(self.method) - {"type", "supervised"}
        if unknown:
            raise bad_request(f"method.{sorted(unknown)[0]}: unknown field", param="method",
                              code="unknown_parameter")
        supervised = self.method.get("supervised")
        if supervised is None:
            return None
        if not isinstance(supervised, dict) or set(supervised) - {"hyperparameters"}:
            raise bad_request("method.supervised takes only 'hyperparameters'", param="method.supervised")
        hyper = supervised.get("hyperparameters")
        if hyper is None:
            return None
        try:
            return Hyperparameters.model_validate(hyper)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            param = ".".join(filter(None, ("method.supervised.hyperparameters", field_path(err["loc"]))))
            raise bad_request(f"{param}: {error_text(err)}", param=param) from None

    def all_hyperparameters(self) -> Hyperparameters | None:
        return self.hyperparameters or self.method_hyperparameters()


B = TypeVar("B", bound=Body)


def parse(model: type[B], data: dict[str, Any]) -> B:
    """Validate a JSON body; the first problem becomes a 400 naming its field."""
    fields = {k: v for k, v in data.items() if k not in IGNORED}
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = field_path(err["loc"])
        code = "unknown_parameter" if err["type"] == "extra_forbidden" else "invalid_type" if err["type"].endswith(
            "_type") else "invalid_value"
        message = err["msg"] if err["type"] in NAMED else f"{loc or 'body'}: {error_text(err)}"  # names its place
        raise bad_request(message, param=loc or None, code=code) from None
