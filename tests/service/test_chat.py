"""Chat: the wire's ``messages``, rendering with the model's chat template, and chat training examples."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from tiny import CHAT_TEMPLATE, CORPUS, make_tokenizer

from loquetier.chat import chat_prompt_ids, chat_segments
from loquetier.engine.errors import EngineError
from loquetier.lora.data import IGNORE_INDEX, DataError, tokenize_examples
from loquetier.messages import ChatExample, GenerateRequest, Limits, RecordError, TrainingJobRecord, decode_record
from workers.convert import job_data, job_from_spec, job_spec

ROLES = ["system", "user", "assistant"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


def _words(rng: random.Random) -> str:
    return " ".join(rng.choice(" ".join(CORPUS).split()) for _ in range(rng.randint(1, 6)))


def _chat(rng: random.Random, num_turns: int) -> list[dict[str, str]]:
    """A system turn, then alternating user/assistant turns, ending with the assistant."""
    turns = [{"role": "system", "content": _words(rng)}]
    for i in range(num_turns):
        turns.append({"role": "user" if i % 2 == 0 else "assistant", "content": _words(rng)})
    if turns[-1]["role"] != "assistant":
        turns.append({"role": "assistant", "content": _words(rng)})
    return turns


def _pack(**fields: Any) -> bytes:
    return msgpack.packb({"schema": 1, **fields})


# --- the wire -------------------------------------------------------------------------------


def test_messages_are_a_third_prompt_form() -> None:
    rng = random.Random()
    turns = _chat(rng, rng.randint(1, 5))[:-1]
    record = decode_record("requests", _pack(request_id="r1", messages=turns))
    assert isinstance(record, GenerateRequest) and record.prompt is None
    assert [m.model_dump() for m in record.messages or []] == turns
    again = decode_record("requests", msgpack.packb(msgpack.unpackb(_encode(record))))
    assert again == record


def _encode(record: Any) -> bytes:
    from loquetier.messages import encode_record

    return encode_record(record)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}, "invalid_value"),
        ({"messages": [{"role": "user", "content": "hi"}], "prompt_token_ids": [1]}, "invalid_value"),
        ({"messages": []}, "invalid_value"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "invalid_value"),
        ({"messages": [{"role": "user"}]}, "missing_field"),
        ({"messages": [{"role": "user", "content": "hi", "name": "x"}]}, "unknown_field"),
        ({"messages": [{"role": "user", "content": 5}]}, "wrong_type"),
        ({"messages": [{"role": "user", "content": "x" * 200}] * 2}, "too_large"),
        ({"messages": [{"role": "user", "content": ""}] * 1025}, "invalid_value"),
    ],
    ids=["with prompt", "with ids", "empty", "bad role", "no content", "extra key", "content int",
         "too many chars", "too many turns"],
)
def test_bad_messages_get_one_clear_error(fields: dict[str, Any], code: str) -> None:
    with pytest.raises(RecordError) as caught:
        decode_record("requests", _pack(request_id="r2", **fields), Limits(max_prompt_chars=300))
    assert caught.value.code == code and caught.value.request_id == "r2"


def test_chat_examples_on_the_training_topic() -> None:
    rng = random.Random()
    rows = [{"messages": _chat(rng, rng.randint(1, 4))} for _ in range(3)]
    job = decode_record("training", _pack(job_id="j1", adapter_id="a", data=rows))
    assert isinstance(job, TrainingJobRecord) and all(isinstance(ex, ChatExample) for ex in job.data)
    assert [ex.model_dump() for ex in job.data] == rows
    for bad in ([{"role": "user", "content": "q"}], [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                      "content": ""}]):
        with pytest.raises(RecordError) as caught:
            decode_record("training", _pack(job_id="j1", adapter_id="a", data=[{"messages": bad}]))
        assert caught.value.code == "invalid_value" and "assistant" in caught.value.message


# --- rendering --------------------------------------------------------------------------------


def test_prompt_ids_are_the_rendered_template(tokenizer: Any) -> None:
    rng = random.Random()
    turns = _chat(rng, rng.randint(1, 6))[:-1]
    text = "".join(f"<s>{m['role']}\n{m['content']}</s>\n" for m in turns) + "<s>assistant\n"
    ids = chat_prompt_ids(tokenizer, turns)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == len(turns) + 1  # the template's own markers, no extra BOS
    developer = [{"role": "developer", "content": turns[0]["content"]}, *turns[1:]]
    assert chat_prompt_ids(tokenizer, developer) == ids  # OpenAI's "developer" is the system turn


def test_no_template_and_refused_turns_are_engine_errors() -> None:
    bare = make_tokenizer(chat_template=None)
    with pytest.raises(EngineError) as caught:
        chat_prompt_ids(bare, [{"role": "user", "content": "hi"}])
    assert caught.value.code == "no_chat_template" and "prompt" in caught.value.message
    with pytest.raises(EngineError) as caught:
        chat_prompt_ids(None, [{"role": "user", "content": "hi"}])
    assert caught.value.code == "no_chat_template"
    strict = make_tokenizer(chat_template="{% if messages[0]['role'] == 'system' %}"
                                          "{{ raise_exception('no system turns') }}{% endif %}" + CHAT_TEMPLATE)
    with pytest.raises(EngineError) as caught:
        chat_prompt_ids(strict, [{"role": "system", "content": "be brief"}])
    assert caught.value.code == "invalid_request" and "no system turns" in caught.value.message


def test_segments_put_loss_on_assistant_turns_only(tokenizer: Any) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    turns = _chat(rng, rng.randint(2, 7))
    segments = chat_segments(tokenizer, turns)
    answers = [m["content"] for m in turns if m["role"] == "assistant"]
    targets = [tokenizer.decode(ids) for ids, is_target in segments if is_target]
    assert targets == [f"{a}</s>\n" for a in answers], seed  # each answer and its closing EOS
    # what precedes the k-th answer is exactly its inference prompt (answers may repeat: found by
    # position, not by text)
    answer_turns = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
    prefix: list[int] = []
    for ids, is_target in segments:
        if is_target:
            index = answer_turns.pop(0)
            assert prefix == chat_prompt_ids(tokenizer, turns[:index]), seed
        prefix += ids
    assert not answer_turns, seed


def test_a_template_that_is_not_incremental_is_refused() -> None:
    rolling = make_tokenizer(chat_template="{{ messages | length }}" + CHAT_TEMPLATE)  # the count leads
    with pytest.raises(EngineError) as caught:
        chat_segments(rolling, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert caught.value.code == "invalid_data"


# --- training data ----------------------------------------------------------------------------


def test_chat_examples_tokenize_with_labels_on_answers(tokenizer: Any, tmp_path: Path) -> None:
    rng = random.Random()
    rows = [{"messages": _chat(rng, rng.randint(1, 5))} for _ in range(4)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for source in (rows, path):
        seqs = tokenize_examples(source, tokenizer)
        for row, seq in zip(rows, seqs, strict=True):
            segments = chat_segments(tokenizer, row["messages"])
            assert list(seq.token_ids) == [t for ids, _ in segments for t in ids]
            learned = [t for t, label in zip(seq.token_ids, seq.labels, strict=True) if label != IGNORE_INDEX]
            assert learned == [t for ids, is_target in segments if is_target for t in ids]
            assert seq.num_target_tokens == len(learned)


def test_assistant_turns_of_weight_0_are_context_not_learned(tokenizer: Any) -> None:
    """OpenAI's chat fine-tuning format: ``weight`` 0 keeps an assistant turn out of the loss, ``name``
    stays out of the template; an uploaded file takes both, as the engine does."""
    from loquetier.training_files import parse_jsonl

    rng = random.Random()
    turns = _chat(rng, rng.randint(3, 6))
    answers = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
    skipped = set(rng.sample(answers[:-1], rng.randint(1, len(answers) - 1)))
    weights = {i: 0 if i in skipped else rng.choice([1, None]) for i in answers}  # None: no weight (learned)
    weighted = [m | ({"weight": weights[i]} if weights.get(i) is not None else {})
                | ({"name": "someone"} if m["role"] == "user" else {}) for i, m in enumerate(turns)]
    seq = tokenize_examples([{"messages": weighted}], tokenizer)[0]
    plain = tokenize_examples([{"messages": turns}], tokenizer)[0]
    assert seq.token_ids == plain.token_ids  # the same conversation: only the loss differs
    learned = tokenizer.decode([t for t, label in zip(seq.token_ids, seq.labels, strict=True)
                                if label != IGNORE_INDEX])
    assert learned == "".join(f"{turns[i]['content']}</s>\n" for i in answers if i not in skipped)
    assert 0 < seq.num_target_tokens < plain.num_target_tokens
    assert parse_jsonl((json.dumps({"messages": weighted}) + "\n").encode())[0]["messages"] == weighted
    # inline on the training topic too: the examples the worker hands the engine are the file's turns
    job = decode_record("training", _pack(job_id="jw", adapter_id="a", data=[{"messages": weighted},
                                                                             {"messages": turns}]))
    assert isinstance(job, TrainingJobRecord)
    assert job_data(job.data) == [{"messages": weighted}, {"messages": turns}]  # no key a turn did not set
    assert job_data(job_from_spec(job_spec(job)).data) == job_data(job.data)  # the stored spec reads the same
    assert tokenize_examples(job_data(job.data)[:1], tokenizer)[0].labels == seq.labels


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": "q"}], "last message"),
        ([{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}], "'role' must be one of"),
        ([{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}], "weight"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}], "weight"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": True}], "weight"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}], "nothing to learn"),
        ([{"role": "user", "content": "q", "name": 7}, {"role": "assistant", "content": "a"}], "'name'"),
        ("hello", "non-empty list"),
        ([{"role": "user", "content": "q", "extra": 1}, {"role": "assistant", "content": "a"}], "messages\\[0\\]"),
    ],
)
def test_bad_chat_examples_name_the_example(tokenizer: Any, messages: Any, match: str) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match=rf"example 1: .*{match}"):
        tokenize_examples([good, {"messages": messages}], tokenizer)
    # inline on the training topic, the same example is refused before any worker takes the job
    with pytest.raises(RecordError) as caught:
        decode_record("training", _pack(job_id="jb", adapter_id="a", data=[good, {"messages": messages}]))
    assert caught.value.code in ("invalid_value", "wrong_type", "unknown_field") and "data" in caught.value.message


@pytest.mark.parametrize("turn", [{"role": "user", "content": "q", "name": None},
                                  {"role": "assistant", "content": "q", "weight": None},
                                  {"role": "system", "content": "q", "weight": 0}])
def test_inline_chat_turns_refuse_null_and_misplaced_fields(turn: dict[str, Any]) -> None:
    data = [{"messages": [turn, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    with pytest.raises(RecordError) as caught:
        decode_record("training", _pack(job_id="jn", adapter_id="a", data=data))
    assert caught.value.code == "invalid_value"


def test_chat_examples_need_a_template() -> None:
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    with pytest.raises(DataError, match="no chat template"):
        tokenize_examples(rows, make_tokenizer(chat_template=None))


def test_chat_data_is_bounded_by_its_template_work(tokenizer: Any, tmp_path: Path) -> None:
    """A data file of long conversations is refused before any is rendered, and a preparation whose
    job went away stops within a few hundred examples instead of rendering to the end."""
    import threading

    from loquetier.engine.jobs import DataPreparer
    from loquetier.lora.data import MAX_CHAT_TURN_RENDERS, DataCancelled

    rng = random.Random()
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"w{rng.randint(0, 99)}"} for i in range(64)]
    wide = tmp_path / "wide.jsonl"  # 64 turns x 32 assistant turns = 2,048 a conversation
    wide.write_text(json.dumps({"messages": turns}) + "\n")
    assert len(tokenize_examples(wide, tokenizer)) == 1
    with pytest.raises(DataError, match=r"2048 \(turns x assistant turns\) summed, the limit is 2047"):
        tokenize_examples(wide, tokenizer, max_chat_renders=2047)
    many = MAX_CHAT_TURN_RENDERS // 2048 + 1
    wide.write_text((json.dumps({"messages": turns}) + "\n") * many)
    started = time.monotonic()
    with pytest.raises(DataError, match=f"{many * 2048} .*, the limit is {MAX_CHAT_TURN_RENDERS}"):
        tokenize_examples(wide, tokenizer)
    assert time.monotonic() - started < 30  # read and counted, not rendered (that would take minutes)

    short = [{"messages": _chat(rng, 2)} for _ in range(2000)]
    stop = threading.Event()
    stop.set()
    with pytest.raises(DataCancelled):
        tokenize_examples(short, tokenizer, stop=stop)
    preparer = DataPreparer(tokenizer, vocab_size=10_000, max_num_batched_tokens=4096)
    with preparer._lock:  # another job's preparation holds the preparer: a stopped one does not wait for it
        with pytest.raises(EngineError) as err:
            preparer.prepare(short, 4096, stop)
    assert err.value.code == "cancelled"
    assert len(preparer.prepare(short[:10], 4096).sequences) == 10  # the lock is free again


@pytest.mark.parametrize(("line", "match"), [
    ('{"prompt": "a\\ud800b", "completion": "c"}', r"line 2: a string holds a lone surrogate \(\\ud800\)"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udfff"}]}',
     r"line 2: a string holds a lone surrogate \(\\udfff\)"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 513}),
     "line 2: 'messages' holds 1026 messages, more than 1024"),
])
def test_an_upload_refuses_what_its_job_would_fail_on_by_line(line: str, match: str) -> None:
    """Lone surrogates (JSON escapes that are not text) and chats past the turn limit are refused with
    the file, by line, not later as a failed job."""
    from loquetier.training_files import TrainingFileError, parse_jsonl

    good = '{"prompt": "a \\u00e9\\ud83d\\ude00 b", "completion": "c"}'  # a surrogate pair is text
    assert parse_jsonl(f"{good}\n".encode())[0]["prompt"] == "a é😀 b"
    with pytest.raises(TrainingFileError, match=match):
        parse_jsonl(f"{good}\n{line}\n".encode())
