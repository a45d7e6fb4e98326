"""Step isolation: a failure inside a step is pinned on the requests or jobs it came from.

One forward carries every kind of row, so one bad input (a value no check foresaw, an adapter
that breaks a kernel) would otherwise fail the whole step, and with it every request and job of
the engine, step after step. When running a batch raises, its parts are run again separately:
the inference rows apart from each job's rows, then halves of whatever still fails, down to
single requests and jobs. A part that fails alone is guilty: its request gets a
``RequestFailed`` (code ``execution_failed``), its job a failed ``JobFinished`` with the reason;
every other part's results are kept, so the step completes for everyone else.

Retrying is safe: a part's prompt and decode rows rewrite the same K/V into the same cache slots;
a training job whose rows were in a failed attempt starts its accumulation window again (its
backward may have added part of a gradient: ``JobFeed.rewind``); an eval gives its
sequences back (``JobFeed.give_back``).

If the engine itself is broken there is nothing to blame: a CUDA error (the context is lost), or
every part failing while a minimal base-model forward (the probe) fails too. Then
:class:`EngineBroken` is raised, and the owner of the engine stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from loquetier.engine.errors import EngineBroken, describe
from loquetier.engine.events import EngineEvent, RequestFailed
from loquetier.engine.job_feed import JobFeed, StepPieces
from loquetier.engine.runner import RunResult
from loquetier.engine.sequence import PrefillChunk, RequestState, ScheduledBatch, TrainChunk
from loquetier.models.batch import BatchBuilder

if TYPE_CHECKING:
    from loquetier.engine.jobs import JobBook
    from loquetier.engine.requests import RequestBook
    from loquetier.engine.runner import ModelRunner
    from loquetier.engine.scheduling.scheduler import Scheduler

EXECUTION_FAILED = "execution_failed"
MAX_REWINDS = 3
_PROBE_TOKENS = 8
# Messages of errors after which the device cannot be trusted again (the CUDA context is lost).
_DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert",
                  "illegal memory access", "NCCL error", "CUDA driver", "unspecified launch failure")

Item = tuple[str, PrefillChunk | RequestState | TrainChunk]  # ("prefill" | "decode" | "train" | "eval", part)


def is_device_error(exc: BaseException) -> bool:
    """A CUDA-level failure: nothing run on this device afterwards can be trusted."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False  # memory: smaller parts may fit
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _DEVICE_ERRORS)


@dataclass
class _Outcome:
    result: RunResult = field(default_factory=RunResult)
    failures: list[tuple[Item, BaseException]] = field(default_factory=list)
    num_succeeded: int = 0  # parts that ran


