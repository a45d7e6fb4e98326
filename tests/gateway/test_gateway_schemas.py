"""The completion body's ``prompt`` union: each wrong shape is a 400 that names where it is wrong."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from loquetier.codec import DEFAULT_LIMITS
from loquetier.gateway import completions, fine_tuning
from loquetier.gateway.errors import APIError
from loquetier.gateway.schemas import MAX_CHOICES, ChatRequest, CompletionRequest, FineTuneRequest, parse


def _refusal(prompt: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(CompletionRequest, {"model": "m", "prompt": prompt})
    assert caught.value.status == 400 and caught.value.param == "prompt" and caught.value.code == "invalid_value"
    return caught.value


@pytest.mark.parametrize(("prompt", "message"), [
    (42, "prompt is an integer: it must be a string, a list of token ids"),
    (None, "prompt is null: it must be"),
    ({"text": "hi"}, "prompt is an object: it must be"),
    ([], "prompt is an empty list"),
    ([1.5], "prompt[0] is a number: prompt must be"),
    ([True, 1], "prompt[0] is a boolean: prompt must be"),
    ([5, "x"], "prompt[1] is a string: token ids are integers"),
    ([7, -1], "prompt[1] = -1: token ids are in [0, 2^31)"),
    ([2**40], f"prompt[0] = {2**40}: token ids are in [0, 2^31)"),
    (["a", 3], "prompt[1] is an integer in a list of strings"),
    ([[1, 2], "a"], "prompt[1] is a string in a list of token-id lists"),
    ([[1, 2], [3, 1.5]], "prompt[1][1] is a number: token ids are integers"),
    ([[1], []], "prompt[1] is an empty token list"),
    ([["a"]], "prompt[0][0] is a string: token ids are integers"),
    (["x"] * (MAX_CHOICES + 1), f"prompt holds {MAX_CHOICES + 1} prompts, more than {MAX_CHOICES} a call"),
    ([1] * (DEFAULT_LIMITS.max_prompt_tokens + 1), "prompt holds"),
])
def test_each_wrong_prompt_is_named_where_it_is_wrong(prompt: Any, message: str) -> None:
    assert _refusal(prompt).message.startswith(message)


def test_every_prompt_shape_openai_takes_is_accepted() -> None:
    ids = [random.randrange(2**31) for _ in range(random.randint(1, 40))]
    more = [[random.randrange(50_000) for _ in range(random.randint(1, 9))] for _ in range(3)]
    cases: list[tuple[Any, list[Any]]] = [
        ("hello", ["hello"]), ("", [""]), (ids, [ids]), (["a b", "c"], ["a b", "c"]), (more, more),
    ]
    for prompt, prompts in cases:
        assert parse(CompletionRequest, {"model": "m", "prompt": prompt}).prompts() == prompts


@pytest.mark.parametrize(("stop", "message"), [
    (["s"] * 17, "stop holds 17 strings, more than 16"),
    (["a", 3], "stop[1] is an integer: stop sequences are strings"),
    ({"s": 1}, "stop is an object: it must be a string, a list of strings or null"),
])
def test_each_wrong_stop_is_named_as_it_is(stop: Any, message: str) -> None:
    with pytest.raises(APIError) as caught:
        parse(CompletionRequest, {"model": "m", "prompt": "p", "stop": stop})
    assert caught.value.status == 400 and caught.value.param == "stop" and caught.value.message == message
    assert parse(CompletionRequest, {"model": "m", "prompt": "p", "stop": ["s"] * 16}).stops() == ["s"] * 16


@pytest.mark.parametrize(("body", "param"), [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"learning_rate_multiplier": -1.0}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
     "method.supervised.hyperparameters.n_epochs"),
])
def test_a_bad_hyperparameter_names_its_field_alone(body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as caught:
        request = parse(FineTuneRequest, {"model": "m", "training_file": "file-1", **body})
        request.all_hyperparameters()
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.message.startswith(f"{param}: ") and "constrained" not in caught.value.message


@pytest.mark.parametrize(("body", "param"), [
    ({"top_k": 2**31 + random.randrange(2**20)}, "top_k"),
    ({"loquetier": {"top_k": 2**31 + random.randrange(2**20)}}, "loquetier.top_k"),
])
def test_a_value_the_request_record_refuses_names_the_body_field(body: dict[str, Any], param: str) -> None:
    """Values that pass the body's own checks and fail the request record's are named as the client
    sent them, not by the record's layout (``sampling.top_k``)."""
    request = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body})
    gw: Any = SimpleNamespace(bus=SimpleNamespace(topic="replies"), config=SimpleNamespace(max_priority=0))
    with pytest.raises(APIError) as caught:
        completions._record("r1", gw, request, None, {"messages": [{"role": "user", "content": "hi"}]},
                            completions._sampling(request, 16, None))
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.message.startswith(f"{param}: ")


