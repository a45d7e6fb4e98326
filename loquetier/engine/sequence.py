"""Engine dataclasses shared by the scheduler and the model runner.

Vocabulary (kept apart from wire messages and database rows):

- ``SamplingParams``: how to sample one request (frozen, validated).
- ``RequestState``: one inference request's engine state (prompt, outputs, KV progress, SLO targets).
- ``TrainWork``: what the scheduler needs to know about a training or eval job (a Protocol; the
  real job lives in ``loquetier.lora``).
- ``PrefillChunk`` / ``TrainChunk`` / ``ScheduledBatch``: what one engine step runs.
- ``StepResult``: what the runner reports back after the step.

KV progress: ``num_computed_tokens`` counts the tokens of ``prompt + output`` whose K/V are in the
cache. A sequence is *prefilling* while it has never sampled since its last (re)admission, i.e. while
``num_computed_tokens < num_tokens - 1`` or it has no output yet; the chunk that reaches
``num_tokens`` samples the next token. Afterwards each decode step feeds exactly one token (the last
sampled one, at position ``num_computed_tokens``). Preemption by recompute resets
``num_computed_tokens`` to 0, so the prompt and the outputs so far are prefilled again.

Asynchronous steps (``engine/async_step.py``): a step launched before the host has read the
previous step's tokens advances ``num_computed_tokens`` at launch; each token it samples is
*pending* (``num_pending``) until the host reads and applies it, and the next step feeds it from
the device. A pending token counts as a token for ``is_prefilling`` and ``num_uncomputed_tokens``.

Clocks: every ``now`` / ``*_time`` is in seconds on the caller's clock (the engine uses a monotonic
clock, the simulator a virtual one); SLO targets are in milliseconds, as on the wire.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# Temperatures below this are greedy: dividing logits by 1e-39 overflows fp32 to inf, and the argmax
# of a row of infs is its first id, not its best token.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. Wire names: max_tokens, temperature, top_p, top_k, seed, stop, logprobs.

    ``temperature`` 0 (or below ``GREEDY_BELOW``, 1e-5) means greedy; ``top_k == 0`` disables
    top-k; ``seed`` None draws from the engine's generator. ``stop`` strings are matched by the
    detokenizing side (the engine), which then calls ``Scheduler.finish(seq_id, "stop")``;
    ``stop_token_ids`` and EOS are checked by the scheduler.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen to tuples so the params stay hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV
    RUNNING = "running"  # admitted: holds KV, prefilling or decoding
    PREEMPTED = "preempted"  # KV was freed under pressure; waits to be recomputed
    FINISHED = "finished"


@dataclass(eq=False)
class RequestState:
    """One inference request's engine state (named so that it never shadows ``collections.abc.Sequence``).
    ``ttft_ms`` / ``tpot_ms`` None take the scheduler config's defaults.

    ``priority``: higher is more important (weight ``1 + priority``); must be >= 0.
    """

    seq_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter_id: str | None = None
    priority: int = 0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    arrival_time: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None  # "length" | "stop" | "abort"
    num_preemptions: int = 0
    num_tpot_misses: int = 0  # inter-token gaps longer than tpot_ms
    num_pending: int = 0  # tokens sampled by steps on the device, not yet applied (async steps)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"sequence {self.seq_id!r}: empty prompt")
        if self.priority < 0:
            raise ValueError(f"sequence {self.seq_id!r}: priority must be >= 0")
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"sequence {self.seq_id!r}: {name} must be a finite number > 0")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_prefilling(self) -> bool:
        if not (self.output_token_ids or self.num_pending):
            return True
        return self.num_computed_tokens < self.num_tokens + self.num_pending - 1

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens + self.num_pending - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def mean_tpot_s(self) -> float | None:
        """Mean time per output token after the first, None with fewer than two tokens."""
        if self.first_token_time is None or self.last_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)


@runtime_checkable
class TrainWork(Protocol):
    """The scheduler's view of a training or eval job.

    ``priority`` >= 0 (weight ``1 + priority`` in the token share); ``min_share`` in [0, 1] is the
    fraction of ``max_num_batched_tokens`` the job keeps every step it has work, even under inference
    pressure; ``is_eval`` jobs run forward only. ``num_ready_tokens()`` is how many tokens the job
    could use in one step right now (0 = nothing to do); it must not change state. The scheduler grants
    ``TrainChunk(job_id, num_tokens)``; the job packs at most that many tokens into the step and the
    runner reports what was used in ``StepResult.train_tokens``.
    """

    @property
    def job_id(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def min_share(self) -> float: ...

    @property
    def is_eval(self) -> bool: ...

    def num_ready_tokens(self) -> int: ...


@dataclass(frozen=True)
class PrefillChunk:
    """Prefill positions ``[start, start + length)`` of ``seq.token_ids``; the final chunk samples."""

    seq: RequestState
    start: int
    length: int

    @property
    def is_final(self) -> bool:
        return self.start + self.length == self.seq.num_tokens


def prefill_kv_reads(start: int, length: int) -> int:
    """Keys a prompt chunk's rows read when attended row by row (graph steps): sum of (position + 1)."""
    return length * start + length * (length + 1) // 2


