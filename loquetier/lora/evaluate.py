"""Evaluation: mean completion-token loss and token accuracy of one adapter on a dataset.

The model reports, per loss group, ``loss_sum`` (summed token cross-entropy), ``count`` (scored
tokens) and ``correct`` (argmax == target). An :class:`EvaluationJob` is the "evaluate" job kind
and also what a training job runs every ``eval_every`` steps (forward only, rows via ``add_eval``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .data import DataStream, MicroBatch, TrainSequence


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean token cross-entropy over completion tokens
    accuracy: float  # fraction of completion tokens predicted exactly (greedy)
    num_tokens: int  # completion tokens scored


class EvalAccumulator:
    def __init__(self) -> None:
        self.loss_sum, self.count, self.correct = 0.0, 0, 0

    def add(self, loss_sum: float, count: int, correct: int = 0) -> None:
        self.loss_sum += float(loss_sum)
        self.count += int(count)
        self.correct += int(correct)

    def result(self) -> EvalResult:
        if self.count == 0:
            return EvalResult(float("nan"), float("nan"), 0)
        return EvalResult(self.loss_sum / self.count, self.correct / self.count, self.count)


def eval_micro_batches(sequences: Sequence[TrainSequence], micro_batch_tokens: int) -> list[MicroBatch]:
    """Every sequence once, in the given order, packed up to ``micro_batch_tokens``."""
    stream = DataStream(sequences, micro_batch_tokens=micro_batch_tokens, seed=0, shuffle=False)
    return list(stream)


class EvaluationJob:
    """Forward-only pass of ``adapter_id`` over ``sequences`` (satisfies the scheduler's ``TrainWork``).

    The engine takes :meth:`next_micro_batch`, runs its sequences as eval rows (one loss group)
    and reports the group's sums with :meth:`on_micro_batch_done`. ``on_done(result)`` fires once.
    """

    def __init__(self, job_id: str, adapter_id: str | None, sequences: Sequence[TrainSequence], *,
                 micro_batch_tokens: int = 4096, priority: int = 0, min_share: float = 0.0,
                 on_done: Callable[[EvalResult], None] | None = None) -> None:
        self._job_id, self.adapter_id = job_id, adapter_id
        self._priority, self._min_share = priority, min_share
        self._pending = eval_micro_batches(sequences, micro_batch_tokens)
        self._running: MicroBatch | None = None
        self.totals = EvalAccumulator()
        self._on_done = on_done

    @property
    def job_id(self) -> str:
        return self._job_id

    @property
    def priority(self) -> int:
        return self._priority

    @property
    def min_share(self) -> float:
        return self._min_share

    @property
    def is_eval(self) -> bool:
        return True

    @property
    def is_done(self) -> bool:
        return not self._pending and self._running is None

    def num_ready_tokens(self) -> int:
        if self._running is not None or not self._pending:
            return 0
        return self._pending[0].num_tokens

    def next_micro_batch(self) -> MicroBatch | None:
        if self._running is not None:
            raise RuntimeError(f"{self._job_id}: micro-batch {self._running.index} is still running")
        if not self._pending:
            return None
        self._running = self._pending.pop(0)
        return self._running

    def on_micro_batch_done(self, loss_sum: float, count: int, correct: int = 0) -> None:
        if self._running is None:
            raise RuntimeError(f"{self._job_id}: no micro-batch is running")
        self._running = None
        self.totals.add(loss_sum, count, correct)
        if self.is_done and self._on_done is not None:
            self._on_done(self.totals.result())

    @property
    def result(self) -> EvalResult:
        return self.totals.result()