@pytest.mark.parametrize(("body", "param"), [
    ({"hyperparameters": {"learning_rate_multiplier": 1e-320}}, "hyperparameters.learning_rate_multiplier"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 1e-320}}}},
     "method.supervised.hyperparameters.learning_rate_multiplier"),
    ({"loquetier": {"params": {"lr": -1.0}}}, "loquetier.params.lr"),
    ({"loquetier": {"params": {"max_steps": 0}}}, "loquetier.params.max_steps"),
    ({"loquetier": {"lora": {"rank": 0}}}, "loquetier.lora.rank"),
])
def test_a_value_the_job_record_refuses_names_the_body_field(body: dict[str, Any], param: str) -> None:
    """A multiplier so small that the learning rate it makes is 0 is the multiplier's fault, not the
    record's ``params.lr``; our own knobs are named under ``loquetier``."""
    request = parse(FineTuneRequest, {"model": "m", "training_file": "file-1", **body})
    request.check_supported()
    with pytest.raises(APIError) as caught:
        fine_tuning.job_record(request, None, [{"prompt": "a", "completion": "b"}], None)
    assert caught.value.status == 400 and caught.value.param == param, caught.value.message
    assert caught.value.message.startswith(f"{param}: ")


def test_hyperparameters_that_are_not_an_object_name_the_field_without_a_trailing_dot() -> None:
    request = parse(FineTuneRequest, {"model": "m", "training_file": "file-1",
                                      "method": {"type": "supervised", "supervised": {"hyperparameters": [1]}}})
    with pytest.raises(APIError) as caught:
        request.all_hyperparameters()
    assert caught.value.param == "method.supervised.hyperparameters"
    assert caught.value.message.startswith("method.supervised.hyperparameters: ")


@pytest.mark.parametrize(("model", "raw", "param"), [
    (ChatRequest, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}', "max_tokens"),
    (CompletionRequest, b'{"model": "m", "prompt": "p", "seed": %s}', "seed"),
    (FineTuneRequest, b'{"model": "m", "training_file": "f", "hyperparameters": {"n_epochs": %s}}',
     "hyperparameters.n_epochs"),
    (FineTuneRequest, b'{"model": "m", "training_file": "f", "method": {"type": "supervised", "supervised": '
                      b'{"hyperparameters": {"batch_size": %s}}}}', "method.supervised.hyperparameters.batch_size"),
])
def test_an_integer_beyond_64_bits_is_called_out_of_range(model: Any, raw: bytes, param: str) -> None:
    """The JSON parser reads such an integer as a float: the 400 says the number is out of range,
    not that it is no integer."""
    digits = random.randint(20, 40)
    number = random.choice(["", "-"]) + str(random.randint(10 ** (digits - 1), 10**digits - 1))
    with pytest.raises(APIError) as caught:
        parse(model, orjson.loads(raw % number.encode())).all_hyperparameters()  # type: ignore[attr-defined]
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.message.startswith(f"{param}: the number ") and "out of range" in caught.value.message
    small = raw % str(random.randint(1, 8)).encode()
    assert parse(model, orjson.loads(small)) is not None
