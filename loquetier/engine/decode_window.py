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
the same order; a row that stops inside a window has drawn for its dropped steps too, so later
unseeded draws may differ from one step at a time's, not in their distribution). Each row's KV for
the whole window is reserved up front (``BlockManager.reserve``), so the device never writes outside
the row's own blocks; a window ends within ``max_model_len``.

Chained windows: the host's per-step work (applying tokens, stop checks, detokenizing, events) still
ran while the GPU waited. When a window's successor is known before its tokens are read (nothing
waits, no job has work, every row has two more steps left), ``run`` queues that successor on the
device right behind it (``ModelRunner.chain_window``: the same layout, fed the last sampled tokens,
its KV reserved, the rows' block tables grown), then reads the first window's tokens (a copy queued
before the successor, so the host waits for the first window only) and applies them while the GPU
runs the second. The next step takes the chained window when it is exactly that window (the same
rows at the expected positions, the same length, the graphs' layout untouched); otherwise it is
dropped: its results are ignored, its unseeded draws undone (``drop_chained``). Tokens are those of
unchained windows either way (``tests/engine/test_decode_window.py``).

Invariants: a window starts only from a step the scheduler planned as decode-only and the runner
would replay from a graph; its steps are reported to the scheduler one by one, each with an equal
share of the window's time, so the step-time model and the SLO accounting see ordinary steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from loquetier.engine.events import EngineEvent
from loquetier.engine.jobs import JobBook
from loquetier.engine.kv_cache import BlockManager
from loquetier.engine.postprocess import request_events
from loquetier.engine.requests import RequestBook
from loquetier.engine.runner import ModelRunner, RunResult, WindowLaunch
from loquetier.engine.scheduling.scheduler import Scheduler
from loquetier.engine.sequence import RequestState, ScheduledBatch, StepResult


@dataclass
class _Chained:
    """A window queued behind the one the host is applying: its steps, their count, and each row's
    computed tokens when it would start (what the next scheduled step must hold to take it)."""

    launch: WindowLaunch
    num_steps: int
    starts: dict[Hashable, int]


class DecodeWindow:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, blocks: BlockManager,  # noqa: PLR0917
                 requests: RequestBook, jobs: JobBook, max_steps: int, max_model_len: int,
                 chain: bool = True) -> None:
        self.scheduler, self.runner, self.blocks = scheduler, runner, blocks
        self.requests, self.jobs = requests, jobs
        self.max_steps, self.max_model_len, self.chain = max_steps, max_model_len, chain
        self.num_windows = 0  # windows of two steps or more (tests and benchmarks read it)
        self.num_chained = 0  # windows queued behind another and then taken (tests and benchmarks read it)
        self.num_dropped = 0  # windows queued behind another and then dropped
        self._chained: _Chained | None = None

    def possible(self, batch: ScheduledBatch) -> bool:
        """Whether ``batch`` could start a window: decode rows only, replayed from a graph, nothing
        waiting and no job with work (``size`` then says how long, from the rows' tokens and KV)."""
        return not (self.max_steps <= 1 or not batch.decode_seqs or batch.prefill_chunks or batch.train_chunks
                    or batch.eval_chunks or self.scheduler.waiting or self.jobs.has_work()
                    or not self.runner.window_ready(batch))

    def size(self, batch: ScheduledBatch) -> int:
        """How many steps ``batch`` can run as one window (1: a plain step)."""
        return self._reserve(batch.decode_seqs, 0) if self.possible(batch) else 1

    def _reserve(self, seqs: list[RequestState], ahead: int) -> int:
        """How many steps ``seqs`` can run once ``ahead`` more are done (up to ``max_steps``; none past
        every row's last token, none past the context), with every row's KV for them reserved; 1 (a
        plain step, nothing reserved) when that is one step or less, or the free blocks fall short."""
        k = min(self.max_steps, max(s.sampling.max_tokens - s.num_output_tokens - ahead for s in seqs))
        k = min(k, *(self.max_model_len - s.num_computed_tokens - ahead for s in seqs))
        if k <= 1:
            return 1
        ends = {s.seq_id: s.num_computed_tokens + ahead + k for s in seqs}
        need = sum(max(0, self.blocks.blocks_needed(end) - len(self.blocks.block_table(sid)))
                   for sid, end in ends.items())
        if need > self.blocks.num_free_blocks:
            return 1
        for sid, end in ends.items():
            reserved = self.blocks.reserve(sid, end)
            assert reserved
        return k

    def run(self, batch: ScheduledBatch, num_steps: int, clock: Callable[[], float]) -> list[EngineEvent]:
        """Run the window and apply its steps in order; returns their events. The next window, when
        its rows and length are known now, is queued on the device first, so the GPU runs it while
        the host applies this one (``chain``); the next step takes it if it is that window."""
        start, t0 = clock(), time.perf_counter()
        launch = self._take_chained(batch, num_steps)
        if launch is None:
            self.drop_chained()
            launch = self.runner.launch_window(batch, num_steps, self.requests.sampling_inputs(batch))
        else:
            self.num_chained += 1
        self._chain_after(batch, launch, num_steps)
        runs = self.runner.collect(launch)
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

    def drop_chained(self) -> None:
        """Forget the window queued behind the last one, if any (the next step is not it, or the graphs'
        inputs are rewritten): its steps run out on the device and are ignored, the draws of its
        unseeded rows are undone, and its rows keep the KV blocks it reserved. (The weights it reads
        cannot change under it: an adapter that running rows use is neither reloaded nor unloaded.)"""
        chained, self._chained = self._chained, None
        if chained is None:
            return
        chained.launch.receive()  # its K/V writes land before any later step's
        generator = self.requests.generator
        if chained.launch.generator_state is not None:
            generator.set_state(chained.launch.generator_state)
        self.num_dropped += 1

    def _take_chained(self, batch: ScheduledBatch, num_steps: int) -> WindowLaunch | None:
        """The chained window, when ``batch`` (a window of ``num_steps``) is exactly it."""
        chained = self._chained
        graphs = self.runner.graphs
        if chained is None or chained.num_steps != num_steps or len(batch.decode_seqs) != len(chained.starts):
            return None
        if graphs is None or graphs.num_layouts != chained.launch.layout:
            return None
        if any(chained.starts.get(s.seq_id) != s.num_computed_tokens for s in batch.decode_seqs):
            return None
        self._chained = None
        return chained.launch

    def _chain_after(self, batch: ScheduledBatch, launch: WindowLaunch, num_steps: int) -> None:
        """Queue the window after ``launch`` (``num_steps`` steps of ``batch``'s rows) when nothing else
        can come first: no prompt waits, no job has work, and every row has tokens left for two more
        steps at least; its KV blocks are reserved now."""
        seqs = batch.decode_seqs
        if not self.chain or self.scheduler.waiting or self.jobs.has_work():
            return
        k = self._reserve(seqs, num_steps)
        if k <= 1:
            return
        chained = self.runner.chain_window(launch, k, self.requests.generator)
        if chained is not None:
            self._chained = _Chained(chained, k, {s.seq_id: s.num_computed_tokens + num_steps for s in seqs})

    def _apply(self, step: ScheduledBatch, run: RunResult, now: float, step_s: float,  # noqa: PLR0917
               clock: Callable[[], float]) -> list[EngineEvent]:
        step_events = self.scheduler.postprocess(step, StepResult(now, step_s, run.sampled, {}, {}))
        for seq in step.decode_seqs:
            if self.blocks.has_seq(seq.seq_id):
                self.blocks.mark_computed(seq.seq_id, seq.num_computed_tokens)
        return request_events(step_events, run.logprobs, self.requests, self.scheduler, clock)
