"""Decode steps replayed from CUDA graphs.

A decode-only step (no training, evaluation or prefill rows) of the 8B shape launches about
1,400 kernels; launching them from Python costs more than the GPU work. ``DecodeGraphs``
captures the decode forward once per batch-size bucket (1, 2, 4, 8, 16, 24, ... up to
``max_num_seqs``), in two variants: with the SMLM launches (some row has an adapter) and
without them (every row on the base model). A step then copies its rows into the static
input buffers and replays one graph.

What makes the forward replayable:
- every input is a view of one static buffer: token ids, positions, KV slot mapping, context
  lengths, block tables, adapter slots and the SMLM row-block schedule;
- every launch size is fixed per bucket: the SMLM grids walk ``bucket`` row blocks (blocks
  past the step's real segments are empty and exit at once), paged decode attention splits
  the context as if it were ``max_model_len`` long (partitions past a row's context are empty);
- rows past the step's batch ("padding") decode token 0 at position 0 and write their K/V into
  a scratch block that the block manager never hands out; their logits are dropped;
- the LoRA slot pool never moves (loading copies into fixed slots), so the captured pointers
  stay valid across adapter loads.

All graphs share one memory pool and write their logits into one [max_batch, vocab] buffer, so
they hold about one forward's activations together, whatever the number of buckets.

Rows are sorted by adapter slot before they are laid out, so each adapter's rows form one
segment. ``mode="eager"`` runs the same static, padded forward without capturing (CPU tests
and debugging); ``mode="capture"`` needs CUDA and the Triton paged-decode kernel.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from loquetier.engine.kv_cache import KVCache
from loquetier.kernels import SMLMMeta
from loquetier.kernels.meta import FWD_BLOCK_ROWS, row_blocks, segments_of
from loquetier.kernels.ops import backend_for
from loquetier.models.attention import decode_uses_triton
from loquetier.models.batch import ForwardBatch, PagedMeta, VarlenMeta
from loquetier.models.llama import LlamaModel

_SEG_ROWS = 16  # the SMLM kernels' row tile for captured decode graphs (they loop over longer segments)


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to ``max_batch`` (and ``max_batch`` itself)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, max_batch, 8))
    return [*sizes, max_batch]


@dataclass(frozen=True)
class DecodeRow:
    seq_id: Hashable
    token_id: int
    position: int
    block_table: Sequence[int]
    slot: int  # adapter slot, -1 = base model


class DecodeGraphs:
    def __init__(  # noqa: PLR0917
        self,
        model: LlamaModel,
        kv: KVCache,
        max_batch: int,
        max_model_len: int,
        scratch_block: int,
        mode: str = "capture",
    ) -> None:
        if mode not in ("capture", "eager"):
            raise ValueError(f"mode must be 'capture' or 'eager', got {mode!r}")
        if mode == "capture" and model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if not 0 <= scratch_block < kv.num_blocks:
            raise ValueError(f"scratch block {scratch_block} outside the KV cache's {kv.num_blocks} blocks")
        self.model, self.kv, self.mode = model, kv, mode
        self._triton_decode = decode_uses_triton(model.attn_impl, model.device)
        if mode == "capture" and not self._triton_decode:
            raise ValueError("CUDA graphs need the Triton paged-decode kernel (attn_impl 'auto' or 'triton')")
        self.buckets = bucket_sizes(max_batch)
        self.max_batch, self.max_model_len = max_batch, max_model_len
        self.block_size, self.scratch_block = kv.block_size, scratch_block
        self.max_blocks = -(-max_model_len // kv.block_size)
        dev, n = model.device, max_batch
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(n, dtype=i64, device=dev)
        self.positions = torch.zeros(n, dtype=i64, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=i64, device=dev)
        self.context_lens = torch.ones(n, dtype=i32, device=dev)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=i32, device=dev)
        self.token_slots = torch.full((n,), -1, dtype=i32, device=dev)
        self.blocks = torch.zeros(n, 3, dtype=i32, device=dev)  # (row_start, row_end, slot); empty = (0, 0, 0)
        self.q_cu = torch.arange(n + 1, dtype=i32, device=dev)
        self.logits_rows = torch.arange(n, dtype=i64, device=dev)
        self._empty_i32 = torch.zeros(0, dtype=i32, device=dev)
        self._empty_i64 = torch.zeros(0, dtype=i64, device=dev)
        self._no_rows = VarlenMeta(torch.zeros(1, dtype=i32, device=dev), 0, ())
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: object | None = None
        self._logits: torch.Tensor | None = None
        self._host: tuple[list[int], list[list[int]]] = ([], [])  # last _fill's context lengths, tables
        self.num_replays = 0
        self.num_captures = 0

    # -- public ------------------------------------------------------------------------------------
    def bucket_for(self, num_rows: int) -> int | None:
        return next((b for b in self.buckets if b >= num_rows), None)

    def run(self, rows: Sequence[DecodeRow]) -> tuple[torch.Tensor, list[Hashable]]:
        """Logits [len(rows), V] fp32 of a decode-only step, and the seq id of each logits row."""
        bucket = self.bucket_for(len(rows))
        if bucket is None or not rows:
            raise ValueError(f"{len(rows)} decode rows: graphs hold 1..{self.max_batch}")
        ordered = sorted(rows, key=lambda r: r.slot)  # one segment per adapter
        if self.mode == "capture" and any(r.slot >= 0 for r in ordered) and \
                backend_for(self.model.device).name != "triton":
            # the torch reference walks host segments, which a replayed graph would not update
            raise RuntimeError("decode graphs with adapters need the Triton SMLM kernels")
        segments = self._fill(ordered, bucket)
        with_lora = bool(segments)
        if self.mode == "eager":
            logits = self._forward(bucket, with_lora, ordered, segments)
        else:
            key = (bucket, with_lora)
            if key not in self._graphs:
                self._graphs[key] = self._capture(bucket, with_lora)
            graph, logits = self._graphs[key]
            graph.replay()
            self.num_replays += 1
        return logits[: len(ordered)], [r.seq_id for r in ordered]

    def capture_all(self) -> int:
        """Capture every bucket, both variants, largest first (so the shared memory pool is sized by
        the largest graph); returns how many graphs were captured now."""
        if self.mode != "capture":
            return 0
        before = self.num_captures
        self._fill([], self.max_batch)  # every row a padding row
        variants = (True, False) if backend_for(self.model.device).name == "triton" else (False,)
        for bucket in reversed(self.buckets):
            for with_lora in variants:
                if (bucket, with_lora) not in self._graphs:
                    self._graphs[(bucket, with_lora)] = self._capture(bucket, with_lora)
        return self.num_captures - before

    # -- layout ------------------------------------------------------------------------------------
    def _fill(self, rows: Sequence[DecodeRow], bucket: int) -> list[tuple[int, int, int]]:
        """Write the rows (then padding up to ``bucket``) into the static buffers; one host-to-device
        copy per buffer. Returns the adapter segments (start, length, slot)."""
        n, bs, width = len(rows), self.block_size, self.max_blocks
        scratch = self.scratch_block
        ids = [r.token_id for r in rows] + [0] * (bucket - n)
        pos = [r.position for r in rows] + [0] * (bucket - n)
        slots = [r.slot for r in rows] + [-1] * (bucket - n)
        mapping, ctx, tables = [], [], []
        for r in rows:
            if r.position >= self.max_model_len:
                raise ValueError(f"position {r.position} is past max_model_len {self.max_model_len}")
            used = r.position // bs + 1  # blocks holding keys [0, position]
            table = list(r.block_table[:used])
            if len(table) < used:
                raise ValueError(f"block table of {len(table)} blocks cannot hold position {r.position}")
            mapping.append(table[-1] * bs + r.position % bs)
            ctx.append(r.position + 1)
            tables.append(table)
        # Only the first `cols` columns are written: a row never reads a column past its context.
        cols = min(width, max((len(t) for t in tables), default=1))
        tables = [t + [scratch] * (cols - len(t)) for t in tables] + [[scratch] * cols] * (bucket - n)
        mapping += [scratch * bs] * (bucket - n)
        ctx += [1] * (bucket - n)
        segments, _ = segments_of(slots[:n])
        blocks = row_blocks(segments, FWD_BLOCK_ROWS)
        blocks += [(0, 0, 0)] * (bucket - len(blocks))
        host_i64 = torch.tensor([ids, pos, mapping], dtype=torch.int64)
        host_i32 = torch.tensor([ctx, slots], dtype=torch.int32)
        self.input_ids[:bucket].copy_(host_i64[0], non_blocking=True)
        self.positions[:bucket].copy_(host_i64[1], non_blocking=True)
        self.slot_mapping[:bucket].copy_(host_i64[2], non_blocking=True)
        self.context_lens[:bucket].copy_(host_i32[0], non_blocking=True)
        self.token_slots[:bucket].copy_(host_i32[1], non_blocking=True)
        self.block_tables[:bucket, :cols].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        self.blocks[:bucket].copy_(torch.tensor(blocks, dtype=torch.int32), non_blocking=True)
        self._host = (ctx, tables)
        return segments

    def _batch(self, bucket: int, with_lora: bool, rows: Sequence[DecodeRow] | None,
               segments: list[tuple[int, int, int]]) -> ForwardBatch:
        """A ForwardBatch over the static buffers. Host fields that size launches are fixed per bucket
        when capturing; ``rows`` (eager mode) gives the reference paths the real host values."""
        eager = rows is not None
        host_segments = tuple(segments) if eager else ((0, 1, 0),) if with_lora else ()
        meta = SMLMMeta(
            token_slots=self.token_slots[:bucket],
            seg_starts=self._empty_i32, seg_lens=self._empty_i32, seg_slots=self._empty_i32,
            blocks=self.blocks[:bucket], grad_blocks=self.blocks[:0],
            num_tokens=bucket, num_train_tokens=0, num_train_segments=0,
            max_seg_len=_SEG_ROWS, num_blocks=bucket if with_lora else 0, num_train_blocks=0, num_grad_blocks=0,
            host_segments=host_segments,
        )
        if eager and not self._triton_decode:  # the reference attention reads the real host tables
            ctx, tables = self._host
        else:  # the Triton kernel reads device tensors only; its launch is sized for max_model_len
            ctx, tables = [self.max_model_len] * bucket, []
        paged = PagedMeta(
            q_cu_seqlens=self.q_cu[: bucket + 1],
            context_lens=self.context_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            slot_mapping=self.slot_mapping[:bucket],
            max_q_len=1,
            max_context_len=max(ctx),
            num_prefill_seqs=0,
            host_q_lens=(1,) * bucket,
            host_context_lens=tuple(ctx),
            host_block_tables=tuple(tuple(t) for t in tables),
        )
        return ForwardBatch(
            input_ids=self.input_ids[:bucket], positions=self.positions[:bucket], meta=meta,
            num_train=0, num_eval=0, num_prefill=0, num_decode=bucket,
            train=self._no_rows, eval=self._no_rows, paged=paged,
            labels=self._empty_i64, loss_groups=self._empty_i64, group_keys=(),
            logits_indices=self.logits_rows[:bucket],
            logits_seq_ids=tuple(range(bucket)),
        )

    def _forward(self, bucket: int, with_lora: bool, rows: Sequence[DecodeRow] | None,
                 segments: list[tuple[int, int, int]]) -> torch.Tensor:
        with torch.no_grad():
            out = self.model.forward(self._batch(bucket, with_lora, rows, segments), self.kv)
        assert out.logits is not None
        return out.logits

    def _capture(self, bucket: int, with_lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (compiles every kernel) on a side stream, then capture. The static buffers hold
        this step's rows; running them twice more is harmless (same K/V written again)."""
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(bucket, with_lora, None, [])
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        if self._logits is None:  # one output buffer for every graph, outside the graph pool
            self._logits = torch.empty(self.max_batch, self.model.cfg.vocab_size, dtype=torch.float32,
                                       device=self.model.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._logits[:bucket].copy_(self._forward(bucket, with_lora, None, []))
        # the forward's own tensors are free again: the next capture reuses their pool memory, so
        # the graphs together hold about one forward's activations, not one per bucket
        self._pool = graph.pool()
        self.num_captures += 1
        return graph, self._logits[:bucket]