@dataclass(frozen=True)
class TrainChunk:
    """A grant of up to ``num_tokens`` training (or eval) tokens to one job for one step."""

    job_id: str
    num_tokens: int


@dataclass
class ScheduledBatch:
    """What one step runs. Row order in the packed batch: ``[train | eval | prefill | decode]``.

    ``decode_seqs`` each feed one token (``seq.token_ids[-1]`` at position ``seq.num_computed_tokens``).
    ``preempted`` were evicted while building this batch: their KV is already freed.
    """

    step_id: int
    now: float
    decode_seqs: list[RequestState] = field(default_factory=list)
    prefill_chunks: list[PrefillChunk] = field(default_factory=list)
    train_chunks: list[TrainChunk] = field(default_factory=list)
    eval_chunks: list[TrainChunk] = field(default_factory=list)
    preempted: list[RequestState] = field(default_factory=list)
    time_budget_s: float | None = None  # None: no latency target binds this step
    predicted_time_s: float = 0.0

    @property
    def num_decode_rows(self) -> int:
        return len(self.decode_seqs)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.length for c in self.prefill_chunks)

    @property
    def num_train_tokens(self) -> int:
        return sum(c.num_tokens for c in self.train_chunks)

    @property
    def num_eval_tokens(self) -> int:
        return sum(c.num_tokens for c in self.eval_chunks)

    @property
    def num_kv_tokens_read(self) -> int:
        """KV positions attended over: each decode row's context plus each prefill chunk's end."""
        return sum(s.num_computed_tokens + 1 for s in self.decode_seqs) + sum(
            c.start + c.length for c in self.prefill_chunks
        )

    @property
    def num_prefill_row_reads(self) -> int:
        """Keys the prompt rows read when attended row by row, as graph steps do (``prefill_kv_reads``)."""
        return sum(prefill_kv_reads(c.start, c.length) for c in self.prefill_chunks)

    @property
    def num_batched_tokens(self) -> int:
        return self.num_decode_rows + self.num_prefill_tokens + self.num_train_tokens + self.num_eval_tokens

    @property
    def is_empty(self) -> bool:
        return self.num_batched_tokens == 0


@dataclass
class StepResult:
    """What the runner reports after running a ``ScheduledBatch``.

    ``sampled_token_ids``: seq_id -> token for every decode row and every final prefill chunk.
    ``train_tokens`` / ``eval_tokens``: job_id -> tokens actually used; None means "as granted".
    """

    now: float
    step_time_s: float
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    train_tokens: dict[str, int] | None = None
    eval_tokens: dict[str, int] | None = None
