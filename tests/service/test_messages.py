"""Wire records: msgpack round trips, and one clear RecordError per kind of bad input."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from wire_samples import SAMPLES

from loquetier.messages import (
    GenerateRequest,
    Limits,
    RecordError,
    TopicKind,
    TrainingParamsSpec,
    decode_record,
    encode_record,
    peek_ids,
)


@pytest.mark.parametrize(("kind", "record"), SAMPLES, ids=lambda v: getattr(v, "type", None) or str(v)[:12])
def test_round_trip(kind: TopicKind, record: Any) -> None:
    data = encode_record(record)
    assert isinstance(msgpack.unpackb(data), dict)
    assert decode_record(kind, data) == record


def test_wire_names_and_defaults() -> None:
    raw = msgpack.unpackb(encode_record(GenerateRequest(request_id="r", prompt="p")))
    assert raw["schema"] == 1 and "schema_version" not in raw
    assert raw["sampling"]["max_tokens"] == 128 and raw["stream"] is False
    minimal = msgpack.packb({"schema": 1, "request_id": "r", "prompt": "p"})
    assert decode_record("requests", minimal) == GenerateRequest(request_id="r", prompt="p")
    assert TrainingParamsSpec().epochs == 1  # neither epochs nor max_steps: one epoch


def test_records_are_frozen() -> None:
    record = GenerateRequest(request_id="r", prompt="p")
    with pytest.raises(ValueError):
        record.priority = 5  # type: ignore[misc]


def _pack(**fields: Any) -> bytes:
    return msgpack.packb({"schema": 1, **fields})


REQ = {"request_id": "r9", "prompt": "hi"}
JOB = {"job_id": "j9", "adapter_id": "a"}
BAD: list[tuple[str, TopicKind, bytes, str]] = [
    ("garbage", "requests", b"\xc1\xff\x00garbage", "undecodable"),
    ("truncated", "requests", msgpack.packb({"schema": 1, "request_id": "r9"})[:-2], "undecodable"),
    ("not a map", "requests", msgpack.packb([1, 2, 3]), "not_a_map"),
    ("no schema", "requests", msgpack.packb(REQ), "missing_field"),
    ("schema 2", "requests", msgpack.packb({"schema": 2, **REQ}), "unsupported_schema"),
    ("schema str", "requests", msgpack.packb({"schema": "1", **REQ}), "unsupported_schema"),
    ("missing request_id", "requests", _pack(prompt="hi"), "missing_field"),
    ("request_id int", "requests", _pack(request_id=5, prompt="hi"), "wrong_type"),
    ("prompt list of str", "requests", _pack(request_id="r9", prompt_token_ids=["1"]), "wrong_type"),
    ("priority as str", "requests", _pack(**REQ, priority="1"), "wrong_type"),
    ("stream as int", "requests", _pack(**REQ, stream=1), "wrong_type"),
    ("both prompts", "requests", _pack(**REQ, prompt_token_ids=[1]), "invalid_value"),
    ("neither prompt", "requests", _pack(request_id="r9"), "invalid_value"),
    ("empty prompt ids", "requests", _pack(request_id="r9", prompt_token_ids=[]), "invalid_value"),
    ("negative token", "requests", _pack(request_id="r9", prompt_token_ids=[-1]), "invalid_value"),
    ("max_tokens 0", "requests", _pack(**REQ, sampling={"max_tokens": 0}), "invalid_value"),
    ("max_tokens -3", "requests", _pack(**REQ, sampling={"max_tokens": -3}), "invalid_value"),
    ("top_p 0", "requests", _pack(**REQ, sampling={"top_p": 0.0}), "invalid_value"),
    ("unknown field", "requests", _pack(**REQ, temperature=0.5), "unknown_field"),
    ("unknown nested", "requests", _pack(**REQ, sampling={"beam": 2}), "unknown_field"),
    ("oversized record", "requests", _pack(**{**REQ, "prompt": "x" * 5000}), "too_large"),
    ("long prompt", "requests", _pack(**{**REQ, "prompt": "x" * 300}), "too_large"),
    ("long prompt ids", "requests", _pack(request_id="r9", prompt_token_ids=[1] * 65), "too_large"),
    ("max_tokens over limit", "requests", _pack(**REQ, sampling={"max_tokens": 10_000}), "too_large"),
    ("many stops", "requests", _pack(**REQ, sampling={"stop": ["a"] * 5}), "too_large"),
    ("huge id", "requests", _pack(request_id="r" * 300, prompt="hi"), "invalid_value"),
    ("job no data", "training", _pack(**JOB), "missing_field"),
    ("job empty data", "training", _pack(**JOB, data=[]), "invalid_value"),
    ("job bad example", "training", _pack(**JOB, data=[{"text": "x"}]), "missing_field"),
    ("job example ids", "training", _pack(**JOB, data=[{"prompt_token_ids": [1]}]), "missing_field"),
    ("job bad kind", "training", _pack(**JOB, data="p", kind="rl"), "invalid_value"),
    (
        "job many examples",
        "training",
        _pack(**JOB, data=[{"prompt": "", "completion": "c"}] * 9),
        "too_large",
    ),
    ("job lr 0", "training", _pack(**JOB, data="p", params={"lr": 0.0}), "invalid_value"),
    ("load without path", "control", _pack(action="load", target_id="a"), "invalid_value"),
    ("cancel with path", "control", _pack(action="cancel", target_id="a", path="/x"), "invalid_value"),
    ("unknown action", "control", _pack(action="explode", target_id="a"), "invalid_value"),
    ("pause for one worker", "control", _pack(action="pause", target_id="j1", worker_id="w9"), "invalid_value"),
    ("unknown result type", "results", _pack(type="weird", request_id="r9"), "wrong_type"),
    ("result without type", "results", _pack(request_id="r9"), "wrong_type"),
    ("error without id", "results", _pack(type="error", code="c", message="m"), "invalid_value"),
    (
        "bad sha",
        "results",
        _pack(**JOB, type="checkpoint", step=1, sha256="x", size_bytes=1),
        "invalid_value",
    ),
]
LIMITS = Limits(
    max_record_bytes=4096,
    max_prompt_chars=256,
    max_prompt_tokens=64,
    max_new_tokens=4096,
    max_stop_sequences=4,
    max_inline_examples=8,
)


@pytest.mark.parametrize(("name", "kind", "data", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_record_raises_one_clear_error(name: str, kind: TopicKind, data: bytes, code: str) -> None:
    with pytest.raises(RecordError) as caught:
        decode_record(kind, data, LIMITS)
    err = caught.value
    assert err.code == code, err
    assert err.message and "\n" not in err.message
    assert str(err).startswith(code)


def test_error_carries_ids_of_bad_records() -> None:
    with pytest.raises(RecordError) as caught:
        decode_record("requests", _pack(request_id="r9", prompt="hi", priority="high"))
    assert caught.value.request_id == "r9" and "priority" in caught.value.message
    with pytest.raises(RecordError) as caught:
        decode_record("training", msgpack.packb({"schema": 7, "job_id": "j9"}))
    assert caught.value.job_id == "j9" and caught.value.code == "unsupported_schema"
    assert peek_ids(_pack(request_id="r9", sampling=5)) == ("r9", None)
    assert peek_ids(b"\xc1garbage") == (None, None)
    assert peek_ids(_pack(request_id=["not", "a", "str"])) == (None, None)


def test_limits_validate() -> None:
    with pytest.raises(ValueError):
        Limits(max_record_bytes=0)


def test_a_request_fingerprint_counts_what_changes_the_answer_and_keeps_older_rows_valid() -> None:
    """``ignore_eos`` and ``reply_to`` count only when set, so a row stored before either existed keeps
    its fingerprint; priority and streaming do not count."""
    import hashlib
    import json
    import random

    from loquetier.workers.convert import request_fingerprint

    rng = random.Random()
    sampling = {"max_tokens": rng.randint(1, 500), "temperature": rng.uniform(0, 2), "seed": rng.getrandbits(40)}
    base = {"request_id": f"r-{rng.getrandbits(32):x}", "prompt_token_ids": [rng.randint(3, 300) for _ in range(7)],
            "sampling": sampling}
    req = GenerateRequest.model_validate(base, strict=False)
    old_sampling = {k: v for k, v in req.sampling.model_dump(mode="json").items() if k != "ignore_eos"}
    stored_before = hashlib.sha256(json.dumps(
        {"adapter_id": None, "prompt": None, "prompt_token_ids": req.prompt_token_ids, "messages": None,
         "sampling": old_sampling}, sort_keys=True, ensure_ascii=True).encode()).hexdigest()
    assert request_fingerprint(req) == stored_before
    same = GenerateRequest.model_validate(base | {"priority": 5, "stream": True}, strict=False)
    assert request_fingerprint(same) == stored_before
    for changed in ({"sampling": sampling | {"ignore_eos": True}}, {"reply_to": "loquetier.reply.x"},
                    {"prompt_token_ids": [*base["prompt_token_ids"], 9]}):
        assert request_fingerprint(GenerateRequest.model_validate(base | changed, strict=False)) != stored_before


def test_latency_targets_below_the_workers_floor_are_raised_to_it() -> None:
    """A client's impossible targets (0.001 ms) would count every step a miss and hold every job's
    training at its floor: the worker takes them as its floor; others pass as sent."""
    import random

    from loquetier.workers.convert import request_kwargs

    floor_ttft, floor_tpot = random.uniform(20, 80), random.uniform(5, 20)
    base = {"schema": 1, "request_id": "r", "prompt": "hi"}
    tight = GenerateRequest.model_validate(base | {"slo": {"ttft_ms": 0.001, "tpot_ms": 5e-324}})
    kwargs = request_kwargs(tight, min_ttft_ms=floor_ttft, min_tpot_ms=floor_tpot)
    assert (kwargs["ttft_ms"], kwargs["tpot_ms"]) == (floor_ttft, floor_tpot)
    loose = GenerateRequest.model_validate(base | {"slo": {"ttft_ms": floor_ttft + 1, "tpot_ms": floor_tpot * 3}})
    kwargs = request_kwargs(loose, min_ttft_ms=floor_ttft, min_tpot_ms=floor_tpot)
    assert (kwargs["ttft_ms"], kwargs["tpot_ms"]) == (floor_ttft + 1, floor_tpot * 3)
    none = request_kwargs(GenerateRequest.model_validate(base), min_ttft_ms=floor_ttft, min_tpot_ms=floor_tpot)
    assert none["ttft_ms"] is None and none["tpot_ms"] is None  # the engine's defaults apply
    from loquetier.settings import WorkerSettings

    assert WorkerSettings().min_ttft_ms > 0 and WorkerSettings().min_tpot_ms > 0  # on unless configured off