class StepIsolation:
    """Runs a scheduled batch; on failure, bisects it and fails only the guilty requests and jobs."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, requests: RequestBook, jobs: JobBook) -> None:
        self.runner, self.scheduler, self.requests, self.jobs = runner, scheduler, requests, jobs
        self.num_isolated_steps = 0  # steps that needed a retry (tests and metrics read it)
        self._rewinds: dict[str, tuple[int, int]] = {}  # job_id -> (rewinds in a row, at optimizer step)
        self._touched: dict[str, tuple[JobFeed, BaseException]] = {}  # gradients touched by a failure

    def run(self, batch: ScheduledBatch) -> tuple[RunResult, list[EngineEvent]]:
        """The step's results, and the failure events of its guilty parts (already removed)."""
        try:
            return self._attempt(batch), []
        except EngineBroken:
            raise
        except Exception as exc:
            first = exc
        self.num_isolated_steps += 1
        self._check_device(first)
        outcome = _Outcome()
        items = _items(batch)
        parts = _first_split(items)
        if len(parts) == 1:  # one kind of work only: its first retry is already a half
            parts = _halves(parts[0]) if len(items) > 1 else []
            if not parts:
                outcome.failures.append((items[0], first))
        for part in parts:
            self._bisect(batch, part, outcome)
        if outcome.num_succeeded == 0:
            self._probe(first)  # nothing ran: the engine, not the input, may be at fault
        self._rewind_touched(outcome)
        return outcome.result, self._fail(outcome.failures, batch.now)

    # ---- running parts -------------------------------------------------------------------------

    def _attempt(self, batch: ScheduledBatch, items: list[Item] | None = None) -> RunResult:
        """Run ``items`` of ``batch`` (None: all of it); a failure gives back the pieces it took."""
        part = batch if items is None else _subset(batch, items)
        num_backward_rows = self.runner.num_backward_rows
        pieces = StepPieces()
        try:
            pieces = self.jobs.take_pieces(part)  # gives back what it took if taking fails
            # a retry's results may be dropped (``_rewind_touched``): its jobs update when they
            # account them, not on the device ahead of the read
            return self.runner.run(part, pieces, self.requests.sampling_inputs(part), queue_updates=items is None)
        except Exception as exc:
            touched = self.runner.num_backward_rows != num_backward_rows or _raised_in_backward(exc)
            pieces.give_back()  # the same pieces run in the retries, so blame falls where it belongs
            for piece in reversed(pieces.all):
                if touched and not piece.feed.is_eval:
                    self._touched.setdefault(piece.feed.job_id, (piece.feed, exc))
            raise

    def _rewind_touched(self, outcome: _Outcome) -> None:
        """Training jobs whose backward ran in a failed attempt hold part of a gradient: what their
        retries computed is dropped and each starts its accumulation window again. A job rewound
        ``MAX_REWINDS`` times in a row without an optimizer step fails (a step that fails only as a
        whole, never in parts, would otherwise come back forever)."""
        failed = {part.job_id for (kind, part), _ in outcome.failures if isinstance(part, TrainChunk)}
        for job_id, (work, exc) in self._touched.items():
            if job_id in failed:
                continue
            outcome.result.pieces = [p for p in outcome.result.pieces if p[0].feed is not work]
            work.rewind()
            step = work.job.step
            count, at_step = self._rewinds.get(job_id, (0, step))
            count = count + 1 if at_step == step else 1
            self._rewinds[job_id] = (count, step)
            if count >= MAX_REWINDS:
                outcome.failures.append((("train", TrainChunk(job_id, 0)), exc))
        self._touched.clear()
        self._rewinds = {k: v for k, v in self._rewinds.items() if k in self.scheduler.jobs}

    def _bisect(self, batch: ScheduledBatch, items: list[Item], outcome: _Outcome) -> None:
        try:
            result = self._attempt(batch, items)
        except EngineBroken:
            raise
        except Exception as exc:
            self._check_device(exc)
            if len(items) == 1:
                outcome.failures.append((items[0], exc))
                return
            for half in _halves(items):
                self._bisect(batch, half, outcome)
            return
        outcome.num_succeeded += 1
        _merge(outcome.result, result)

    def _check_device(self, exc: BaseException) -> None:
        if is_device_error(exc):
            raise EngineBroken(f"the device failed during a step: {describe(exc)}") from exc

    def _probe(self, cause: BaseException) -> None:
        """A base-model forward over a few tokens, no adapter, no KV cache: if even that fails, the
        engine is broken; if it runs, the failed parts are to blame."""
        model = self.runner.model
        tokens = [(7 * i + 1) % model.cfg.vocab_size for i in range(_PROBE_TOKENS)]
        try:
            fb = BatchBuilder(self.runner.config.block_size).add_eval(tokens).build(model.device)
            with torch.no_grad():
                out = model.forward(fb, self.runner.kv)
            ok = out.loss_sum is not None and bool(torch.isfinite(out.loss_sum).all())
        except Exception as exc:
            raise EngineBroken(f"no part of a step could run, and neither could a probe forward: "
                               f"{describe(exc)} (the step failed with {describe(cause)})") from cause
        if not ok:
            raise EngineBroken(f"no part of a step could run, and a probe forward gave a non-finite loss "
                               f"(the step failed with {describe(cause)})") from cause

    # ---- failing the guilty ---------------------------------------------------------------------

    def _fail(self, failures: list[tuple[Item, BaseException]], now: float) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        for (kind, part), exc in failures:
            if kind in ("prefill", "decode"):
                seq = part.seq if isinstance(part, PrefillChunk) else part
                assert isinstance(seq, RequestState)
                events += self._fail_request(seq.seq_id, exc, now)
            else:
                assert isinstance(part, TrainChunk)
                job_event = self.jobs.fail(part.job_id, f"a training step with this job's rows failed: "
                                                        f"{describe(exc)}")
                events += [job_event] if job_event is not None else []
        return events

    def _fail_request(self, seq_id: str, exc: BaseException, now: float) -> list[EngineEvent]:
        if self.scheduler.finish(seq_id, "abort", now) is None:
            return []
        self.requests.drop(seq_id)
        return [RequestFailed(seq_id, EXECUTION_FAILED, f"the engine could not run this request: {describe(exc)}")]


def _raised_in_backward(exc: BaseException) -> bool:
    """Whether ``exc`` came out of autograd's backward (then gradients may hold part of a step)."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in ("backward", "_engine_run_backward") and "torch" in code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _items(batch: ScheduledBatch) -> list[Item]:
    return ([("train", c) for c in batch.train_chunks] + [("eval", c) for c in batch.eval_chunks]
            + [("prefill", c) for c in batch.prefill_chunks] + [("decode", s) for s in batch.decode_seqs])


def _first_split(items: list[Item]) -> list[list[Item]]:
    """The inference rows together, each job's rows apart."""
    inference = [i for i in items if i[0] in ("prefill", "decode")]
    jobs = [[i] for i in items if i[0] in ("train", "eval")]
    return ([inference] if inference else []) + jobs


def _halves(items: list[Item]) -> list[list[Item]]:
    mid = len(items) // 2
    return [items[:mid], items[mid:]]


def _subset(batch: ScheduledBatch, items: list[Item]) -> ScheduledBatch:
    def of(kind: str) -> list[Any]:
        return [part for k, part in items if k == kind]

    return ScheduledBatch(step_id=batch.step_id, now=batch.now, decode_seqs=of("decode"),
                          prefill_chunks=of("prefill"), train_chunks=of("train"), eval_chunks=of("eval"),
                          time_budget_s=batch.time_budget_s, predicted_time_s=batch.predicted_time_s)


def _merge(into: RunResult, part: RunResult) -> None:
    into.sampled.update(part.sampled)
    into.logprobs.update(part.logprobs)
    into.train_tokens.update(part.train_tokens)
    into.eval_tokens.update(part.eval_tokens)
    into.pieces += part.pieces
