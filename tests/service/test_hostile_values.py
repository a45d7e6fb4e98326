"""Hostile values at the border: every numeric and size field of the wire records is finite and
bounded, and a value outside the documented limits is refused by ``decode_record`` with its code
(docs/wire-format.md, "Limits"), before any worker or engine sees it."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest

from loquetier.codec import check_key
from loquetier.messages import (
    MAX_EPOCHS,
    MAX_LORA_RANK,
    MAX_LR,
    MAX_SLO_MS,
    MAX_STEPS,
    MAX_TOP_K,
    Limits,
    RecordError,
    TopicKind,
    decode_record,
)

INF, NAN = float("inf"), float("nan")
_rng = random.Random()


def _request(**fields: Any) -> bytes:
    return msgpack.packb({"schema": 1, "request_id": f"r{_rng.randrange(10**6)}", "prompt": "hi", **fields})


def _sampling(**fields: Any) -> bytes:
    return _request(sampling=fields)


def _slo(**fields: Any) -> bytes:
    return _request(slo=fields)


def _job(**fields: Any) -> bytes:
    record = {"schema": 1, "job_id": f"j{_rng.randrange(10**6)}", "adapter_id": "a",
              "data": [{"prompt": "p", "completion": "c"}], **fields}
    return msgpack.packb(record)


def _params(**fields: Any) -> bytes:
    return _job(params=fields)


def _lora(**fields: Any) -> bytes:
    return _job(lora=fields)


def _load(source: Any) -> bytes:
    return msgpack.packb({"schema": 1, "action": "load", "target_id": "a", "source": source})


HOSTILE: list[tuple[str, TopicKind, bytes, str]] = [
    # latency targets
    ("ttft inf", "requests", _slo(ttft_ms=INF), "invalid_value"),
    ("ttft nan", "requests", _slo(ttft_ms=NAN), "invalid_value"),
    ("tpot inf", "requests", _slo(tpot_ms=INF), "invalid_value"),
    ("tpot -inf", "requests", _slo(tpot_ms=-INF), "invalid_value"),
    ("tpot over an hour", "requests", _slo(tpot_ms=MAX_SLO_MS + 1), "invalid_value"),
    ("tpot 1e308", "requests", _slo(tpot_ms=1e308), "invalid_value"),
    # sampling
    ("temperature inf", "requests", _sampling(temperature=INF), "invalid_value"),
    ("temperature nan", "requests", _sampling(temperature=NAN), "invalid_value"),
    ("temperature 1e30", "requests", _sampling(temperature=1e30), "invalid_value"),
    ("temperature negative", "requests", _sampling(temperature=-0.5), "invalid_value"),
    ("top_p nan", "requests", _sampling(top_p=NAN), "invalid_value"),
    ("top_p 1.5", "requests", _sampling(top_p=1.5), "invalid_value"),
    ("top_k 2**64-1", "requests", _sampling(top_k=2**64 - 1), "invalid_value"),
    ("top_k 2**31", "requests", _sampling(top_k=MAX_TOP_K + 1), "invalid_value"),
    ("top_k -1", "requests", _sampling(top_k=-1), "invalid_value"),
    ("seed 2**64-1", "requests", _sampling(seed=2**64 - 1), "invalid_value"),
    ("seed 2**63", "requests", _sampling(seed=2**63), "invalid_value"),
    ("stop empty string", "requests", _sampling(stop=[""]), "invalid_value"),
    ("stop one empty among others", "requests", _sampling(stop=["\n", ""]), "invalid_value"),
    ("stop string too long", "requests", _sampling(stop=["x" * 257]), "invalid_value"),
    ("too many stops", "requests", _sampling(stop=[str(i) for i in range(17)]), "too_large"),
    ("logprobs 21", "requests", _sampling(logprobs=21), "invalid_value"),
    ("max_tokens 2**63-1", "requests", _sampling(max_tokens=2**63 - 1), "too_large"),
    ("priority 2**31", "requests", _request(priority=2**31), "invalid_value"),
    ("priority -2**31-1", "requests", _request(priority=-(2**31) - 1), "invalid_value"),
    # training parameters
    ("lr inf", "training", _params(lr=INF), "invalid_value"),
    ("lr nan", "training", _params(lr=NAN), "invalid_value"),
    ("lr 1e300", "training", _params(lr=1e300), "invalid_value"),
    ("lr over the max", "training", _params(lr=MAX_LR * 1.01), "invalid_value"),
    ("lr negative", "training", _params(lr=-1e-4), "invalid_value"),
    ("weight_decay inf", "training", _params(weight_decay=INF), "invalid_value"),
    ("weight_decay 1e9", "training", _params(weight_decay=1e9), "invalid_value"),
    ("max_grad_norm nan", "training", _params(max_grad_norm=NAN), "invalid_value"),
    ("max_grad_norm 1e30", "training", _params(max_grad_norm=1e30), "invalid_value"),
    ("epochs 10**12", "training", _params(epochs=10**12), "invalid_value"),
    ("epochs over the max", "training", _params(epochs=MAX_EPOCHS + 1), "invalid_value"),
    ("max_steps 10**12", "training", _params(max_steps=10**12), "invalid_value"),
    ("max_steps over the max", "training", _params(max_steps=MAX_STEPS + 1), "invalid_value"),
    ("warmup_steps 2**62", "training", _params(warmup_steps=2**62), "invalid_value"),
    ("checkpoint_every 2**62", "training", _params(checkpoint_every=2**62), "invalid_value"),
    ("eval_every 2**62", "training", _params(eval_every=2**62), "invalid_value"),
    ("micro_batch_tokens 2**40", "training", _params(micro_batch_tokens=2**40), "invalid_value"),
    ("grad_accum 10**6", "training", _params(grad_accum=10**6), "invalid_value"),
    ("training seed 2**64-1", "training", _params(seed=2**64 - 1), "invalid_value"),
    ("job priority 2**31", "training", _job(priority=2**31), "invalid_value"),
    # LoRA
    ("rank 20000", "training", _lora(rank=20_000), "invalid_value"),
    ("rank over the max", "training", _lora(rank=MAX_LORA_RANK + 1), "invalid_value"),
    ("rank 0", "training", _lora(rank=0), "invalid_value"),
    ("alpha 1e30", "training", _lora(alpha=1e30), "invalid_value"),
    ("alpha inf", "training", _lora(alpha=INF), "invalid_value"),
    ("alpha nan", "training", _lora(alpha=NAN), "invalid_value"),
    ("dropout nan", "training", _lora(dropout=NAN), "invalid_value"),
    ("dropout 1", "training", _lora(dropout=1.0), "invalid_value"),
    ("many target modules", "training", _lora(target_modules=[f"m{i}" for i in range(17)]), "invalid_value"),
    ("long module name", "training", _lora(target_modules=["q" * 65]), "invalid_value"),
    ("data path of 5000 chars", "training", _job(data="/d" * 2500), "invalid_value"),
    # control
    ("source unknown", "control", _load("dbx"), "invalid_value"),
    ("source empty job", "control", _load("job:"), "invalid_value"),
    ("source a file", "control", _load("file:///etc/passwd"), "invalid_value"),
    ("source empty", "control", _load(""), "invalid_value"),
    ("source not a str", "control", _load(3), "wrong_type"),
]


@pytest.mark.parametrize(("name", "kind", "data", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_value_is_refused_with_its_code(name: str, kind: TopicKind, data: bytes, code: str) -> None:
    with pytest.raises(RecordError) as caught:
        decode_record(kind, data)
    err = caught.value
    assert err.code == code, err
    # the record's id is read back, so the worker can answer its sender
    assert (err.request_id if kind == "requests" else err.job_id if kind == "training" else "ok") is not None
    assert "\n" not in err.message and "Traceback" not in err.message


EDGES_ACCEPTED: list[tuple[str, TopicKind, bytes]] = [
    ("tpot exactly an hour", "requests", _slo(tpot_ms=MAX_SLO_MS, ttft_ms=0.001)),
    ("top_k at the max", "requests", _sampling(top_k=MAX_TOP_K)),
    ("seed int64 extremes", "requests", _sampling(seed=-(2**63))),
    ("temperature 0", "requests", _sampling(temperature=0, stop=["x" * 256])),
    ("lr at the max", "training", _params(lr=MAX_LR, epochs=MAX_EPOCHS, seed=2**63 - 1)),
    ("rank and alpha at the max", "training", _lora(rank=MAX_LORA_RANK, alpha=1000.0)),
    ("source db", "control", _load("db")),
    ("source a job", "control", _load("job:j-1")),
]


@pytest.mark.parametrize(("name", "kind", "data"), EDGES_ACCEPTED, ids=[e[0] for e in EDGES_ACCEPTED])
def test_values_at_the_limits_are_accepted(name: str, kind: TopicKind, data: bytes) -> None:
    decode_record(kind, data)


SMALL = Limits(max_inline_examples=4, max_example_chars=50, max_example_tokens=20, max_key_bytes=64)


def _text(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"p{i}", "completion": f"c{_rng.randrange(100)}"} for i in range(n)]


SIZES: list[tuple[str, bytes]] = [
    ("too many inline examples", _job(data=_text(5))),
    ("too many eval examples", _job(eval_data=_text(5))),
    ("a text example too long", _job(data=[{"prompt": "p" * 30, "completion": "c" * 21}])),
    ("a token example too long", _job(data=[{"prompt_token_ids": [1] * 15, "completion_token_ids": [2] * 6}])),
]


@pytest.mark.parametrize(("name", "data"), SIZES, ids=[s[0] for s in SIZES])
def test_inline_data_sizes_are_bounded(name: str, data: bytes) -> None:
    with pytest.raises(RecordError) as caught:
        decode_record("training", data, SMALL)
    assert caught.value.code == "too_large" and caught.value.job_id is not None
    assert "limit" in caught.value.message


def test_data_at_the_size_limits_is_accepted() -> None:
    examples = [{"prompt": "p" * 25, "completion": "c" * 25}, {"prompt_token_ids": [1] * 10,
                                                                "completion_token_ids": [2] * 10}]
    decode_record("training", _job(data=[*examples, *_text(2)]), SMALL)


def test_record_keys_are_bounded() -> None:
    check_key(None, SMALL)
    check_key(b"k" * 64, SMALL)
    with pytest.raises(RecordError) as caught:
        check_key(b"k" * 65, SMALL)
    assert caught.value.code == "too_large"


def _many_errors(kind: TopicKind) -> bytes:
    """A record within the size limit that would hold millions of validation errors."""
    n = _rng.randrange(900_000, 1_000_000)
    if kind == "training":  # maps within max_containers (past it the record is too_large unbuilt)
        n = _rng.randrange(400_000, Limits().max_containers * 98 // 100)
        examples = [{"messages": [{}] * 1024}] * (n // 1024)  # two missing fields a message
        return msgpack.packb({"schema": 1, "job_id": "j", "adapter_id": "a", "data": examples})
    # token ids within the count limit (past it the record is too_large before any id is validated)
    return _request(prompt=None, prompt_token_ids=[-1] * Limits().max_prompt_tokens, sampling={"stop": [""] * n})


@pytest.mark.parametrize("kind", ["requests", "training"])
def test_a_record_of_millions_of_bad_values_is_refused_at_once(kind: TopicKind) -> None:
    """Each list stops at its first bad item (pydantic's FailFast): one record costs a handful of
    errors to report, not one an item (seconds and gigabytes on the event loop before)."""
    import time

    data = _many_errors(kind)
    assert len(data) <= Limits().max_record_bytes
    t = time.perf_counter()
    with pytest.raises(RecordError) as err:
        decode_record(kind, data)
    assert time.perf_counter() - t < 2.0  # a generous bound: about 0.1 s here, 10 s and more before
    assert err.value.code in {"missing_field", "invalid_value"}
    assert "more" not in err.value.message or int(err.value.message.split("... and ")[1].split()[0]) < 10


def test_too_many_token_ids_are_refused_before_any_is_validated() -> None:
    import time

    n = _rng.randrange(Limits().max_prompt_tokens + 1, 1_000_000)
    data = _request(prompt=None, prompt_token_ids=[-1] * n)
    t = time.perf_counter()
    with pytest.raises(RecordError) as err:
        decode_record("requests", data)
    assert time.perf_counter() - t < 0.5  # 25 ms here for 1M ids; 158 ms when each was validated first
    assert err.value.code == "too_large" and f"has {n} tokens" in err.value.message and err.value.request_id


@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_map_with_more_keys_than_any_record_has_is_too_large(where: str) -> None:
    wide = {f"k{i}": i for i in range(Limits().max_map_keys + 1 + _rng.randrange(100_000))}
    record = {"schema": 1, "request_id": "r1", "prompt": "hi", **(wide if where == "top" else {"sampling": wide})}
    with pytest.raises(RecordError) as err:
        decode_record("requests", msgpack.packb(record))
    assert err.value.code == "too_large" and "keys" in err.value.message
    assert err.value.request_id == "r1"  # so that the client hears why
    narrow = {"schema": 1, "request_id": "r2", "prompt": "hi", "sampling": {"temperature": 0.5}}
    assert decode_record("requests", msgpack.packb(narrow)).sampling.temperature == 0.5


@pytest.mark.parametrize("kind", ["maps", "lists", "mixed"])
def test_a_record_of_millions_of_empty_containers_is_refused_before_it_is_built(kind: str) -> None:
    """One-byte empty maps and lists: a 4 MiB record holds millions, each an object to build and to
    walk (seconds of the worker's event loop each). The decoder stops at ``max_containers`` and the
    refusal still names the request, read from the top map without decoding the rest."""
    import time

    n = Limits().max_containers + 1 + _rng.randrange(Limits().max_list_items - Limits().max_containers - 10)
    empty = {"maps": [{}], "lists": [[]], "mixed": [{}, []]}[kind]
    rid = f"wide-{_rng.randrange(10**6)}"
    record = {"schema": 1, "prompt": "hi", "sampling": {"a": empty * (n // len(empty) + 1)}, "request_id": rid}
    data = msgpack.packb(record)
    assert len(data) <= Limits().max_record_bytes
    t = time.perf_counter()
    with pytest.raises(RecordError) as err:
        decode_record("requests", data)
    assert time.perf_counter() - t < 3  # 0.15 s here; building and walking them took over 5 s
    assert err.value.code == "too_large" and "maps and lists" in err.value.message and err.value.request_id == rid
    nested = {"schema": 1, "request_id": rid, "prompt": "hi", "sampling": {"temperature": 0.5},
              "slo": {"ttft_ms": 100.0}}
    assert decode_record("requests", msgpack.packb(nested)).slo is not None


def test_a_record_nested_past_the_decoder_stack_says_so() -> None:
    data = b"\x81\xa1a" + b"\x91" * _rng.randrange(100_000, 300_000) + b"\x80"
    with pytest.raises(RecordError) as err:
        decode_record("requests", data)
    assert err.value.code == "undecodable" and not err.value.message.endswith(": ")


def test_chat_examples_are_bounded_by_their_template_work() -> None:
    """Locating each assistant turn renders the conversation up to it: a record of long conversations
    of many assistant turns (minutes of template work, holding the data preparation) is too_large;
    ordinary chat data at the same size passes."""
    turns = _rng.randrange(900, 1024)
    long_chat = {"messages": [{"role": "assistant", "content": "a"}] * turns}
    n = 1_000_000 // (turns * turns) + 1 + _rng.randrange(50)
    job = {"schema": 1, "job_id": "j", "adapter_id": "a", "data": [long_chat] * n}
    with pytest.raises(RecordError) as err:
        decode_record("training", msgpack.packb(job))
    assert err.value.code == "too_large" and "assistant turns" in err.value.message and err.value.job_id == "j"
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 5}
    ok = decode_record("training", msgpack.packb(job | {"data": [chat] * 10_000}))  # 10 x 5 a conversation
    assert len(ok.data) == 10_000


@pytest.mark.parametrize(("data", "field"), [
    ([{"prompt": "a\x00b", "completion": "c"}], "data.inline.0.text.prompt"),
    ([{"prompt": "q", "completion": "ok"}, {"messages": [{"role": "user", "content": "x"},
                                                       {"role": "assistant", "content": "y\x00"}]}],
     "data.inline.1.chat.messages.1.content"),
    ("examples/train\x00.jsonl", "data.path"),
])
def test_a_nul_in_stored_training_text_is_refused_by_its_field(data: Any, field: str) -> None:
    """A job's record is stored in PostgreSQL, whose text holds no NUL: refused at the border with
    the field that holds it, not by the database with a message that names none."""
    job = {"schema": 1, "job_id": f"j{_rng.randrange(10**6)}", "adapter_id": "a", "data": data}
    with pytest.raises(RecordError) as err:
        decode_record("training", msgpack.packb(job))
    assert err.value.code == "invalid_value" and err.value.message.startswith(field) and "NUL" in err.value.message
    assert err.value.job_id == job["job_id"]
