"""ModelRunner: turns a ScheduledBatch into one packed forward (+ backward over training rows).

The runner reads no book: the step hands it the batch, the training pieces taken for it
(``StepPieces``) and what sampling needs of its requests (``SamplingInputs``)."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from loquetier.engine.config import EngineConfig
from loquetier.engine.graphs import DecodeGraphs, DecodeRow, Feed, PrefillRows
from loquetier.engine.job_feed import Piece, StepPieces
from loquetier.engine.kv_cache import BlockManager
from loquetier.engine.sampler import SamplerOutput, SamplingInputs, SamplingTensors, sample
from loquetier.engine.sequence import SamplingParams, ScheduledBatch
from loquetier.lora.manager import AdapterManager
from loquetier.models.batch import BatchBuilder
from loquetier.models.kv_cache import KVCache
from loquetier.models.llama import LlamaModel
from loquetier.models.loss import weighted_loss


@dataclass
class RunResult:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, float] = field(default_factory=dict)
    train_tokens: dict[str, int] = field(default_factory=dict)
    eval_tokens: dict[str, int] = field(default_factory=dict)
    pieces: list[tuple[Piece, float, int, int]] = field(default_factory=list)  # piece, loss_sum, count, correct


@dataclass
class WindowLaunch:
    """Decode steps queued on the device (``ModelRunner.launch_window`` / ``chain_window``): their
    rows, their sampled tokens still on the device (one tensor per step, in the logits' row order)
    and, once ``send`` ran, a copy of them on its way into pinned host memory."""

    seq_ids: list[Hashable]  # the rows, in the layout's (logits') order
    ids: list[str]
    params: list[SamplingParams]
    st: SamplingTensors  # the last step's sampling tensors
    want: bool  # logprobs
    tokens: list[torch.Tensor]
    logprobs: list[torch.Tensor]
    layout: int = 0  # the graphs' layout the steps continue (``DecodeGraphs.num_layouts``)
    generator_state: torch.Tensor | None = None  # before a chained window's draws (``DecodeWindow.drop_chained``)
    _host: tuple[torch.Tensor, torch.Tensor | None] | None = None
    _done: torch.cuda.Event | None = None

    def send(self) -> WindowLaunch:
        """Queue the copy of the tokens (and logprobs) into pinned host memory right behind the steps,
        so that the host can wait for these steps alone, not for steps queued after them."""
        tokens = torch.stack(self.tokens)
        if tokens.device.type != "cuda":
            return self
        logprobs = torch.stack(self.logprobs) if self.logprobs else None
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        host_logprobs = None
        if logprobs is not None:
            host_logprobs = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
            host_logprobs.copy_(logprobs, non_blocking=True)
        self._host, self._done = (host_tokens, host_logprobs), torch.cuda.Event()
        self._done.record()
        return self

    def receive(self) -> tuple[list[list[int]], list[list[float]] | None]:
        """The tokens (and logprobs) of every step, [step][row]; waits for these steps only."""
        if self._host is None:
            return (torch.stack(self.tokens).tolist(),
                    torch.stack(self.logprobs).tolist() if self.logprobs else None)
        assert self._done is not None
        self._done.synchronize()
        tokens, logprobs = self._host
        return tokens.tolist(), None if logprobs is None else logprobs.tolist()


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, blocks: BlockManager, adapters: AdapterManager,  # noqa: PLR0917
                 config: EngineConfig, graphs: DecodeGraphs | None = None) -> None:
        self.model, self.kv, self.blocks, self.adapters, self.config = model, kv, blocks, adapters, config
        self.graphs = graphs
        self.num_backward_rows = 0  # rows that entered autograd, summed over steps (tests read it)
        self.num_graph_steps = 0  # steps served by DecodeGraphs
        self.num_graph_prefill_steps = 0  # of those, steps with prefill chunks

    def _slot(self, adapter_id: str | None) -> int:
        if adapter_id is None:
            return -1
        slot = self.adapters.slot_of(adapter_id)
        if slot is None:
            raise RuntimeError(f"adapter {adapter_id!r} is scheduled but holds no slot")
        return slot

    def graph_step(self, batch: ScheduledBatch) -> bool:
        """An inference step the graphs hold: no training or eval rows, at most ``max_tokens`` rows
        (decode rows at most ``max_batch``), prompt rows reading few enough keys each."""
        g = self.graphs
        if g is None or batch.train_chunks or batch.eval_chunks:
            return False
        num_prefill = batch.num_prefill_tokens
        rows = num_prefill + len(batch.decode_seqs)
        if not 0 < rows <= g.max_tokens or len(batch.decode_seqs) > g.max_batch:
            return False
        return batch.num_prefill_row_reads <= g.max_mean_context * num_prefill

    def window_ready(self, batch: ScheduledBatch) -> bool:
        """Whether ``batch`` can start a decode window: decode rows only, replayed from a graph."""
        return not batch.prefill_chunks and self.graph_step(batch)

    def run(self, batch: ScheduledBatch, pieces: StepPieces, sampling: SamplingInputs,
            queue_updates: bool = True) -> RunResult:
        """One forward over ``batch``: its train and eval rows are ``pieces``' sequences, its prompt
        and decode rows sample with ``sampling``. With ``queue_updates`` the optimizer steps that the
        step's micro-batches complete are queued on the device before the step's losses are read
        (``TrainingJob.queue_update``); without (a retry of a part of a failed step, whose results
        may be dropped), the jobs make them when they account the results."""
        res = RunResult(train_tokens=dict(pieces.train_tokens), eval_tokens=dict(pieces.eval_tokens))
        if self.graph_step(batch):
            assert self.graphs is not None
            try:
                logits, seq_ids = self.graphs.run(self._graph_rows(batch))
            except RuntimeError as exc:  # a capture this torch / driver cannot do: plain steps from now on
                if batch.prefill_chunks and self.graphs.max_tokens > self.graphs.max_batch:
                    warnings.warn(f"CUDA graphs for prefill steps disabled: {exc}", stacklevel=2)
                    self.graphs.decode_only()  # decode-only steps keep their graphs
                else:
                    warnings.warn(f"CUDA graphs disabled: {exc}", stacklevel=2)
                    self.graphs = None
            else:
                self.num_graph_steps += 1
                self.num_graph_prefill_steps += int(bool(batch.prefill_chunks))
                if seq_ids:
                    self._sample(res, logits, seq_ids, sampling)
                return res
        b = BatchBuilder(self.config.block_size)
        for taken, add in ((pieces.train, b.add_train), (pieces.eval, b.add_eval)):
            for piece in taken:
                for s in piece.sequences:
                    add(s.token_ids, s.labels, slot=piece.feed.slot, group=piece.group)
        groups: list[Piece] = pieces.all  # one loss group per piece, in the order they were added
        # Rows of one adapter side by side: each adapter's rows form one SMLM segment (its A and B
        # tiles read once per 64 rows, not once per sequence), and a step's block count stays
        # within rows / 64 + adapters.
        for c in sorted(batch.prefill_chunks, key=lambda c: self._slot(c.seq.adapter_id)):
            seq = c.seq
            b.add_prefill(seq.seq_id, seq.token_ids[c.start : c.start + c.length], c.start,
                          self.blocks.block_table(seq.seq_id), slot=self._slot(seq.adapter_id),
                          needs_logits=c.is_final)
        for seq in sorted(batch.decode_seqs, key=lambda seq: self._slot(seq.adapter_id)):
            b.add_decode(seq.seq_id, seq.token_ids[-1], seq.num_computed_tokens,
                         self.blocks.block_table(seq.seq_id), slot=self._slot(seq.adapter_id))
        fb = b.build(self.model.device)
        training = fb.num_train > 0
        with torch.enable_grad() if training else torch.no_grad():
            out = self.model.forward(fb, self.kv)
            if training and out.loss_sum is not None:
                denoms = [max(1, p.micro_batch.num_target_tokens) if not p.feed.is_eval else 1 for p in groups]
                weighted_loss(out.loss_sum, torch.tensor(denoms, dtype=torch.float32)).backward()
                self.num_backward_rows += fb.num_train
        drawn = self._draw(out.logits, fb.logits_seq_ids, sampling) if out.logits is not None else None
        if training and queue_updates and out.loss_sum is not None:
            # the optimizer steps this step's micro-batches complete, queued before the reads below:
            # the last launches of the step (nothing after them can fail but the device)
            for g, p in enumerate(groups):
                p.feed.queue_update(p, out.loss_sum[g].detach())
        if out.loss_sum is not None and out.token_count is not None and out.correct is not None:
            # one read for the three (float64 holds each count and float32 sum exactly)
            sums, counts, correct = torch.stack([t.detach().double() for t in (
                out.loss_sum, out.token_count, out.correct)]).tolist()
            res.pieces = [(p, sums[g], int(counts[g]), int(correct[g])) for g, p in enumerate(groups)]
        if drawn is not None:
            self._read(res, *drawn)
        return res

    def _graph_rows(self, batch: ScheduledBatch) -> list[DecodeRow | PrefillRows]:
        """The graph rows of an inference step; a decode row whose token is pending (sampled by a step
        still on the device) holds token 0, which its feed replaces (``launch``)."""
        rows: list[DecodeRow | PrefillRows] = [
            PrefillRows(c.seq.seq_id, c.seq.token_ids[c.start : c.start + c.length], c.start,
                        self.blocks.block_table(c.seq.seq_id), self._slot(c.seq.adapter_id), c.is_final)
            for c in batch.prefill_chunks]
        rows += [DecodeRow(seq.seq_id, 0 if seq.num_pending else seq.token_ids[-1], seq.num_computed_tokens,
                           self.blocks.block_table(seq.seq_id), self._slot(seq.adapter_id))
                 for seq in batch.decode_seqs]
        return rows

    def launch(self, batch: ScheduledBatch, sampling: SamplingInputs, prev: WindowLaunch | None = None) -> WindowLaunch:
        """An inference step the graphs hold (``graph_step``), queued on the device with its tokens on
        their way to the host; ``collect`` waits for them. Its decode rows whose token is pending take
        it from ``prev``, the step queued before it, on the device."""
        assert self.graphs is not None and self.graph_step(batch)
        feed = None
        if prev is not None:
            index = {sid: i for i, sid in enumerate(prev.seq_ids)}
            feed = (prev.tokens[-1], {s.seq_id: index[s.seq_id] for s in batch.decode_seqs if s.num_pending})
        launch = self._queue(batch, sampling, feed=feed)
        self.num_graph_prefill_steps += int(bool(batch.prefill_chunks))
        return launch.send()

    def _queue(self, batch: ScheduledBatch, sampling: SamplingInputs, lookahead: int = 0,
               feed: Feed | None = None) -> WindowLaunch:
        """``batch``'s rows laid out and replayed from a graph (``DecodeGraphs.run``), its tokens sampled,
        all on the device: the first step of a launch, not yet sent to the host."""
        assert self.graphs is not None
        logits, seq_ids = self.graphs.run(self._graph_rows(batch), lookahead=lookahead, feed=feed)
        if not seq_ids:  # prompt chunks that end no prompt: nothing to sample
            empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
            return WindowLaunch([], [], [], SamplingTensors.build([], [], logits.device, None), False, [empty], [],
                                layout=self.graphs.num_layouts)
        ids, params, st, want = self._sampling(logits, seq_ids, sampling)
        out = sample(logits, st, want_logprobs=want)
        return WindowLaunch(list(seq_ids), ids, params, st, want, [out.token_ids],
                            [] if out.logprobs is None else [out.logprobs], layout=self.graphs.num_layouts)

    def run_window(self, batch: ScheduledBatch, num_steps: int, sampling: SamplingInputs) -> list[RunResult]:
        """``num_steps`` decode steps of ``batch``'s rows (decode rows only, graph-sized, KV reserved
        for every step) with one host synchronization: each step's sampled tokens stay on the device
        and feed the next step (``DecodeGraphs.advance``). Returns one result per step, every row
        in each: which of them the host keeps (a row may stop inside the window) is the caller's."""
        return self.collect(self.launch_window(batch, num_steps, sampling))

    def launch_window(self, batch: ScheduledBatch, num_steps: int, sampling: SamplingInputs) -> WindowLaunch:
        """``run_window`` up to its synchronization: the steps are queued on the device, their tokens
        on their way to the host; ``collect`` waits for them."""
        assert self.graphs is not None and self.window_ready(batch)
        launch = self._queue(batch, sampling, lookahead=num_steps - 1)
        self._steps(launch, num_steps - 1, sampling.generator)
        return launch.send()

    def chain_window(self, prev: WindowLaunch, num_steps: int,
                     generator: torch.Generator | None) -> WindowLaunch | None:
        """The ``num_steps`` steps after ``prev``'s, queued behind it on the device before the host has
        read ``prev``'s tokens: the same rows (the layout of ``prev``), fed ``prev``'s last tokens. The
        rows' block tables must already hold the blocks of every position these steps write. The
        generator's state before the new steps' draws is kept, so that a caller can undo them.
        None when the graphs laid out other rows since ``prev``."""
        assert num_steps > 0
        if self.graphs is None or self.graphs.num_layouts != prev.layout:
            return None
        self.graphs.extend([self.blocks.block_table(s) for s in prev.seq_ids])
        state = generator.get_state() if generator is not None else None
        launch = WindowLaunch(prev.seq_ids, prev.ids, prev.params, prev.st, prev.want, [prev.tokens[-1]], [],
                              layout=prev.layout, generator_state=state)
        self._steps(launch, num_steps, generator)
        launch.tokens = launch.tokens[1:]  # prev's last tokens fed the first step; they are prev's
        return launch.send()

    def _steps(self, launch: WindowLaunch, num_steps: int, generator: torch.Generator | None) -> None:
        assert self.graphs is not None
        for _ in range(num_steps):
            launch.st = launch.st.next_step(launch.params, generator)
            logits = self.graphs.advance(launch.tokens[-1])
            out = sample(logits, launch.st, want_logprobs=launch.want)
            launch.tokens.append(out.token_ids)
            if out.logprobs is not None:
                launch.logprobs.append(out.logprobs)

    def collect(self, launch: WindowLaunch) -> list[RunResult]:
        """Wait for a launched window's tokens (its one synchronization); one result per step."""
        host_tokens, host_logprobs = launch.receive()
        self.num_graph_steps += len(host_tokens)
        return [RunResult(sampled=dict(zip(launch.ids, host_tokens[j], strict=True)),
                          logprobs=dict(zip(launch.ids, host_logprobs[j], strict=True)) if host_logprobs else {})
                for j in range(len(host_tokens))]

    @staticmethod
    def _sampling(logits: torch.Tensor, seq_ids: Sequence[Hashable],
                  sampling: SamplingInputs) -> tuple[list[str], list[SamplingParams], SamplingTensors, bool]:
        ids = [str(s) for s in seq_ids]
        rows = [sampling.rows.get(i) for i in ids]
        if any(r is None for r in rows):
            raise RuntimeError("a logits row belongs to no known request")
        params = [r[0] for r in rows if r is not None]
        st = SamplingTensors.build(params, [r[1] for r in rows if r is not None], logits.device, sampling.generator)
        return ids, params, st, any(p.logprobs for p in params)

    @classmethod
    def _sample(cls, res: RunResult, logits: torch.Tensor, seq_ids: Sequence[Hashable],
                sampling: SamplingInputs) -> None:
        cls._read(res, *cls._draw(logits, seq_ids, sampling))

    @classmethod
    def _draw(cls, logits: torch.Tensor, seq_ids: Sequence[Hashable],
              sampling: SamplingInputs) -> tuple[list[str], SamplerOutput]:
        """The rows' tokens sampled on the device (``_read`` brings them to the host)."""
        ids, _, st, want = cls._sampling(logits, seq_ids, sampling)
        return ids, sample(logits, st, want_logprobs=want)

    @staticmethod
    def _read(res: RunResult, ids: list[str], sampled: SamplerOutput) -> None:
        res.sampled = dict(zip(ids, sampled.token_ids.tolist(), strict=True))
        if sampled.logprobs is not None:
            res.logprobs = dict(zip(ids, sampled.logprobs.tolist(), strict=True))
