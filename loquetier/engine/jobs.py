"""JobBook: the engine's training and evaluation jobs, and their events.

Each fine-tuning job is independent (own slot, optimizer, schedule, data order); the scheduler
only sees JobFeeds. Evaluations during training run as child eval jobs on the training slot.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loquetier.engine.config import EngineConfig
from loquetier.engine.errors import EngineError, describe
from loquetier.engine.events import EngineEvent, JobCheckpoint, JobEvaluated, JobFinished, JobProgress
from loquetier.engine.job_feed import JobFeed, StepPieces
from loquetier.engine.scheduling.scheduler import Scheduler
from loquetier.engine.sequence import ScheduledBatch
from loquetier.lora.adapter import LoRAAdapter
from loquetier.lora.checkpoint import dump as dump_checkpoint
from loquetier.lora.checkpoint import restore as restore_checkpoint
from loquetier.lora.config import AdapterCapacityError, AdapterError, LoRAConfig
from loquetier.lora.data import (
    DataCancelled,
    DataError,
    PreparedData,
    TrainSequence,
    data_fingerprint,
    tokenize_examples,
)
from loquetier.lora.evaluate import EvaluationJob
from loquetier.lora.job import TrainingJob
from loquetier.lora.manager import AdapterManager
from loquetier.lora.params import TrainingParams

if TYPE_CHECKING:
    from loquetier.engine.runner import RunResult


@dataclass
class _Train:
    job: TrainingJob
    feed: JobFeed
    started: float
    last_step: int
    child: JobFeed | None = None
    unstored: int = 0  # checkpoints sent and not yet said stored (``JobBook.checkpoint_stored``)
    checkpoint_next: bool = False  # one asked for (``JobBook.checkpoint_now``): at the next boundary
    install: bool = True  # on success, the weights become the adapter (``JobBook.install``)


@dataclass
class _Eval:
    job: EvaluationJob
    feed: JobFeed
    adapter_id: str | None
    pinned: bool


class DataPreparer:
    """Tokenizes and checks a job's data with a tokenizer of its own, on any thread, one call at a
    time (HF fast tokenizers take one user at a time): for ``JobBook.prepare``, and for a worker
    whose engine runs in another process (the work then stays off the engine's interpreter)."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_num_batched_tokens: int,
                 max_model_len: int | None = None) -> None:
        self.tokenizer, self.vocab_size, self.ceiling = tokenizer, vocab_size, max_num_batched_tokens
        self.max_model_len = max_model_len
        self._lock = threading.Lock()

    def prepare(self, data: Any, micro_batch_tokens: int | None = None,
                stop: threading.Event | None = None) -> PreparedData:
        """A set ``stop`` (its job cancelled or moved) ends the wait for an earlier call and the
        work itself within a few hundred examples: EngineError ``cancelled``."""
        limit = min(micro_batch_tokens or self.ceiling, self.ceiling)
        while not self._lock.acquire(timeout=0.2):
            if stop is not None and stop.is_set():
                raise EngineError("cancelled", "the data's preparation was stopped")
        try:
            seqs = tokenize_examples(data, self.tokenizer, vocab_size=self.vocab_size, max_tokens=limit,
                                     max_len=self.max_model_len, stop=stop)
        except DataCancelled as exc:
            raise EngineError("cancelled", str(exc)) from exc
        except (DataError, OSError, ValueError, TypeError) as exc:
            raise EngineError("invalid_data", str(exc)) from exc
        finally:
            self._lock.release()
        return PreparedData(tuple(seqs), data_fingerprint(seqs), limit)


