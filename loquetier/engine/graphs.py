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

Inference steps with prefill chunks replay graphs too (``max_tokens`` > ``max_batch``): every
prompt token is laid out as one more row with its own position and context length, exactly like a
decode row, so the paged-decode kernel attends each one over the keys up to its position (the K/V of
the whole step is written before attention in each layer). Buckets past ``max_batch`` grow by about
1.5x up to ``max_tokens``; logits are taken only for rows that end a prompt or decode, through a
static index buffer of ``max_batch`` rows. Attended row by row, each prompt row reads its whole
context, so decode-sized buckets take prompt rows that average at most ``GRAPH_MAX_MEAN_CONTEXT``
keys. Buckets past ``max_batch`` attend in tiles (``paged_tiles``): each chunk's rows in tiles of
``tile_rows`` consecutive rows (a decode row, a tile of its own), every key read once per tile, from
a static tile list whose unused entries exit at once; there prompt rows may average up to
``AttnTuning.graph_tile_mean_context`` keys, and a step with deeper prompt rows than a decode-sized
bucket takes is laid out in the smallest bucket past ``max_batch`` (its padding rows cost the GEMMs
little: they read the same weights). Steps deeper still run eagerly (FlashAttention's job).

Rows are sorted by adapter slot before they are laid out, so each adapter's rows form one
segment. ``mode="eager"`` runs the same static, padded forward without capturing (CPU tests
and debugging); ``mode="capture"`` needs CUDA and the Triton paged-decode kernel.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from loquetier.engine.sequence import prefill_kv_reads
from loquetier.kernels import SMLMMeta
from loquetier.kernels.meta import row_blocks, segments_of
from loquetier.kernels.model_ops import graph_attention_tiles
from loquetier.kernels.ops import backend_for, graph_tiling, overlap_scope
from loquetier.models.attention import decode_uses_triton
from loquetier.models.batch import ForwardBatch, PagedMeta, VarlenMeta
from loquetier.models.kv_cache import KVCache
from loquetier.models.llama import LlamaModel

Feed = tuple[torch.Tensor, dict[Hashable, int]]  # tokens on the device, and the index of each seq's token


class _Group(NamedTuple):
    """One decode row or prefill chunk: consecutive rows of one sequence."""

    seq_id: Hashable
    tokens: Sequence[int]
    start: int  # position of tokens[0]
    block_table: Sequence[int]
    slot: int
    needs_logits: bool
    prompt: bool  # a prefill chunk (else a decode row)


_SEG_ROWS = 16  # the SMLM kernels' row tile in captured decode graphs, and the longest row block they lay out


GRAPH_MAX_MEAN_CONTEXT = 256  # prompt rows of a graph step read at most this many keys each, on average


def bucket_sizes(max_batch: int, max_tokens: int | None = None) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to ``max_batch`` (and ``max_batch`` itself); past it,
    steps of about 1.5x (multiples of 64) up to ``max_tokens`` (and ``max_tokens`` itself)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, max_batch, 8))
    sizes.append(max_batch)
    top = max_batch if max_tokens is None else max_tokens
    size = max_batch
    while size < top:
        size = max(size + 64, -(-int(size * 1.5) // 64) * 64)
        if size >= top or (top - size) * 4 < size:  # no bucket just under the top one
            size = top
        sizes.append(size)
    return sizes


@dataclass(frozen=True)
class DecodeRow:
    seq_id: Hashable
    token_id: int
    position: int
    block_table: Sequence[int]
    slot: int  # adapter slot, -1 = base model


@dataclass(frozen=True)
class PrefillRows:
    """A prefill chunk: ``token_ids`` at positions ``start, start + 1, ...`` of one sequence."""

    seq_id: Hashable
    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]
    slot: int  # adapter slot, -1 = base model
    needs_logits: bool  # the chunk ends the prompt: its last row is sampled


class HostStaging:
    """A step's host inputs gathered in one pinned buffer and sent to the device in one asynchronous
    copy, then spread over their device buffers by device-side copies (casting where the target's
    dtype differs). Copies from pageable memory would each make the host wait for the stream.

    Invariant: the pinned buffer is rewritten only after the previous copy out of it completed
    (an event recorded after the copy; by then it has always run, as the host has read the sampled
    tokens since). On a CPU device the values are copied straight into their targets."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.is_pinned = device.type == "cuda"
        self.host = torch.empty(capacity, dtype=torch.int64, pin_memory=self.is_pinned)
        self.device = torch.empty(capacity if self.is_pinned else 0, dtype=torch.int64, device=device)
        self._copied = torch.cuda.Event() if self.is_pinned else None
        self._parts: list[tuple[int, int, torch.Tensor]] = []
        self._used = 0

    def begin(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()
        self._parts, self._used = [], 0

    def put(self, values: torch.Tensor, target: torch.Tensor) -> None:
        """``values`` (host, ``target``'s shape) to land in ``target`` (device) at :meth:`flush`."""
        num = values.numel()
        if num != target.numel() or self._used + num > self.host.numel():
            raise ValueError(f"{num} values for a target of {target.numel()} ({self._used} of "
                             f"{self.host.numel()} staged)")
        self.host[self._used : self._used + num].copy_(values.reshape(-1))
        self._parts.append((self._used, num, target))
        self._used += num

    def flush(self) -> None:
        if not self.is_pinned:
            for start, num, target in self._parts:
                target.copy_(self.host[start : start + num].view(target.shape))
            return
        assert self._copied is not None
        self.device[: self._used].copy_(self.host[: self._used], non_blocking=True)
        self._copied.record()
        for start, num, target in self._parts:
            target.copy_(self.device[start : start + num].view(target.shape))


class DecodeGraphs:
    def __init__(  # noqa: PLR0917
        self,
        model: LlamaModel,
        kv: KVCache,
        max_batch: int,
        max_model_len: int,
        scratch_block: int,
        mode: str = "capture",
        max_tokens: int | None = None,
        max_segments: int | None = None,
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
        self.max_tokens = max(max_batch, max_tokens or max_batch)  # rows of the largest bucket
        self.buckets = bucket_sizes(max_batch, self.max_tokens)
        self.max_batch, self.max_model_len = max_batch, max_model_len
        # adapter segments a step can have (rows are sorted by slot: one per slot in use); None: any
        self.max_segments = max_segments
        self.block_size, self.scratch_block = kv.block_size, scratch_block
        self.max_blocks = -(-max_model_len // kv.block_size)
        dev, n = model.device, self.max_tokens
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(n, dtype=i64, device=dev)
        self.positions = torch.zeros(n, dtype=i64, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=i64, device=dev)
        self.context_lens = torch.ones(n, dtype=i32, device=dev)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=i32, device=dev)
        self.token_slots = torch.full((n,), -1, dtype=i32, device=dev)
        self.blocks = torch.zeros(n, 3, dtype=i32, device=dev)  # (row_start, row_end, slot); empty = (0, 0, 0)
        self.q_cu = torch.arange(n + 1, dtype=i32, device=dev)
        self.logits_rows = torch.zeros(max_batch, dtype=i64, device=dev)  # rows whose logits are taken
        self.fed = torch.zeros(max_batch, 2, dtype=i64, device=dev)  # (row, index): decode rows fed on the device
        self._empty_i32 = torch.zeros(0, dtype=i32, device=dev)
        self._empty_i64 = torch.zeros(0, dtype=i64, device=dev)
        self._no_rows = VarlenMeta(torch.zeros(1, dtype=i32, device=dev), 0, ())
        self._set_tiles()  # the attention tiles of buckets past max_batch, and the staging buffer
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: object | None = None
        self._logits: torch.Tensor | None = None
        self._host: tuple[list[int], list[list[int]]] = ([], [])  # last _fill's context lengths, tables
        # the last run's layout: (bucket, with adapters, adapter segments, rows), what advance() replays
        self._current: tuple[int, bool, list[tuple[int, int, int]], int] = (0, False, [], 0)
        self.num_replays = 0
        self.num_captures = 0
        self.num_layouts = 0  # rows laid out so far (run, capture): what advance() continues is the last
        self.num_tiled_layouts = 0  # of those, layouts whose attention runs in tiles (tests read it)

    # -- public ------------------------------------------------------------------------------------
    @property
    def max_mean_context(self) -> int:
        """The mean keys the prompt rows of a step may read for the step to replay a graph."""
        return max(GRAPH_MAX_MEAN_CONTEXT, self._tile_mean_context) if self.tile_rows else GRAPH_MAX_MEAN_CONTEXT

    def _set_tiles(self) -> None:
        """Rows of an attention tile in buckets past ``max_batch`` (0: rows attended one by one) and
        their key budget, from the kernels' tuning; the tile list and the staging buffer sized by them."""
        cfg, dev, n = self.model.cfg, self.model.device, self.max_tokens
        self.tile_rows, self._tile_mean_context = graph_attention_tiles(cfg.num_heads, cfg.num_kv_heads) \
            if self._triton_decode and n > self.max_batch else (0, 0)
        self.tiles = torch.zeros(self._num_tiles(n), 2, dtype=torch.int32, device=dev)  # (first row, rows)
        # every input of a step in one pinned buffer: one asynchronous copy, no host synchronization
        self._staging = HostStaging(n * (6 + self.max_blocks) + 3 * self.max_batch + 2 * self.tiles.shape[0], dev)

    def _tiled(self, bucket: int) -> bool:
        return bool(self.tile_rows) and bucket > self.max_batch

    def _num_tiles(self, bucket: int) -> int:
        """Entries of a bucket's tile list: its rows over the tile, plus one per group (sequence: at most
        ``max_batch``) whose last tile is short, plus the padding rows' short tile; 0 untiled."""
        if not self._tiled(bucket):
            return 0
        return bucket // self.tile_rows + self.max_batch + 1

    def decode_only(self) -> None:
        """Stop serving prefill steps (their buckets are dropped; decode buckets and graphs stay)."""
        self.max_tokens = self.max_batch
        self._set_tiles()
        self.buckets = [b for b in self.buckets if b <= self.max_batch]
        self._graphs = {k: v for k, v in self._graphs.items() if k[0] <= self.max_batch}

    def drop(self) -> None:
        """Forget every captured graph and their memory pool; buckets are captured again on demand
        (or by ``capture_all``). For switches a graph keeps from its capture: the fused kernels, the
        SMLM paths, the LoRA overlap, the attention tiles."""
        self._graphs.clear()
        self._pool = None
        self._set_tiles()

    def _num_logits(self, bucket: int) -> int:
        """Logits rows of a bucket: every row of a decode bucket, ``max_batch`` (one per sequence at
        most) past it."""
        return min(bucket, self.max_batch)

    def tiling(self, bucket: int) -> tuple[int, int]:
        """(row tile, row blocks) of a bucket's SMLM launches. Decode buckets tile rows by 16; prefill
        buckets by ``Tuning.graph_prefill_rows``. A step of ``bucket`` rows in at most ``max_segments``
        segments lays out at most ``bucket / tile + max_segments`` blocks (each segment's last block
        may be short); the launches walk that many (``graph_bounded_blocks``), or one per row."""
        prefill_rows, bounded = graph_tiling()
        rows = prefill_rows if bucket > self.max_batch else _SEG_ROWS
        if not bounded or self.max_segments is None:
            return rows, bucket
        return rows, min(bucket, -(-bucket // rows) + self.max_segments)

    def bucket_for(self, num_rows: int) -> int | None:
        return next((b for b in self.buckets if b >= num_rows), None)

    def run(self, rows: Sequence[DecodeRow | PrefillRows], lookahead: int = 0,
            feed: Feed | None = None) -> tuple[torch.Tensor, list[Hashable]]:
        """Logits [k, V] fp32 of an inference step (decode rows and prefill chunks), one row per
        decode row and per chunk that ends its prompt, and the seq id of each logits row.

        ``lookahead`` > 0 (decode rows only): the block tables also hold the blocks of each row's next
        ``lookahead`` positions, so :meth:`advance` can run that many more steps without the host.
        ``feed`` (tokens on the device, seq id -> index): the decode rows of those sequences feed
        ``tokens[index]``, a token the previous step sampled that the host has not read, in place of
        their ``token_id``."""
        groups = [_group(r) for r in rows]
        num_rows = sum(len(g.tokens) for g in groups)
        bucket = self.bucket_for(num_rows)
        if bucket is None or not num_rows:
            raise ValueError(f"{num_rows} rows: graphs hold 1..{self.max_tokens}")
        if self.tile_rows and bucket <= self.max_batch:
            prompt = [g for g in groups if g.prompt]
            prompt_rows = sum(len(g.tokens) for g in prompt)
            reads = sum(prefill_kv_reads(g.start, len(g.tokens)) for g in prompt)
            if reads > GRAPH_MAX_MEAN_CONTEXT * prompt_rows:  # too deep for rows one by one: tiles
                bucket = next(b for b in self.buckets if b > self.max_batch)
        if lookahead and any(not isinstance(r, DecodeRow) for r in rows):
            raise ValueError("a lookahead needs decode rows only")
        groups.sort(key=lambda g: g.slot)  # one segment per adapter (stable: a chunk's rows stay in order)
        if self.mode == "capture" and any(g.slot >= 0 for g in groups) and \
                backend_for(self.model.device).name != "triton":
            # the torch reference walks host segments, which a replayed graph would not update
            raise RuntimeError("decode graphs with adapters need the Triton SMLM kernels")
        segments, seq_ids = self._fill(groups, bucket, lookahead, feed)
        self._current = (bucket, bool(segments), segments, num_rows)
        return self._execute()[: len(seq_ids)], seq_ids

    def advance(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The next decode step of the rows the last :meth:`run` laid out (decode rows only, run with a
        lookahead left): row ``i`` feeds ``token_ids[i]`` (its sampled token, still on the device, in
        the order of the logits) at its next position. Returns the new logits [n, V]; no host sync."""
        bucket, _, _, n = self._current
        if token_ids.shape != (n,):
            raise ValueError(f"advance needs {n} token ids, got {tuple(token_ids.shape)}")
        bs = self.block_size
        self.input_ids[:n].copy_(token_ids)
        self.positions[:n] += 1
        self.context_lens[:n] += 1
        pos = self.positions[:n]
        blocks = self.block_tables[:n].gather(1, (pos // bs)[:, None])[:, 0]
        self.slot_mapping[:n] = blocks.long() * bs + pos % bs
        if self.mode == "eager":  # the reference attention reads host context lengths
            ctx, tables = self._host
            self._host = ([c + 1 for c in ctx[:n]] + ctx[n:], tables)
        return self._execute()[:n]

    def extend(self, tables: Sequence[Sequence[int]]) -> None:
        """The block tables of the rows the last :meth:`run` laid out (one per row, in its row order),
        grown since: later :meth:`advance` calls may reach every position they cover (a decode window
        chained behind another). Queued behind the steps already on the device."""
        _, _, _, n = self._current
        if len(tables) != n:
            raise ValueError(f"{len(tables)} block tables for {n} rows")
        if any(len(t) > self.max_blocks for t in tables):
            raise ValueError(f"a block table is longer than {self.max_blocks} blocks")
        cols = max([1, *map(len, tables)])
        padded = [list(t) + [self.scratch_block] * (cols - len(t)) for t in tables]
        self._staging.begin()
        self._staging.put(torch.tensor(padded, dtype=torch.int32), self.block_tables[:n, :cols])
        self._staging.flush()
        if self.mode == "eager":
            ctx, old = self._host
            self._host = (ctx, padded + old[n:])

    def _execute(self) -> torch.Tensor:
        bucket, with_lora, segments, _ = self._current
        if self.mode == "eager":
            return self._forward(bucket, with_lora, True, segments)
        key = (bucket, with_lora)
        if key not in self._graphs:
            self._graphs[key] = self._capture(bucket, with_lora)
        graph, logits = self._graphs[key]
        graph.replay()
        self.num_replays += 1
        return logits

    def capture_all(self) -> int:
        """Capture every bucket, both variants, largest first (so the shared memory pool is sized by
        the largest graph); returns how many graphs were captured now."""
        if self.mode != "capture":
            return 0
        before = self.num_captures
        variants = (True, False) if backend_for(self.model.device).name == "triton" else (False,)
        for bucket in reversed(self.buckets):
            self._fill([], bucket)  # every row a padding row (and the attention tiles of this bucket)
            for with_lora in variants:
                if (bucket, with_lora) not in self._graphs:
                    self._graphs[(bucket, with_lora)] = self._capture(bucket, with_lora)
        self._current = (0, False, [], 0)
        return self.num_captures - before

    # -- layout ------------------------------------------------------------------------------------
    def _fill(self, groups: Sequence[_Group], bucket: int, lookahead: int = 0,
              feed: Feed | None = None) -> tuple[list[tuple[int, int, int]], list[Hashable]]:
        """Write the rows (then padding up to ``bucket``) into the static buffers; one host-to-device
        copy per buffer. Returns the adapter segments (start, length, slot) and the seq id of each
        logits row, in the order of the logits. Block tables cover ``lookahead`` positions more; the
        decode rows ``feed`` names take their token from its tensor (device-side copies)."""
        self.num_layouts += 1
        bs, width, scratch = self.block_size, self.max_blocks, self.scratch_block
        lens = [len(g.tokens) for g in groups]
        n = sum(lens)
        ids = [t for g in groups for t in g.tokens] + [0] * (bucket - n)
        pos = [p for g in groups for p in range(g.start, g.start + len(g.tokens))] + [0] * (bucket - n)
        slots = [g.slot for g in groups for _ in g.tokens] + [-1] * (bucket - n)
        tables: list[list[int]] = []
        logit_rows: list[int] = []
        seq_ids: list[Hashable] = []
        fed: list[tuple[int, int]] = []  # (row, index into feed's tokens)
        row = 0
        for (seq_id, tokens, start, block_table, _, needs_logits, prompt), length in zip(groups, lens, strict=True):
            last = start + length - 1 + lookahead
            if last >= self.max_model_len:
                raise ValueError(f"position {last} is past max_model_len {self.max_model_len}")
            used = last // bs + 1  # blocks holding keys [0, last]
            if len(block_table) < used:
                raise ValueError(f"block table of {len(block_table)} blocks cannot hold position {last}")
            tables.append(list(block_table[:used]))
            if feed is not None and not prompt and seq_id in feed[1]:
                fed.append((row, feed[1][seq_id]))
            row += length
            if needs_logits:
                logit_rows.append(row - 1)
                seq_ids.append(seq_id)
        # Only the first `cols` columns are written: a row never reads a column past its context.
        cols = min(width, max((len(t) for t in tables), default=1))
        padded = [t + [scratch] * (cols - len(t)) for t in tables]
        table_t = torch.tensor([*padded, [scratch] * cols], dtype=torch.int32)  # last row: padding rows
        row_group = [gi for gi, length in enumerate(lens) for _ in range(length)] + [len(groups)] * (bucket - n)
        pos_t = torch.tensor(pos, dtype=torch.int64)
        row_tables = table_t[torch.tensor(row_group, dtype=torch.int64)]  # [bucket, cols]
        mapping = row_tables[torch.arange(bucket), torch.clamp(pos_t // bs, max=cols - 1)].long() * bs + pos_t % bs
        ctx = pos_t + 1  # padding rows: position 0, context 1, the scratch block
        num_logits = self._num_logits(bucket)
        if len(logit_rows) > num_logits:
            raise ValueError(f"{len(logit_rows)} rows need logits; graphs take at most {num_logits}")
        segments, _ = segments_of(slots[:n])
        # Blocks of at most the bucket's row tile: the captured launches tile rows by it anyway (the two
        # SMLM launches reload their weight tiles per row tile), so shorter blocks load the same and run
        # on more programs, and the one-launch decode kernel (it recomputes v per column chunk) never
        # meets a block longer than its row tile.
        seg_rows, num_blocks = self.tiling(bucket)
        blocks = row_blocks(segments, seg_rows)
        if len(blocks) > num_blocks:
            raise ValueError(f"{len(segments)} adapter segments lay out {len(blocks)} row blocks; the graphs "
                             f"of {bucket} rows walk {num_blocks} (max_segments {self.max_segments})")
        blocks += [(0, 0, 0)] * (num_blocks - len(blocks))
        tiles: list[tuple[int, int]] = []
        if self._tiled(bucket):
            tile, row = self.tile_rows, 0
            for length in [*lens, bucket - n]:  # each group, then the padding rows (one table: scratch)
                tiles += [(row + t, min(tile, length - t)) for t in range(0, length, tile)]
                row += length
            if len(tiles) > self._num_tiles(bucket):
                raise ValueError(f"{len(groups)} groups lay out {len(tiles)} attention tiles; the graphs of "
                                 f"{bucket} rows hold {self._num_tiles(bucket)}")
            tiles += [(0, 0)] * (self._num_tiles(bucket) - len(tiles))
            self.num_tiled_layouts += 1
        rows_t = torch.tensor(logit_rows + [0] * (num_logits - len(logit_rows)), dtype=torch.int64)
        stage = self._staging
        stage.begin()
        stage.put(torch.tensor(ids, dtype=torch.int64), self.input_ids[:bucket])
        stage.put(pos_t, self.positions[:bucket])
        stage.put(mapping, self.slot_mapping[:bucket])
        stage.put(ctx, self.context_lens[:bucket])
        stage.put(torch.tensor(slots, dtype=torch.int64), self.token_slots[:bucket])
        stage.put(row_tables, self.block_tables[:bucket, :cols])
        stage.put(torch.tensor(blocks, dtype=torch.int64), self.blocks[:num_blocks])
        stage.put(rows_t, self.logits_rows[:num_logits])
        if tiles:
            stage.put(torch.tensor(tiles, dtype=torch.int64), self.tiles[: len(tiles)])
        if fed:
            stage.put(torch.tensor(fed, dtype=torch.int64), self.fed[: len(fed)])
        stage.flush()
        if fed:
            assert feed is not None
            rows_fed = self.fed[: len(fed)]
            self.input_ids.index_copy_(0, rows_fed[:, 0], feed[0].index_select(0, rows_fed[:, 1]).to(torch.int64))
        if self.mode == "eager":  # the reference attention reads host context lengths and tables
            self._host = (ctx.tolist(), row_tables.tolist())
        return segments, seq_ids

    def _batch(self, bucket: int, with_lora: bool, eager: bool,
               segments: list[tuple[int, int, int]]) -> ForwardBatch:
        """A ForwardBatch over the static buffers. Host fields that size launches are fixed per bucket
        when capturing; ``eager`` (eager mode) gives the reference paths the real host values."""
        host_segments = tuple(segments) if eager else ((0, 1, 0),) if with_lora else ()
        seg_rows, num_blocks = self.tiling(bucket)
        meta = SMLMMeta(
            token_slots=self.token_slots[:bucket],
            seg_starts=self._empty_i32, seg_lens=self._empty_i32, seg_slots=self._empty_i32,
            blocks=self.blocks[:num_blocks], grad_blocks=self.blocks[:0],
            num_tokens=bucket, num_train_tokens=0, num_train_segments=0,
            max_seg_len=seg_rows, num_blocks=num_blocks if with_lora else 0, num_train_blocks=0, num_grad_blocks=0,
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
            row_tiles=self.tiles[: self._num_tiles(bucket)] if self._tiled(bucket) else None,
        )
        return ForwardBatch(
            input_ids=self.input_ids[:bucket], positions=self.positions[:bucket], meta=meta,
            num_train=0, num_eval=0, num_prefill=0, num_decode=bucket,
            train=self._no_rows, eval=self._no_rows, paged=paged,
            labels=self._empty_i64, loss_groups=self._empty_i64, group_keys=(),
            logits_indices=self.logits_rows[: self._num_logits(bucket)],
            logits_seq_ids=tuple(range(self._num_logits(bucket))),
        )

    def _forward(self, bucket: int, with_lora: bool, eager: bool,
                 segments: list[tuple[int, int, int]]) -> torch.Tensor:
        with torch.no_grad():
            out = self.model.forward(self._batch(bucket, with_lora, eager, segments), self.kv)
        assert out.logits is not None
        return out.logits

    def _capture(self, bucket: int, with_lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (compiles every kernel) on a side stream, then capture. The static buffers hold
        this step's rows; running them twice more is harmless (same K/V written again)."""
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream), overlap_scope():
            for _ in range(2):
                self._forward(bucket, with_lora, False, [])
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        if self._logits is None:  # one output buffer for every graph, outside the graph pool
            self._logits = torch.empty(self.max_batch, self.model.cfg.vocab_size, dtype=torch.float32,
                                       device=self.model.device)
        graph = torch.cuda.CUDAGraph()
        # LoRA work on a side stream beside the base GEMMs where set_lora_overlap says so: the
        # graph keeps the fork and join, the replay pays nothing for them
        with torch.cuda.graph(graph, pool=self._pool), overlap_scope():
            self._logits[: self._num_logits(bucket)].copy_(self._forward(bucket, with_lora, False, []))
        # the forward's own tensors are free again: the next capture reuses their pool memory, so
        # the graphs together hold about one forward's activations, not one per bucket
        self._pool = graph.pool()
        self.num_captures += 1
        return graph, self._logits[: self._num_logits(bucket)]


def _group(row: DecodeRow | PrefillRows) -> _Group:
    if isinstance(row, DecodeRow):
        return _Group(row.seq_id, (row.token_id,), row.position, row.block_table, row.slot, True, False)
    if not row.token_ids:
        raise ValueError(f"prefill chunk of {row.seq_id!r} has no tokens")
    return _Group(row.seq_id, row.token_ids, row.start, row.block_table, row.slot, row.needs_logits, True)
