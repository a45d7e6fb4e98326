"""Training data: examples -> token ids + shifted labels -> packed micro-batches, in a seeded order.

An example is ``{"prompt", "completion"}`` text (prompt tokens, completion tokens, then EOS) or
``{"prompt_token_ids", "completion_token_ids"}`` (used exactly as given). Labels follow HF's
``labels=`` convention (what ``BatchBuilder.add_train`` takes): ``labels[i] = token_ids[i]`` for
completion tokens, ``IGNORE_INDEX`` for prompt tokens; :attr:`TrainSequence.shifted_labels` is the
per-row target (row ``i`` predicts ``labels[i + 1]``), so loss is only on completion tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

IGNORE_INDEX = -100
DataSource = Sequence[Mapping[str, Any]] | str | Path


class DataError(ValueError):
    """Unusable training data, with the example (or JSONL line) at fault."""


class Tokenizer(Protocol):
    eos_token_id: int | None

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...


@dataclass(frozen=True)
class TrainSequence:
    """One sequence: ``token_ids`` [n] and HF-style ``labels`` [n] (IGNORE_INDEX = prompt, no loss)."""

    token_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def shifted_labels(self) -> tuple[int, ...]:
        """Row ``i``'s next-token target: ``labels[i + 1]`` (the last row has none)."""
        return (*self.labels[1:], IGNORE_INDEX)

    @property
    def num_target_tokens(self) -> int:
        """Completion tokens that have a token before them (the loss denominator's share)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def make_sequence(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> TrainSequence:
    ids = tuple(int(t) for t in prompt_ids) + tuple(int(t) for t in completion_ids)
    start = len(prompt_ids)  # first completion position
    labels = tuple(t if i >= start else IGNORE_INDEX for i, t in enumerate(ids))
    return TrainSequence(ids, labels)


def read_examples(source: DataSource) -> list[Mapping[str, Any]]:
    """Inline list of example mappings, or a JSONL file path (one JSON object a line)."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        examples: list[Mapping[str, Any]] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from exc
            if not isinstance(value, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
            examples.append(value)
        return examples
    return list(source)


def tokenize_examples(source: DataSource, tokenizer: Tokenizer | None = None, *,
                      vocab_size: int | None = None, max_tokens: int | None = None,
                      add_special_tokens: bool = True) -> list[TrainSequence]:
    """Validate and tokenize every example; errors name the example index.

    Text examples need ``tokenizer`` (with an EOS token); the prompt is tokenized with
    ``add_special_tokens`` (BOS, as an inference prompt would be), the completion without.
    """
    examples = read_examples(source)
    if not examples:
        raise DataError("no examples")
    out = []
    for index, example in enumerate(examples):
        try:
            seq = _tokenize_one(example, tokenizer, add_special_tokens)
            if vocab_size is not None and any(t >= vocab_size for t in seq.token_ids):
                raise DataError(f"token id >= the model's vocab_size {vocab_size}")
            if max_tokens is not None and seq.num_tokens > max_tokens:
                raise DataError(f"{seq.num_tokens} tokens exceed micro_batch_tokens={max_tokens}")
            if seq.num_target_tokens == 0:
                raise DataError("no completion token to learn (a completion needs a token before it)")
        except DataError as exc:
            raise DataError(f"example {index}: {exc}") from None
        out.append(seq)
    return out


def _tokenize_one(example: Mapping[str, Any], tokenizer: Tokenizer | None, special: bool) -> TrainSequence:
    if not isinstance(example, Mapping):
        raise DataError(f"expected a mapping, got {type(example).__name__}")
    keys = set(example)
    if keys == {"prompt", "completion"}:
        prompt, completion = example["prompt"], example["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise DataError("prompt must be a string and completion a non-empty string")
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise DataError("text examples need a tokenizer with an EOS token")
        prompt_ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"]) if prompt else []
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        return make_sequence(prompt_ids, [*completion_ids, tokenizer.eos_token_id])
    if keys == {"prompt_token_ids", "completion_token_ids"}:
        prompt_ids, completion_ids = example["prompt_token_ids"], example["completion_token_ids"]
        for name, ids in (("prompt_token_ids", prompt_ids), ("completion_token_ids", completion_ids)):
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                    and t >= 0 for t in ids):
                raise DataError(f"{name} must be a list of non-negative integers")
        if not completion_ids:
            raise DataError("completion_token_ids must not be empty")
        return make_sequence(prompt_ids, completion_ids)
    raise DataError(f"expected keys {{prompt, completion}} or {{prompt_token_ids, completion_token_ids}}, "
                    f"got {sorted(keys)}")


@dataclass(frozen=True)
class DataCursor:
    """Position of the next example: ``index`` into epoch ``epoch``'s shuffled order."""

    epoch: int = 0
    index: int = 0


@dataclass(frozen=True)
class MicroBatch:
    """Whole sequences packed up to ``micro_batch_tokens`` (no padding).

    ``num_target_tokens`` (completion tokens) is the loss denominator: the job's loss for this
    micro-batch is ``sum(token losses) / num_target_tokens``, however many steps run its sequences.
    """

    sequences: tuple[TrainSequence, ...]
    epoch: int
    index: int  # global micro-batch number within the job

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)

    @property
    def num_target_tokens(self) -> int:
        return sum(s.num_target_tokens for s in self.sequences)


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The example order of ``epoch``: a permutation drawn from ``(seed, epoch)`` only."""
    if not shuffle:
        return list(range(num_examples))
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))
    return torch.randperm(num_examples, generator=gen).tolist()


def pack(lengths: Sequence[int], order: Sequence[int], start: int, budget: int) -> int:
    """End (exclusive) in ``order`` of the micro-batch starting at ``start``: greedy, in order."""
    end, used = start, 0
    while end < len(order) and used + lengths[order[end]] <= budget:
        used += lengths[order[end]]
        end += 1
    if end == start:
        raise DataError(f"sequence of {lengths[order[start]]} tokens exceeds micro_batch_tokens={budget}")
    return end


class DataStream:
    """Seeded, resumable micro-batch stream over ``num_epochs`` epochs (None = endless).

    Micro-batches never straddle epochs. The state is just :attr:`cursor`, so a checkpoint
    stores it and a fresh stream with the same examples, seed and budget continues exactly.
    """

    def __init__(self, sequences: Sequence[TrainSequence], *, micro_batch_tokens: int, seed: int,
                 num_epochs: int | None = 1, shuffle: bool = True, cursor: DataCursor | None = None) -> None:
        if not sequences:
            raise DataError("no examples")
        self.sequences = list(sequences)
        self.micro_batch_tokens, self.seed, self.shuffle = micro_batch_tokens, seed, shuffle
        self.num_epochs = num_epochs
        self.cursor = cursor or DataCursor()
        self._lengths = [s.num_tokens for s in self.sequences]
        self._order_epoch, self._order = -1, list[int]()
        self.num_micro_batches = 0  # produced so far (restored by the job)

    def order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            self._order = epoch_order(len(self.sequences), self.seed, epoch, self.shuffle)
            self._order_epoch = epoch
        return self._order

    @property
    def is_exhausted(self) -> bool:
        return self.num_epochs is not None and self.cursor.epoch >= self.num_epochs

    def next(self) -> MicroBatch | None:
        if self.is_exhausted:
            return None
        epoch, start = self.cursor.epoch, self.cursor.index
        order = self.order(epoch)
        end = pack(self._lengths, order, start, self.micro_batch_tokens)
        batch = MicroBatch(tuple(self.sequences[i] for i in order[start:end]), epoch, self.num_micro_batches)
        self.cursor = DataCursor(epoch + 1, 0) if end == len(order) else DataCursor(epoch, end)
        self.num_micro_batches += 1
        return batch

    def peek_num_tokens(self) -> int:
        """Tokens of the micro-batch :meth:`next` would return (0 when exhausted)."""
        if self.is_exhausted:
            return 0
        order = self.order(self.cursor.epoch)
        end = pack(self._lengths, order, self.cursor.index, self.micro_batch_tokens)
        return sum(self._lengths[i] for i in order[self.cursor.index : end])

    def micro_batches_per_epoch(self, epoch: int) -> int:
        order, start, count = epoch_order(len(self.sequences), self.seed, epoch, self.shuffle), 0, 0
        while start < len(order):
            start, count = pack(self._lengths, order, start, self.micro_batch_tokens), count + 1
        return count

    def __iter__(self) -> Iterator[MicroBatch]:
        while (batch := self.next()) is not None:
            yield batch