class JobBook:
    def __init__(self, adapters: AdapterManager, scheduler: Scheduler, tokenizer: Any, vocab_size: int,  # noqa: PLR0917
                 config: EngineConfig, max_model_len: int | None = None) -> None:
        self.adapters, self.scheduler, self.tokenizer = adapters, scheduler, tokenizer
        self.vocab_size, self.config, self.max_model_len = vocab_size, config, max_model_len
        self._train: dict[str, _Train] = {}
        self._evals: dict[str, _Eval] = {}
        self._feeds: dict[str, JobFeed] = {}
        self.eval_results: dict[str, dict[str, float]] = {}
        self._prepare_lock = threading.Lock()
        self._preparer: DataPreparer | None = None
        # > 0: a training job with this many checkpoints not yet stored takes no step (set_checkpoint_window)
        self.max_unstored_checkpoints = 0
        # adapter id -> weights a job trained, waiting for the adapter of that id to be idle (``install``)
        self._installs: dict[str, LoRAAdapter] = {}

    # ---- creation ----------------------------------------------------------------------------------

    def prepare(self, data: Any, micro_batch_tokens: int | None = None,
                stop: threading.Event | None = None) -> PreparedData:
        """Read, tokenize and check ``data`` (inline examples or a JSONL path) for a job whose
        micro-batches hold ``micro_batch_tokens``. Safe on any thread while the engine steps (it
        reads no engine state and tokenizes with its own copy of the tokenizer), so a job's set-up
        need not stall the steps: hand the result to ``add_training_job``. Setting ``stop`` ends
        it early (EngineError ``cancelled``)."""
        with self._prepare_lock:
            if self._preparer is None:
                tokenizer = copy.deepcopy(self.tokenizer) if self.tokenizer is not None else None
                self._preparer = DataPreparer(tokenizer, self.vocab_size, self.config.scheduler.max_num_batched_tokens,
                                              self.max_model_len)
        return self._preparer.prepare(data, micro_batch_tokens, stop)

    def _sequences(self, data: Any, max_tokens: int) -> tuple[list[TrainSequence], str | None]:
        """Sequences and (when prepared ahead) their fingerprint."""
        limit = min(max_tokens, self.config.scheduler.max_num_batched_tokens)
        if isinstance(data, PreparedData):
            if data.max_tokens is None or data.max_tokens > limit:
                longest = max((s.num_tokens for s in data.sequences), default=0)
                if longest > limit:
                    raise EngineError("invalid_data",
                                      f"a sequence of {longest} tokens exceeds micro_batch_tokens={limit}")
            return list(data.sequences), data.fingerprint
        try:
            return tokenize_examples(data, self.tokenizer, vocab_size=self.vocab_size, max_tokens=limit,
                                     max_len=self.max_model_len), None
        except (DataError, OSError, ValueError, TypeError) as exc:
            raise EngineError("invalid_data", str(exc)) from exc

    def _check_new(self, job_id: str) -> None:
        if job_id in self._feeds:
            raise EngineError("duplicate_job", f"job {job_id!r} is already running")

    def add(self, job_id: str, adapter_id: str, data: Any, params: TrainingParams | Mapping[str, Any] | None,
            *, lora: Mapping[str, Any] | None, base_adapter: str | None, eval_data: Any,
            priority: int | None, kind: str, checkpoint: bytes | None, install: bool = True) -> str:
        self._check_new(job_id)
        if kind == "evaluate":
            return self.add_eval(job_id, adapter_id, data, None)
        if kind != "finetune":
            raise EngineError("invalid_job", f"kind must be 'finetune' or 'evaluate', got {kind!r}")
        try:
            if params is None:
                params = TrainingParams()
            elif isinstance(params, Mapping):
                params = TrainingParams(**params)
            if priority is not None:
                params = TrainingParams(**{**params.__dict__, "priority": priority})
        except (TypeError, ValueError) as exc:
            raise EngineError("invalid_job", f"bad training params: {exc}") from exc
        training = self.training_job_of(adapter_id)
        if training is not None:
            raise EngineError("adapter_busy", f"adapter {adapter_id!r} is already being trained by job {training!r}")
        seqs, fingerprint = self._sequences(data, params.micro_batch_tokens)
        eval_seqs = self._sequences(eval_data, params.micro_batch_tokens)[0] if eval_data is not None else None
        try:
            if checkpoint is not None:
                job = restore_checkpoint(checkpoint, self.adapters, seqs, eval_data=eval_seqs,
                                         data_fingerprint=fingerprint)
                if job.job_id != job_id or job.adapter_id != adapter_id:
                    job.abandon()
                    raise EngineError("invalid_job", f"checkpoint belongs to job {job.job_id!r} "
                                      f"(adapter {job.adapter_id!r})")
            else:
                init, cfg = self._init(base_adapter, lora)
                job = TrainingJob(job_id, adapter_id, self.adapters, seqs, params, lora=cfg, init=init,
                                  eval_data=eval_seqs, data_fingerprint=fingerprint)
        except AdapterCapacityError as exc:
            raise EngineError("no_slot", str(exc)) from exc
        except AdapterError as exc:
            raise EngineError("bad_adapter", str(exc)) from exc
        except (TypeError, ValueError) as exc:
            raise EngineError("invalid_job", str(exc)) from exc
        feed = JobFeed(job, job.slot)
        self._train[job_id] = _Train(job, feed, time.perf_counter(), job.step, install=install)
        self._register(feed)
        return job_id

    def _init(self, base_adapter: str | None,
              lora: Mapping[str, Any] | None) -> tuple[LoRAAdapter | None, LoRAConfig | None]:
        if base_adapter is not None:
            if base_adapter in self.adapters:
                return self.adapters.get(base_adapter).clone(), None
            return LoRAAdapter.load(base_adapter, self.adapters.pool.dims, self.adapters.pool.max_rank), None
        spec = dict(lora or {})
        if "target_modules" in spec:
            spec["target_modules"] = tuple(spec["target_modules"])
        return None, LoRAConfig(**spec)

    def add_eval(self, job_id: str, adapter_id: str | None, data: Any, micro_batch_tokens: int | None) -> str:
        self._check_new(job_id)
        mbt = micro_batch_tokens or self.config.scheduler.max_num_batched_tokens
        seqs, _ = self._sequences(data, mbt)
        slot, pinned = -1, False
        if adapter_id is not None:
            if adapter_id not in self.adapters:
                raise EngineError("unknown_adapter", f"adapter {adapter_id!r} is not loaded")
            found = self.adapters.acquire_slot(adapter_id)
            if found is None:
                raise EngineError("no_slot", "every adapter slot is busy; retry later")
            self.adapters.pin(adapter_id)
            slot, pinned = found, True
        job = EvaluationJob(job_id, adapter_id, seqs, micro_batch_tokens=mbt)
        feed = JobFeed(job, slot)
        self._evals[job_id] = _Eval(job, feed, adapter_id, pinned)
        self._register(feed)
        return job_id

    def _register(self, feed: JobFeed) -> None:
        self._feeds[feed.job_id] = feed
        self.scheduler.add_job(feed)

    def _unregister(self, job_id: str) -> None:
        self._feeds.pop(job_id, None)
        self.scheduler.remove_job(job_id)

    # ---- queries -----------------------------------------------------------------------------------

    def take_pieces(self, batch: ScheduledBatch) -> StepPieces:
        """The pieces of the batch's train and eval chunks, taken from their jobs' feeds: what the
        model runner trains and evaluates on in this step. If taking fails, what was taken is given
        back before the error propagates."""
        pieces = StepPieces()
        try:
            for chunks, taken, used in ((batch.train_chunks, pieces.train, pieces.train_tokens),
                                        (batch.eval_chunks, pieces.eval, pieces.eval_tokens)):
                for chunk in chunks:
                    piece = self._feeds[chunk.job_id].take(chunk.num_tokens)
                    used[chunk.job_id] = 0
                    if piece is not None:
                        taken.append(piece)
                        used[chunk.job_id] += sum(s.num_tokens for s in piece.sequences)
        except BaseException:
            pieces.give_back()
            raise
        return pieces

    def has_work(self) -> bool:
        """Whether a job needs a step: paused and held jobs need none (an engine with nothing else to
        do waits for a command instead of stepping empty batches)."""
        return any(not feed.is_stopped for feed in self._feeds.values())

    def training_job_of(self, adapter_id: str) -> str | None:
        """The id of the job that trains ``adapter_id``, if one does."""
        return next((jid for jid, t in self._train.items() if t.job.adapter_id == adapter_id), None)

    def install_pending(self, adapter_id: str) -> bool:
        """Whether a job's trained weights wait to replace ``adapter_id``: its new sequences wait too
        (``AdapterSlotGate.held``), so that the running ones finish and the new weights go in."""
        return adapter_id in self._installs

    def drop_install(self, adapter_id: str) -> None:
        """Forget trained weights waiting for ``adapter_id`` (an explicit load replaced it)."""
        self._installs.pop(adapter_id, None)

    def install(self, adapter_id: str, adapter: LoRAAdapter) -> bool:
        """Make ``adapter`` (a finished job's weights, a newer stored version) the adapter
        ``adapter_id`` (a new version): now when no running sequence uses that id (or none is
        loaded; True), else once the sequences that use it have finished, new ones waiting meanwhile
        (False). A load refused for room keeps waiting too. A later install replaces one that waits."""
        self._installs.pop(adapter_id, None)
        if adapter_id in self.adapters and (self.adapters.num_refs(adapter_id) or self.adapters.is_pinned(adapter_id)):
            self._installs[adapter_id] = adapter
            return False
        try:
            self.adapters.load(adapter_id, adapter)
        except AdapterError:
            self._installs[adapter_id] = adapter
            return False
        self.adapters.fill_free_slots()
        return True

    def eval_result(self, job_id: str) -> dict[str, float] | None:
        return self.eval_results.pop(job_id, None)

    def stats(self) -> dict[str, Any]:
        return {jid: {"step": t.job.step, "total_steps": t.job.total_steps, "paused": t.feed.paused,
                      "held": t.feed.held, "unstored_checkpoints": t.unstored, "tokens": t.job.metrics.num_tokens}
                for jid, t in self._train.items()}

    # ---- control -----------------------------------------------------------------------------------

    def set_checkpoint_window(self, max_unstored: int) -> None:
        """Hold a training job (it takes no step) while ``max_unstored`` of its checkpoints are not yet
        stored (``checkpoint_stored``); 0: never hold (a checkpoint counts as stored once a step returns
        it, as for a caller that keeps the events itself)."""
        if isinstance(max_unstored, bool) or not isinstance(max_unstored, int) or max_unstored < 0:
            raise ValueError(f"max_unstored must be an integer >= 0, got {max_unstored!r}")
        self.max_unstored_checkpoints = max_unstored
        for t in self._train.values():
            self._hold(t)

    def checkpoint_stored(self, job_id: str) -> bool:
        """One of the job's checkpoints is stored (or given up): a held job goes on. False if unknown."""
        t = self._train.get(job_id)
        if t is None:
            return False
        t.unstored = max(0, t.unstored - 1)
        self._hold(t)
        return True

    def _hold(self, t: _Train) -> None:
        bound = self.max_unstored_checkpoints
        t.feed.held = bool(bound) and t.unstored >= bound

    def checkpoint_now(self, job_id: str) -> JobCheckpoint | bool:
        """A checkpoint of the training job as it stands (before it is stopped, so that it resumes
        from here): the event itself when the job is between optimizer steps, True when one comes at
        the end of the step in progress (gradients are accumulating), False when the job is unknown
        or has taken no step (nothing to keep)."""
        t = self._train.get(job_id)
        if t is None or t.job.step == 0 or t.job.is_done:
            return False
        if t.feed.at_boundary and t.job.at_boundary:  # no micro-batch running, no gradient accumulated
            t.checkpoint_next = False
            if self.max_unstored_checkpoints:  # said stored like any other (``checkpoint_stored``)
                t.unstored += 1
                self._hold(t)
            return JobCheckpoint(t.job.job_id, t.job.step, dump_checkpoint(t.job))
        t.checkpoint_next = True
        return True

    def set_paused(self, job_id: str, paused: bool) -> bool:
        t = self._train.get(job_id)
        if t is None:
            return False
        t.feed.paused = paused
        return True

    def cancel(self, job_id: str) -> JobFinished | None:
        return self._end(job_id, "cancelled", None)

    def fail(self, job_id: str, reason: str) -> JobFinished | None:
        """End a job whose own work failed (its rows broke a step, a non-finite loss, its optimizer
        raised); an evaluation child fails the training job it belongs to. None if unknown."""
        feed = self._feeds.get(job_id)
        if feed is not None and feed.parent is not None:
            job_id = feed.parent
        return self._end(job_id, "failed", reason)

    def _end(self, job_id: str, status: str, error: str | None) -> JobFinished | None:
        t = self._train.pop(job_id, None)
        if t is not None:
            if t.child is not None:
                self._unregister(t.child.job_id)
            self._unregister(job_id)
            t.job.zero_grad()
            t.job.abandon()
            return JobFinished(job_id, t.job.adapter_id, status, self._metrics(t.job), error=error)
        e = self._evals.pop(job_id, None)
        if e is not None:
            self._end_eval(e)
            return JobFinished(job_id, e.adapter_id or "", status, error=error)
        return None

    # ---- after each step ---------------------------------------------------------------------------

    def after_step(self, run: RunResult) -> list[EngineEvent]:
        """Account the step's pieces; a job whose accounting fails (a non-finite loss, an optimizer
        that raised, e.g. on an lr too large for float32) fails alone, the others go on."""
        failed: list[EngineEvent] = []
        for piece, loss_sum, count, correct in run.pieces:
            job_id = piece.feed.job_id
            if job_id not in self._feeds:
                continue  # failed by an earlier piece of this step
            try:
                if not piece.feed.is_eval and not math.isfinite(loss_sum):
                    raise FloatingPointError(f"the training loss is {loss_sum} (lower lr, or check the data)")
                piece.feed.complete(piece, loss_sum, count, correct)
            except Exception as exc:  # the job's own numbers: nothing else is touched
                event = self.fail(job_id, f"training failed at step {self._step_of(job_id)}: {describe(exc)}")
                if event is not None:
                    failed.append(event)
        return failed + self.collect_idle()

    def _step_of(self, job_id: str) -> int:
        feed = self._feeds.get(job_id)
        t = self._train.get(feed.parent or job_id) if feed is not None else None
        return t.job.step if t is not None else 0

    def collect_idle(self) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        for adapter_id in list(self._installs):  # trained weights whose adapter id was in use
            self.install(adapter_id, self._installs.pop(adapter_id))
        for job_id in list(self._train):
            try:
                events += self._advance(self._train[job_id])
            except Exception as exc:  # e.g. trained weights refused as non-finite: this job alone
                failed = self.fail(job_id, f"the job could not finish a step: {describe(exc)}")
                events += [failed] if failed is not None else []
        for job_id in list(self._evals):
            e = self._evals[job_id]
            if e.job.is_done:
                del self._evals[job_id]
                self._end_eval(e)
                r = e.job.result
                result = {"loss": r.loss, "token_accuracy": r.accuracy, "num_tokens": float(r.num_tokens)}
                self.eval_results[job_id] = result
                events.append(JobFinished(job_id, e.adapter_id or "", "succeeded", result))
        return events

    def _end_eval(self, e: _Eval) -> None:
        self._unregister(e.feed.job_id)
        if e.pinned and e.adapter_id is not None and e.adapter_id in self.adapters:
            self.adapters.unpin(e.adapter_id)

    def _advance(self, t: _Train) -> list[EngineEvent]:
        job, events = t.job, []
        if job.step != t.last_step:
            t.last_step = job.step
            elapsed = max(1e-9, time.perf_counter() - t.started)
            events.append(JobProgress(job.job_id, job.step, job.total_steps or 0, job.stream.cursor.epoch,
                                      job.metrics.losses[-1], job.metrics.lrs[-1], job.metrics.num_tokens,
                                      job.metrics.num_tokens / elapsed))
        if t.child is not None:
            child = t.child.job
            if not child.is_done:
                return events
            self._unregister(t.child.job_id)
            t.child = None
            r = child.result  # type: ignore[union-attr]
            events.append(JobEvaluated(job.job_id, job.step, r.loss, r.accuracy))
        if not t.feed.at_boundary:
            return events
        if job.should_eval:
            ev = job.start_eval()
            t.child = JobFeed(ev, job.slot, parent=job.job_id)
            self._register(t.child)
            return events
        if job.should_checkpoint or (t.checkpoint_next and job.at_boundary and not job.is_done):
            t.checkpoint_next = False
            events.append(JobCheckpoint(job.job_id, job.step, dump_checkpoint(job)))
            if self.max_unstored_checkpoints:
                t.unstored += 1
                self._hold(t)
        if job.is_done:
            trained = job.finish()  # first: weights it refuses leave the job registered, to be failed
            self._unregister(job.job_id)
            del self._train[job.job_id]
            if t.install:
                self.install(job.adapter_id, trained)
            events.append(JobFinished(job.job_id, job.adapter_id, "succeeded", self._metrics(job),
                                      adapter=trained.to_bytes()))
        return events

    @staticmethod
    def _metrics(job: TrainingJob) -> dict[str, float]:
        m = job.metrics
        out = {"steps": float(job.step), "tokens": float(m.num_tokens)}
        if m.losses:
            out["loss"] = m.losses[-1]
        if m.evals:
            out["eval_loss"] = m.evals[-1][1].loss
            out["eval_token_accuracy"] = m.evals[-1][1].accuracy
        return out
