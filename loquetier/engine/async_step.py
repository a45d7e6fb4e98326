"""Asynchronous steps: the next step scheduled and queued on the device while the GPU runs this one.

Decode windows (``decode_window.py``) take the host off decode-only steps when nothing waits. Any
other inference step that replays a graph (a prompt chunk in it, a prompt waiting, windows off),
run alone, leaves the GPU idle for the host's whole per-step work: scheduling, the rows' layout and
sampling inputs before the replay, then the token read, bookkeeping, detokenizing and events after
it. Here a step ``N + 1`` is scheduled and queued while step ``N`` runs, and only then does the host
read ``N``'s tokens and apply them, so the GPU runs ``N + 1`` while the host applies ``N``:

- ``Scheduler.launch`` advances a queued step's sequences at once (``num_computed_tokens``); each
  token it samples is *pending* (``RequestState.num_pending``) until the host applies it.
- ``N + 1``'s decode rows whose token is pending take it from ``N``'s sampled tokens on the device
  (``DecodeGraphs.run``'s ``feed``); their KV slot holds ``PENDING_TOKEN`` in the block manager until
  the token is read (so no prefix-cache key is made of it).
- Stop checks run one step behind: a sequence that stops at ``N`` (EOS, a stop token or string) was
  already given a row in ``N + 1``; that row's token is dropped when ``N + 1`` is applied (the
  sequence is finished by then). ``max_tokens`` is known ahead: a sequence whose pending token is its
  last gets no further row. The tokens are exactly the step-at-a-time path's for greedy and seeded
  sampling; unseeded rows draw their seeds from the engine's generator in the same order, except
  that a row given a step after its stop draws for it (as in a window).

When ``N + 1`` may not be scheduled ahead (a job has work: training and evaluation steps run
eagerly; the free KV blocks may not cover a block for every running sequence, so scheduling could
preempt a sequence whose token is pending), the call applies ``N`` and returns its events at once,
and the next call schedules. When ``N + 1``, scheduled ahead, is not such a step (a decode window
can take it, or it runs eagerly), the call applies ``N`` and returns its events, and the next call
runs ``N + 1`` without the rows of sequences that stopped at ``N``. A step's tokens never wait for
a later step of the host's to finish (a training step takes a few hundred ms).

Invariants: at most two steps are in flight, and only between ``launch`` and the oldest one's
``land``; a landed step is reported to the scheduler as an ordinary step, its time the span from
its launch (or the previous step's landing, whichever is later) to its landing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from loquetier.engine.decode_window import DecodeWindow
from loquetier.engine.events import EngineEvent
from loquetier.engine.jobs import JobBook
from loquetier.engine.kv_cache import BlockManager
from loquetier.engine.postprocess import request_events
from loquetier.engine.requests import RequestBook
from loquetier.engine.runner import ModelRunner, WindowLaunch
from loquetier.engine.scheduling.scheduler import Launched, Scheduler
from loquetier.engine.sequence import ScheduledBatch, SequenceStatus, StepResult


@dataclass
class _InFlight:
    batch: ScheduledBatch
    launch: WindowLaunch
    launched: Launched
    at: float  # perf_counter when it was queued


class AsyncSteps:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, blocks: BlockManager,  # noqa: PLR0917
                 requests: RequestBook, jobs: JobBook, window: DecodeWindow, enabled: bool = True) -> None:
        self.scheduler, self.runner, self.blocks = scheduler, runner, blocks
        self.requests, self.jobs, self.window, self.enabled = requests, jobs, window, enabled
        self.num_launched = 0  # steps queued asynchronously (tests and benchmarks read it)
        self._flight: list[_InFlight] = []
        self._landed_at = 0.0

    @property
    def in_flight(self) -> bool:
        return bool(self._flight)

    def may_schedule_ahead(self) -> bool:
        """Whether the next step may be scheduled while the step in flight is not applied: no job has
        work, and the free KV blocks cover a new block for every running sequence (no preemption)."""
        return not self.jobs.has_work() and self.blocks.num_free_blocks >= len(self.scheduler.running)

    def takes(self, batch: ScheduledBatch) -> bool:
        """Whether ``batch`` runs as an asynchronous step: an inference step the graphs hold that no
        decode window could take."""
        return (self.enabled and self.runner.graphs is not None and self.runner.graph_step(batch)
                and not self.window.possible(batch))

    def launch(self, batch: ScheduledBatch) -> bool:
        """Queue ``batch`` on the device, fed by the step in flight; False (nothing queued, nothing
        changed) when the runner could not lay it out: the plain step path then runs it."""
        prev = self._flight[-1].launch if self._flight else None
        try:
            launch = self.runner.launch(batch, self.requests.sampling_inputs(batch), prev)
        except Exception:  # noqa: BLE001 - the plain path runs the step again and isolates its failure
            return False
        self._flight.append(_InFlight(batch, launch, self.scheduler.launch(batch), time.perf_counter()))
        self.num_launched += 1
        return True

    def need_landing(self) -> bool:
        """Whether a step besides the newest is in flight (the host applies it while the newest runs)."""
        return len(self._flight) > 1

    def land(self, clock: Callable[[], float]) -> list[EngineEvent]:
        """Read the oldest step in flight's tokens and apply them; its events. [] when none is."""
        if not self._flight:
            return []
        inf = self._flight.pop(0)
        (run,) = self.runner.collect(inf.launch)
        now = time.perf_counter()
        step_s = now - max(inf.at, self._landed_at)
        self._landed_at = now
        result = StepResult(clock(), step_s, run.sampled, {}, {})
        step_events = self.scheduler.postprocess(inf.batch, result, inf.launched)
        for seq in [c.seq for c in inf.batch.prefill_chunks] + inf.batch.decode_seqs:
            if seq.status is SequenceStatus.RUNNING and self.blocks.has_seq(seq.seq_id):
                if seq.seq_id in run.sampled:
                    self.blocks.set_token(seq.seq_id, seq.num_tokens - 1, seq.token_ids[-1])
                self.blocks.mark_computed(seq.seq_id, min(seq.num_computed_tokens, seq.num_tokens))
        return request_events(step_events, run.logprobs, self.requests, self.scheduler, clock)

    @staticmethod
    def running_only(batch: ScheduledBatch) -> ScheduledBatch:
        """``batch`` without the rows of sequences that finished since it was scheduled (a stop the
        landed step found)."""
        return replace(batch, decode_seqs=[s for s in batch.decode_seqs if s.status is SequenceStatus.RUNNING],
                       prefill_chunks=[c for c in batch.prefill_chunks if c.seq.status is SequenceStatus.RUNNING])
