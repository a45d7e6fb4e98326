"""Decode windows: several decode-only graph steps on the device with one host synchronization.

Once every running sequence decodes and nothing waits (no prompt to admit, no job with work), the
next steps are known in advance: the same rows, one token each. A window of ``k`` steps then runs
them back to back: the first step lays out the rows as usual (``DecodeGraphs.run``), each later
step feeds the tokens the previous one sampled, still on the device, at the next positions
(``DecodeGraphs.advance``), and the host reads all ``k`` steps' tokens with one synchronization.
The host's per-step work (scheduling, input layout, the sampled-token copy, bookkeeping) is paid
once per window instead of once per step, and the GPU does not wait for it between the steps.

The tokens are then applied step by step, exactly as ``k`` separate steps would apply them:
``Scheduler.continue_decode`` re-forms each step from the rows still running, so a sequence that
stops inside the window (EOS, a stop token or string, ``max_tokens``) keeps the tokens up to its
stop and none after; its later rows were computed and are dropped. Tokens are the same as the
step-at-a-time path's for greedy and seeded sampling (both are functions of the logits, the seed
and the token's index; unseeded rows draw their seeds from the engine's generator step by step, in
the same order). Each row's KV for the whole window is reserved up front (``BlockManager.reserve``),
so the device never writes outside the row's own blocks; a window ends within ``max_model_len``.

Invariants: a window starts only from a step the scheduler planned as decode-only and the runner
would replay from a graph; its steps are reported to the scheduler one by one, each with an equal
share of the window's time, so the step-time model and the SLO accounting see ordinary steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from loquetier.engine.events import EngineEvent
from loquetier.engine.jobs import JobBook
from loquetier.engine.kv_cache import BlockManager
from loquetier.engine.postprocess import request_events
from loquetier.engine.requests import RequestBook
from loquetier.engine.runner import ModelRunner, RunResult
from loquetier.engine.scheduling.scheduler import Scheduler
from loquetier.engine.sequence import ScheduledBatch, StepResult


class DecodeWindow:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, blocks: BlockManager,  # noqa: PLR0917
                 requests: RequestBook, jobs: JobBook, max_steps: int, max_model_len: int) -> None:
        self.scheduler, self.runner, self.blocks = scheduler, runner, blocks
        self.requests, self.jobs = requests, jobs
        self.max_steps, self.max_model_len = max_steps, max_model_len
        self.num_windows = 0  # windows of two steps or more (tests and benchmarks read it)

    def size(self, batch: ScheduledBatch) -> int:
        """How many steps ``batch`` can run as one window (1: a plain step)."""
        seqs = batch.decode_seqs
        if (self.max_steps <= 1 or not seqs or batch.prefill_chunks or batch.train_chunks or batch.eval_chunks
                or self.scheduler.waiting or self.jobs.has_work() or not self.runner.window_ready(batch)):
            return 1
        # no step past every row's last token, none past the context
        k = min(self.max_steps, max(s.sampling.max_tokens - s.num_output_tokens for s in seqs))
        k = min(k, *(self.max_model_len - s.num_computed_tokens for s in seqs))
        if k <= 1:
            return 1
        need = sum(max(0, self.blocks.blocks_needed(s.num_computed_tokens + k) - len(self.blocks.block_table(s.seq_id)))
                   for s in seqs)
        if need > self.blocks.num_free_blocks:
            return 1
        for s in seqs:
            reserved = self.blocks.reserve(s.seq_id, s.num_computed_tokens + k)
            assert reserved
        return k

    def run(self, batch: ScheduledBatch, num_steps: int, clock: Callable[[], float]) -> list[EngineEvent]:
        """Run the window and apply its steps in order; returns their events."""
        start, t0 = clock(), time.perf_counter()
        runs = self.runner.run_window(batch, num_steps, self.requests.sampling_inputs(batch))
        step_s = (time.perf_counter() - t0) / num_steps
        self.num_windows += 1
        events: list[EngineEvent] = []
        step = batch
        for j, run in enumerate(runs):
            if j:
                step = self.scheduler.continue_decode(step, start + j * step_s)
                if not step.decode_seqs:
                    break
            events += self._apply(step, run, start + (j + 1) * step_s, step_s, clock)
        return events

    def _apply(self, step: ScheduledBatch, run: RunResult, now: float, step_s: float,  # noqa: PLR0917
               clock: Callable[[], float]) -> list[EngineEvent]:
        step_events = self.scheduler.postprocess(step, StepResult(now, step_s, run.sampled, {}, {}))
        for seq in step.decode_seqs:
            if self.blocks.has_seq(seq.seq_id):
                self.blocks.mark_computed(seq.seq_id, seq.num_computed_tokens)
        return request_events(step_events, run.logprobs, self.requests, self.scheduler, clock)
