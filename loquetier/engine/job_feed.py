"""JobFeed: feeds one training or evaluation job's sequences into engine steps.

A job hands out whole micro-batches; the scheduler grants tokens per step. The feed splits a
micro-batch into sequence-granular pieces across steps: each piece's loss is
``loss_sum / micro_batch.num_target_tokens``, so the summed gradient equals one pass over the
whole micro-batch (the loss is a mean over the micro-batch's completion tokens).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from loquetier.lora.data import MicroBatch, TrainSequence
from loquetier.lora.evaluate import EvaluationJob
from loquetier.lora.job import TrainingJob


@dataclass
class Piece:
    """The sequences of one micro-batch run in this step."""

    feed: JobFeed
    sequences: list[TrainSequence]
    micro_batch: MicroBatch
    is_last: bool  # the micro-batch completes with this piece

    @property
    def group(self) -> tuple[str, int]:
        return (self.feed.job_id, self.micro_batch.index)


@dataclass
class StepPieces:
    """The training and evaluation pieces of one step, taken from their feeds before the step runs
    (``JobBook.take_pieces``) and handed to the model runner; the tokens each job got."""

    train: list[Piece] = field(default_factory=list)
    eval: list[Piece] = field(default_factory=list)
    train_tokens: dict[str, int] = field(default_factory=dict)
    eval_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def all(self) -> list[Piece]:
        """Train pieces, then eval pieces: the order of the batch's loss groups."""
        return self.train + self.eval

    def give_back(self) -> None:
        """The step did not run (or failed before any gradient was touched): each feed hands out the
        same pieces again."""
        for piece in reversed(self.all):
            piece.feed.give_back(piece)


class JobFeed:
    """Implements the scheduler's ``TrainWork`` for a TrainingJob or an EvaluationJob."""

    def __init__(self, job: TrainingJob | EvaluationJob, slot: int, *, parent: str | None = None) -> None:
        self.job, self.slot, self.parent = job, slot, parent
        self.paused = False  # by its owner (``Engine.pause_job``)
        self.held = False  # by the engine: too many of its checkpoints are not yet stored (``JobBook``)
        self._mb: MicroBatch | None = None
        self._pending: deque[TrainSequence] = deque()
        self.loss_sum, self.count, self.correct = 0.0, 0, 0

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def priority(self) -> int:
        return self.job.priority

    @property
    def min_share(self) -> float:
        return self.job.min_share

    @property
    def is_eval(self) -> bool:
        return self.job.is_eval

    @property
    def is_stopped(self) -> bool:
        """Paused or held: it offers no tokens, and needs no step."""
        return self.paused or self.held

    def num_ready_tokens(self) -> int:
        if self.is_stopped:
            return 0
        if self._pending:
            return sum(s.num_tokens for s in self._pending)
        if self._mb is not None:
            return 0  # the micro-batch's last piece is in flight
        return self.job.num_ready_tokens()

    def take(self, num_tokens: int) -> Piece | None:
        """Whole sequences of the current micro-batch up to ``num_tokens`` (at least one)."""
        if self._mb is None:
            mb = self.job.next_micro_batch()
            if mb is None:
                return None
            self._mb, self._pending = mb, deque(mb.sequences)
            self.loss_sum, self.count, self.correct = 0.0, 0, 0
        taken: list[TrainSequence] = []
        used = 0
        while self._pending and (not taken or used + self._pending[0].num_tokens <= num_tokens):
            seq = self._pending.popleft()
            taken.append(seq)
            used += seq.num_tokens
        return Piece(self, taken, self._mb, is_last=not self._pending)

    def give_back(self, piece: Piece) -> None:
        """A step that ran ``piece`` failed before any gradient was touched: its sequences go back in
        front of the ones still pending, and the next take hands out the same piece."""
        self._pending.extendleft(reversed(piece.sequences))

    def rewind(self) -> None:
        """A step that ran a piece of this training job failed after its backward began (part of a
        gradient may be in the slot): the job starts its accumulation window again."""
        assert isinstance(self.job, TrainingJob)
        self.job.rewind()
        self._mb, self._pending = None, deque()
        self.loss_sum, self.count, self.correct = 0.0, 0, 0

    def queue_update(self, piece: Piece, loss_sum: Any) -> None:
        """After the step's backward: a training job queues the optimizer step that ``piece``, the
        last of its micro-batch, completes (``TrainingJob.queue_update``)."""
        if piece.is_last and isinstance(self.job, TrainingJob):
            self.job.queue_update(loss_sum)

    def complete(self, piece: Piece, loss_sum: float, count: int, correct: int) -> bool:
        """Account a finished piece; True when it closed its micro-batch (reported to the job)."""
        self.loss_sum += loss_sum
        self.count += count
        self.correct += correct
        if not piece.is_last:
            return False
        self._mb = None
        if isinstance(self.job, EvaluationJob):
            self.job.on_micro_batch_done(self.loss_sum, self.count, self.correct)
        else:
            self.job.on_micro_batch_done(self.loss_sum, self.count)
        return True

    @property
    def at_boundary(self) -> bool:
        return self._mb is None
