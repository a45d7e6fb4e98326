"""HTTP bodies in OpenAI's shapes, validated strictly: a wrong type is a 400 naming the field.

Fields that OpenAI's clients send and that change nothing here (``user``, ``metadata``,
``store``, ...) are accepted and ignored; fields that would change the answer in a way we do
not support (``n > 1``, tools, penalties, ``echo``) are refused with a 400 that says so,
never silently dropped. Any other unknown field is refused too (a misspelt option is an error).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import bad_request

IGNORED = frozenset({
    "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "parallel_tool_calls",
    "modalities", "verbosity", "reasoning_effort", "prompt_cache_retention",
})
Name = Annotated[str, Field(min_length=1, max_length=256)]
Stop = str | Annotated[list[str], Field(fail_fast=True, max_length=16)] | None


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # asks for padding we never add; harmless


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(fail_fast=True)]
    name: str | None = None  # accepted, not used by chat templates

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class RequestOptions(Body):
    """Our own request knobs under the body's ``loquetier`` field (the SDK's ``extra_body``)."""

    priority: Annotated[int, Field(ge=-(2**31), lt=2**31)] = 0
    ttft_ms: Annotated[float, Field(gt=0)] | None = None
    tpot_ms: Annotated[float, Field(gt=0)] | None = None
    top_k: Annotated[int, Field(ge=0)] = 0


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
    n: Annotated[int, Field(ge=1)] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    loquetier: RequestOptions | None = None

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise bad_request("n > 1 is not supported: send one request per completion", param="n",
                              code="unsupported_value")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise bad_request(f"{name} is not supported (only 0)", param=name, code="unsupported_value")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias", code="unsupported_value")

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

    def check_supported(self) -> None:
        super().check_supported()
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


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(fail_fast=True, min_length=1, max_length=1)] | Annotated[
        list[Annotated[int, Field(ge=0, lt=2**31)]], Field(fail_fast=True, min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=1)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo is not supported", param="echo", code="unsupported_value")
        if self.suffix:
            raise bad_request("suffix is not supported", param="suffix", code="unsupported_value")
        if self.best_of not in (None, 1):
            raise bad_request("best_of > 1 is not supported", param="best_of", code="unsupported_value")


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
        if self.integrations:
            raise bad_request("integrations are not supported", param="integrations", code="unsupported_value")


B = TypeVar("B", bound=Body)


def parse(model: type[B], data: dict[str, Any]) -> B:
    """Validate a JSON body; the first problem becomes a 400 naming its field."""
    fields = {k: v for k, v in data.items() if k not in IGNORED}
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("str", "list", "int", "function")))
        code = "unknown_parameter" if err["type"] == "extra_forbidden" else "invalid_type" if err["type"].endswith(
            "_type") else "invalid_value"
        raise bad_request(f"{loc or 'body'}: {err['msg']}", param=loc or None, code=code) from None
