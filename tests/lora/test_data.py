"""Training data (tokenization, masking, packing, order, cursor), LR schedules, TrainingParams."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loquetier.lora.data import (
    IGNORE_INDEX,
    DataCursor,
    DataError,
    DataStream,
    make_sequence,
    tokenize_examples,
)
from loquetier.lora.params import TrainingParams
from loquetier.lora.schedule import lr_at


class CharTokenizer:
    """One token per character (ord % 50 + 3), BOS=1, EOS=2."""

    eos_token_id = 2

    def __call__(self, text: str, *, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) % 50 + 3 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_token_examples_used_exactly_and_prompt_masked() -> None:
    [seq] = tokenize_examples([{"prompt_token_ids": [5, 6, 7], "completion_token_ids": [8, 9]}])
    assert seq.token_ids == (5, 6, 7, 8, 9)
    assert seq.labels == (IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9)  # HF style, for add_train
    assert seq.shifted_labels == (IGNORE_INDEX, IGNORE_INDEX, 8, 9, IGNORE_INDEX)  # row i predicts i+1
    assert seq.num_target_tokens == 2


def test_text_examples_get_bos_completion_and_eos() -> None:
    tok = CharTokenizer()
    [seq] = tokenize_examples([{"prompt": "ab", "completion": "c"}], tok)
    a, b, c = (ord(x) % 50 + 3 for x in "abc")
    assert seq.token_ids == (1, a, b, c, 2)
    assert seq.shifted_labels == (IGNORE_INDEX, IGNORE_INDEX, c, 2, IGNORE_INDEX)
    assert seq.num_target_tokens == 2


def test_jsonl_source(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"prompt_token_ids": [1], "completion_token_ids": [2, 3]}, {"prompt": "x", "completion": "y"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    seqs = tokenize_examples(path, CharTokenizer())
    assert len(seqs) == 2 and seqs[0].token_ids == (1, 2, 3)
    path.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        tokenize_examples(path, CharTokenizer())


@pytest.mark.parametrize(
    ("example", "message"),
    [
        ({"prompt": "a"}, "expected keys"),
        ({"prompt": "a", "completion": ""}, "non-empty"),
        ({"prompt": "a", "completion": "b", "prompt_token_ids": [1]}, "expected keys"),
        ({"prompt_token_ids": [1, -2], "completion_token_ids": [3]}, "non-negative"),
        ({"prompt_token_ids": [1], "completion_token_ids": []}, "must not be empty"),
        ({"prompt_token_ids": [1], "completion_token_ids": [99]}, "vocab_size"),
        ({"prompt_token_ids": [], "completion_token_ids": [4]}, "no completion token"),
        ({"prompt_token_ids": [1] * 30, "completion_token_ids": [4]}, "exceed micro_batch_tokens"),
        ("text", "expected a mapping"),
    ],
)
def test_invalid_examples(example: object, message: str) -> None:
    with pytest.raises(DataError, match=f"example 1: .*{message}"):
        tokenize_examples(
            [{"prompt_token_ids": [1], "completion_token_ids": [2]}, example],  # type: ignore[list-item]
            CharTokenizer(),
            vocab_size=64,
            max_tokens=16,
        )
    with pytest.raises(DataError, match="tokenizer"):
        tokenize_examples([{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match="does not exist"):
        tokenize_examples("/nonexistent.jsonl")


def test_a_sequence_longer_than_the_models_context_is_refused() -> None:
    """A training sequence past ``max_len`` (the model's ``max_model_len``) is refused by name, even
    where its micro-batch would hold it; one that fits exactly is taken."""
    fits = {"prompt_token_ids": [1] * 11, "completion_token_ids": [2]}
    assert tokenize_examples([fits], vocab_size=64, max_tokens=64, max_len=12)[0].num_tokens == 12
    longer = {"prompt_token_ids": [1] * 12, "completion_token_ids": [2]}
    with pytest.raises(DataError, match=r"example 1: 13 tokens exceed the model's context of 12 tokens"):
        tokenize_examples([fits, longer], vocab_size=64, max_tokens=64, max_len=12)


def seqs(lengths: list[int]):
    return [make_sequence([1] * (n - 1), [i + 3]) for i, n in enumerate(lengths)]


def test_packing_respects_budget_without_padding_and_covers_each_epoch_once() -> None:
    data = seqs([3, 5, 2, 4, 6, 1, 7])
    stream = DataStream(data, micro_batch_tokens=8, seed=3, num_epochs=2)
    batches = list(stream)
    assert all(0 < b.num_tokens <= 8 for b in batches)
    for epoch in (0, 1):
        got = sorted(s.labels[-1] for b in batches if b.epoch == epoch for s in b.sequences)
        assert got == list(range(3, 10))
    assert [b.index for b in batches] == list(range(len(batches)))
    assert stream.is_exhausted and stream.next() is None
    assert len(batches) == sum(stream.micro_batches_per_epoch(e) for e in (0, 1))


def test_order_is_seeded_per_epoch_and_cursor_resumes() -> None:
    data = seqs([2] * 10)
    a = [b.sequences for b in DataStream(data, micro_batch_tokens=4, seed=1, num_epochs=3)]
    b = [b.sequences for b in DataStream(data, micro_batch_tokens=4, seed=1, num_epochs=3)]
    c = [b.sequences for b in DataStream(data, micro_batch_tokens=4, seed=2, num_epochs=3)]
    assert a == b and a != c
    assert a[:5] != a[5:10]  # epochs are shuffled differently
    stream = DataStream(data, micro_batch_tokens=4, seed=1, num_epochs=3)
    first = [stream.next() for _ in range(7)]
    assert stream.cursor == DataCursor(epoch=1, index=4)
    resumed = DataStream(data, micro_batch_tokens=4, seed=1, num_epochs=3, cursor=stream.cursor)
    assert [m.sequences for m in first] + [m.sequences for m in resumed] == a


def test_schedules() -> None:
    assert lr_at(0, base_lr=1.0, schedule="constant") == 1.0
    assert [lr_at(s, base_lr=1.0, schedule="constant", warmup_steps=3) for s in range(4)] == [
        0.25,
        0.5,
        0.75,
        1.0,
    ]
    lin = [lr_at(s, base_lr=1.0, schedule="linear", warmup_steps=2, total_steps=6) for s in range(6)]
    assert lin == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])
    cos = [lr_at(s, base_lr=2.0, schedule="cosine", total_steps=4) for s in range(5)]
    assert cos == pytest.approx([2.0, 1 + math.cos(math.pi / 4), 1.0, 1 - math.cos(math.pi / 4), 0.0])
    with pytest.raises(ValueError, match="total"):
        lr_at(0, base_lr=1.0, schedule="cosine")
    with pytest.raises(ValueError, match="unknown"):
        lr_at(0, base_lr=1.0, schedule="step")


@pytest.mark.parametrize(
    "bad",
    [
        {"optimizer": "adam"},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"weight_decay": -1.0},
        {"max_grad_norm": 0.0},
        {"epochs": 0},
        {"max_steps": 0},
        {"micro_batch_tokens": 0},
        {"grad_accum": 0},
        {"lr_schedule": "step"},
        {"warmup_steps": -1},
        {"checkpoint_every": -1},
        {"eval_every": -1},
        {"min_share": 1.5},
    ],
)
def test_training_params_validation(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainingParams(**bad)


def test_training_params_length() -> None:
    assert TrainingParams().num_epochs == 1
    assert TrainingParams(max_steps=5).num_epochs is None
    assert TrainingParams(max_grad_norm=None, epochs=2, max_steps=5).num_epochs == 2
