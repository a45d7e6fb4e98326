"""Training data: examples -> token ids + shifted labels -> packed micro-batches, in a seeded order.

An example is ``{"prompt", "completion"}`` text (prompt tokens, completion tokens, then EOS) or
``{"prompt_token_ids", "completion_token_ids"}`` (used exactly as given) or a chat example
``{"messages": [{"role", "content"}, ...]}`` (rendered with the model's chat template, loss on
the assistant turns only: ``loquetier.chat.chat_segments``). Labels follow HF's
``labels=`` convention (what ``BatchBuilder.add_train`` takes): ``labels[i] = token_ids[i]`` for
completion tokens, ``IGNORE_INDEX`` for prompt tokens; :attr:`TrainSequence.shifted_labels` is the
per-row target (row ``i`` predicts ``labels[i + 1]``), so loss is only on completion tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

IGNORE_INDEX = -100
DataSource = Sequence[Mapping[str, Any]] | str | Path
# A JSONL data file is refused past these (its size is checked before it is read).
MAX_DATA_FILE_BYTES = 1 << 30
MAX_EXAMPLES = 1_000_000
# Each assistant turn of a chat example is located by rendering the conversation up to it, so a data
# set costs about (turns x assistant turns) summed over its chat examples in template work: past
# this (about 8 s of rendering on one core) it is refused before any is done
MAX_CHAT_TURN_RENDERS = 20_000_000
_CHECK_EVERY = 256  # examples between two looks at a preparation's stop event
_ENCODE_CHUNK = 4096  # texts per tokenizer call: one call per chunk, memory bounded by the chunk


class DataError(ValueError):
    """Unusable training data, with the example (or JSONL line) at fault."""


class Tokenizer(Protocol):
    eos_token_id: int | None

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...  # HF ones also take a list


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

    @functools.cached_property
    def num_target_tokens(self) -> int:
        """Completion tokens that have a token before them (the loss denominator's share); counted
        once (a runner asks every step of a micro-batch)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def make_sequence(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> TrainSequence:
    ids = tuple(int(t) for t in prompt_ids) + tuple(int(t) for t in completion_ids)
    start = len(prompt_ids)  # first completion position
    labels = tuple(t if i >= start else IGNORE_INDEX for i, t in enumerate(ids))
    return TrainSequence(ids, labels)


def read_examples(source: DataSource, *, max_examples: int = MAX_EXAMPLES,
                  max_file_bytes: int = MAX_DATA_FILE_BYTES) -> list[Mapping[str, Any]]:
    """Inline list of example mappings, or a JSONL file path (one JSON object a line), at most
    ``max_examples`` of them; a file larger than ``max_file_bytes`` is refused before it is read."""
    if not isinstance(source, str | Path):
        if len(source) > max_examples:
            raise DataError(f"{len(source)} examples, the limit is {max_examples}")
        return list(source)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    size = path.stat().st_size
    if size > max_file_bytes:
        raise DataError(f"data file {path} is {size} bytes, the limit is {max_file_bytes}")
    examples: list[Mapping[str, Any]] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from exc
            if not isinstance(value, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
            if len(examples) == max_examples:
                raise DataError(f"data file {path} holds more than {max_examples} examples")
            examples.append(value)
    return examples


def tokenize_examples(source: DataSource, tokenizer: Tokenizer | None = None, *,
                      vocab_size: int | None = None, max_tokens: int | None = None,
                      max_len: int | None = None, add_special_tokens: bool = True, max_examples: int = MAX_EXAMPLES,
                      max_chat_renders: int = MAX_CHAT_TURN_RENDERS,
                      stop: threading.Event | None = None) -> list[TrainSequence]:
    """Validate and tokenize every example; errors name the example index. ``max_len``: the
    model's context (``max_model_len``); a longer sequence is refused, as a longer prompt is.

    Text examples need ``tokenizer`` (with an EOS token); the prompt is tokenized with
    ``add_special_tokens`` (BOS, as an inference prompt would be), the completion without. A
    Hugging Face tokenizer encodes them in batches (one call per few thousand texts, not two per
    example: 100,000 examples once took minutes). Chat examples whose template work (turns x
    assistant turns, summed) passes ``max_chat_renders`` are refused before any is rendered. A set
    ``stop`` ends the work within a few hundred examples (:class:`DataCancelled`).
    """
    examples = read_examples(source, max_examples=max_examples)
    if not examples:
        raise DataError("no examples")
    renders = sum(_chat_renders(ex) for ex in examples)
    if renders > max_chat_renders:
        raise DataError(f"the chat examples have {renders} (turns x assistant turns) summed, the limit is "
                        f"{max_chat_renders}: use fewer or shorter conversations, or split them")
    encoded = _encode_texts(examples, tokenizer, add_special_tokens, stop)
    out = []
    for index, example in enumerate(examples):
        if index % _CHECK_EVERY == 0:
            _stop_if_set(stop)
        try:
            seq = _tokenize_one(example, tokenizer, encoded.get(index))
            if vocab_size is not None and any(t >= vocab_size for t in seq.token_ids):
                raise DataError(f"token id >= the model's vocab_size {vocab_size}")
            if max_len is not None and seq.num_tokens > max_len:
                raise DataError(f"{seq.num_tokens} tokens exceed the model's context of {max_len} tokens "
                                "(max_model_len): shorten or split it")
            if max_tokens is not None and seq.num_tokens > max_tokens:
                raise DataError(f"{seq.num_tokens} tokens exceed micro_batch_tokens={max_tokens}")
            if seq.num_target_tokens == 0:
                raise DataError("no completion token to learn (a completion needs a token before it)")
        except DataError as exc:
            raise DataError(f"example {index}: {exc}") from None
        out.append(seq)
    return out


class DataCancelled(DataError):
    """A preparation stopped by its caller (the job was cancelled, paused or moved meanwhile)."""


def _stop_if_set(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise DataCancelled("the data's preparation was stopped")


def _chat_renders(example: object) -> int:
    """Template work of one chat example: its turns times its assistant turns (0 for other kinds)."""
    if not isinstance(example, Mapping):
        return 0
    messages = example.get("messages")
    if not isinstance(messages, list):
        return 0
    assistant = sum(1 for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant")
    return len(messages) * assistant


def _is_text(example: object) -> bool:
    return (isinstance(example, Mapping) and set(example) == {"prompt", "completion"}
            and isinstance(example["prompt"], str) and isinstance(example["completion"], str))


def _encode_texts(examples: Sequence[Mapping[str, Any]], tokenizer: Tokenizer | None,
                  special: bool, stop: threading.Event | None = None) -> dict[int, tuple[list[int], list[int]]]:
    """example index -> (prompt ids, completion ids) of every text example, encoded in batches."""
    if tokenizer is None or tokenizer.eos_token_id is None:
        return {}
    texts = [i for i, ex in enumerate(examples) if _is_text(ex)]
    prompts = _encode(tokenizer, [examples[i]["prompt"] for i in texts], special, stop)
    completions = _encode(tokenizer, [examples[i]["completion"] for i in texts], False, stop)
    return dict(zip(texts, zip(prompts, completions, strict=True), strict=True))


def _encode(tokenizer: Tokenizer, texts: list[str], special: bool,
            stop: threading.Event | None = None) -> list[list[int]]:
    out: list[list[int]] = []
    batched = isinstance(getattr(tokenizer, "is_fast", None), bool)  # a Hugging Face tokenizer: takes lists
    for lo in range(0, len(texts), _ENCODE_CHUNK):
        _stop_if_set(stop)
        chunk = texts[lo : lo + _ENCODE_CHUNK]
        if batched:
            nonempty = [t for t in chunk if t]
            ids = iter(tokenizer(nonempty, add_special_tokens=special)["input_ids"] if nonempty else [])  # type: ignore[arg-type]
            out += [list(next(ids)) if t else [] for t in chunk]
        else:
            out += [list(tokenizer(t, add_special_tokens=special)["input_ids"]) if t else [] for t in chunk]
    return out


def data_fingerprint(sequences: Sequence[TrainSequence]) -> str:
    """A hash of the tokenized data: a checkpoint resumes only on the data it was taken on."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(json.dumps([seq.token_ids, seq.labels]).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class PreparedData:
    """Examples tokenized and checked before a job starts (off the engine's step path), with their
    fingerprint; ``max_tokens`` is the per-sequence limit they were checked against."""

    sequences: tuple[TrainSequence, ...]
    fingerprint: str
    max_tokens: int | None


def _tokenize_one(example: Mapping[str, Any], tokenizer: Tokenizer | None,
                  encoded: tuple[list[int], list[int]] | None) -> TrainSequence:
    if not isinstance(example, Mapping):
        raise DataError(f"expected a mapping, got {type(example).__name__}")
    keys = set(example)
    if keys == {"prompt", "completion"}:
        prompt, completion = example["prompt"], example["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise DataError("prompt must be a string and completion a non-empty string")
        if tokenizer is None or tokenizer.eos_token_id is None or encoded is None:
            raise DataError("text examples need a tokenizer with an EOS token")
        prompt_ids, completion_ids = encoded
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
    if keys == {"messages"}:
        return _chat_sequence(example["messages"], tokenizer)
    raise DataError(f"expected keys {{prompt, completion}}, {{prompt_token_ids, completion_token_ids}} "
                    f"or {{messages}}, got {sorted(keys)}")


def _chat_sequence(messages: Any, tokenizer: Tokenizer | None) -> TrainSequence:
    from loquetier.chat import ROLE_ALIASES, answer_problem, chat_segments, turn_problem
    from loquetier.engine.errors import EngineError

    roles = frozenset({"system", "user", "assistant", *ROLE_ALIASES})
    if not isinstance(messages, list) or not messages:
        raise DataError("messages must be a non-empty list of {role, content} maps")
    problem = next((p for p in (turn_problem(i, m, roles) for i, m in enumerate(messages)) if p), None)
    if problem is None:
        problem = answer_problem(messages)
    if problem is not None:
        raise DataError(problem)
    try:
        segments = chat_segments(tokenizer, messages)
    except EngineError as exc:
        raise DataError(exc.message) from None
    ids = tuple(t for seg, _ in segments for t in seg)
    labels = tuple(t if is_target else IGNORE_INDEX for seg, is_target in segments for t in seg)
    return TrainSequence(ids, labels)


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
