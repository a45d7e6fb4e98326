"""ForwardBatch: the packed rows of one engine step, and BatchBuilder, which lays them out.

Rows are ``[train | eval | prefill | decode]`` whatever order ``add_*`` is called in::

    b = BatchBuilder(block_size=16)
    b.add_train(token_ids, labels, slot=0, group="job-a/mb3")      # labels: HF style, unshifted
    b.add_eval(token_ids, labels, slot=1, group="job-b/eval")
    b.add_prefill(seq_id, chunk_ids, start_pos, block_table, slot=-1, needs_logits=True)
    b.add_decode(seq_id, token_id, position, block_table, slot=2)
    batch = b.build(device)

``labels`` follow HF's ``labels=`` convention: one per token, ``-100`` for prompt tokens; the builder
shifts them so row ``i`` is scored against ``labels[i + 1]`` (the last row of a sequence gets -100).
Loss groups (any hashable key, e.g. one per job micro-batch) are numbered densely in order of first
appearance; ``ForwardBatch.group_keys[g]`` names group ``g``.

Prefill chunks and decode rows share one "paged" description: each is a query group of ``q_len``
rows (1 for decode) at positions ``[context_len - q_len, context_len)`` attending to keys
``[0, context_len)`` read through its block table, after its own K/V are written at ``slot_mapping``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from loquetier.kernels import SMLMMeta
from loquetier.kernels.meta import upload

IGNORE_INDEX = -100


@dataclass(frozen=True)
class VarlenMeta:
    """Packed causal sequences without KV cache (train or eval rows)."""

    cu_seqlens: torch.Tensor  # [N + 1] int32, row offsets relative to the part's first row
    max_seqlen: int
    host_seqlens: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.host_seqlens)


@dataclass(frozen=True)
class PagedMeta:
    """Prefill chunks then decode rows, reading (and first writing) the paged KV cache."""

    q_cu_seqlens: torch.Tensor  # [S + 1] int32, row offsets relative to the first prefill row
    context_lens: torch.Tensor  # [S] int32, keys [0, context_len) incl. this step's rows
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [P + D] int64, flat cache slot (block * block_size + offset) per row
    max_q_len: int
    max_context_len: int
    num_prefill_seqs: int
    host_q_lens: tuple[int, ...]
    host_context_lens: tuple[int, ...]
    host_block_tables: tuple[tuple[int, ...], ...]
    # The keys of the prefill chunks (the first ``num_prefill_seqs`` groups), packed: flat cache slots
    # of keys [0, context_len) of each chunk in order, and their offsets. FlashAttention then reads
    # them as contiguous varlen keys (its paged mode does not take every page size). None: not built.
    prefill_key_slots: torch.Tensor | None = None  # [sum of the chunks' context_lens] int64
    prefill_cu_keys: torch.Tensor | None = None  # [num_prefill_seqs + 1] int32
    # Rows of one token each (graph steps), attended in tiles of consecutive rows of one sequence:
    # [T, 2] int32 (first row, rows), rows 0 for an unused entry (``paged_tiles``). None: row by row.
    row_tiles: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.host_q_lens)


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: SMLMMeta  # adapter slot of every row (-1 = base)
    num_train: int
    num_eval: int
    num_prefill: int
    num_decode: int
    train: VarlenMeta
    eval: VarlenMeta
    paged: PagedMeta
    labels: torch.Tensor  # [num_train + num_eval] int64, next-token targets, -100 = not scored
    loss_groups: torch.Tensor  # [num_train + num_eval] int64 dense group id
    group_keys: tuple[Hashable, ...]
    logits_indices: torch.Tensor  # [L] int64, indices into the rest rows [eval | prefill | decode]
    logits_seq_ids: tuple[Hashable, ...]  # which sequence each logits row belongs to
    host_slots: tuple[int, ...] = ()
    _split_metas: dict[str, SMLMMeta] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.num_train + self.num_eval + self.num_prefill + self.num_decode

    @property
    def num_rest(self) -> int:
        return self.num_tokens - self.num_train

    @property
    def num_loss_groups(self) -> int:
        return len(self.group_keys)

    def split_metas(self) -> tuple[SMLMMeta, SMLMMeta]:
        """SMLM metadata for the train rows alone and the rest rows alone (gradient checkpointing)."""
        if not self._split_metas:
            dev = self.input_ids.device
            n = self.num_train
            self._split_metas["train"] = SMLMMeta.build(self.host_slots[:n], n, dev)
            self._split_metas["rest"] = SMLMMeta.build(self.host_slots[n:], 0, dev)
        return self._split_metas["train"], self._split_metas["rest"]


class BatchBuilder:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._train: list[tuple[list[int], list[int], int, Hashable]] = []
        self._eval: list[tuple[list[int], list[int], int, Hashable]] = []
        self._prefill: list[tuple[Hashable, list[int], int, list[int], int, bool]] = []
        self._decode: list[tuple[Hashable, int, int, list[int], int]] = []

    def add_train(
        self,
        token_ids: Sequence[int],
        labels: Sequence[int] | None = None,
        slot: int = -1,
        group: Hashable = 0,
    ) -> BatchBuilder:
        self._train.append(self._labelled(token_ids, labels, slot, group))
        return self

    def add_eval(
        self,
        token_ids: Sequence[int],
        labels: Sequence[int] | None = None,
        slot: int = -1,
        group: Hashable = 0,
    ) -> BatchBuilder:
        self._eval.append(self._labelled(token_ids, labels, slot, group))
        return self

    def add_prefill(  # noqa: PLR0917
        self,
        seq_id: Hashable,
        token_ids: Sequence[int],
        start_pos: int,
        block_table: Sequence[int],
        slot: int = -1,
        needs_logits: bool = True,
    ) -> BatchBuilder:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("a prefill chunk needs at least one token")
        self._check_table(block_table, start_pos + len(ids))
        self._prefill.append((seq_id, ids, start_pos, list(block_table), slot, needs_logits))
        return self

    def add_decode(
        self, seq_id: Hashable, token_id: int, position: int, block_table: Sequence[int], slot: int = -1
    ) -> BatchBuilder:
        self._check_table(block_table, position + 1)
        self._decode.append((seq_id, int(token_id), position, list(block_table), slot))
        return self

    def _labelled(
        self, token_ids: Sequence[int], labels: Sequence[int] | None, slot: int, group: Hashable
    ) -> tuple[list[int], list[int], int, Hashable]:
        ids = [int(t) for t in token_ids]
        labs = ids if labels is None else [int(t) for t in labels]
        if not ids or len(labs) != len(ids):
            raise ValueError("token_ids must be non-empty and labels as long as token_ids")
        return ids, labs[1:] + [IGNORE_INDEX], slot, group

    def _check_table(self, block_table: Sequence[int], num_tokens: int) -> None:
        if len(block_table) * self.block_size < num_tokens:
            raise ValueError(f"block table of {len(block_table)} blocks cannot hold {num_tokens} tokens")

    def build(self, device: torch.device | str = "cpu") -> ForwardBatch:
        dev = torch.device(device)
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        labels: list[int] = []
        groups: list[int] = []
        keys: dict[Hashable, int] = {}
        for part in (self._train, self._eval):
            for toks, labs, slot, group in part:
                ids += toks
                pos += range(len(toks))
                slots += [slot] * len(toks)
                labels += labs
                groups += [keys.setdefault(group, len(keys))] * len(toks)
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        tables: list[tuple[int, ...]] = []
        slot_mapping: list[int] = []
        logits_idx: list[int] = []
        logits_seqs: list[Hashable] = []
        n_eval = sum(len(t[0]) for t in self._eval)
        rest_row = n_eval
        bs = self.block_size
        paged = [(s, toks, start, table, slot, needs) for s, toks, start, table, slot, needs in self._prefill]
        paged += [(s, [tok], p, table, slot, True) for s, tok, p, table, slot in self._decode]
        for seq_id, toks, start, table, slot, needs in paged:
            ids += toks
            pos += range(start, start + len(toks))
            slots += [slot] * len(toks)
            q_lens.append(len(toks))
            ctx_lens.append(start + len(toks))
            tables.append(tuple(table))
            slot_mapping += _cache_slots(table, start, start + len(toks), bs)
            rest_row += len(toks)
            if needs:
                logits_idx.append(rest_row - 1)
                logits_seqs.append(seq_id)
        n_train = sum(len(t[0]) for t in self._train)
        width = max((len(t) for t in tables), default=0)
        num_pre = len(self._prefill)
        pre = list(zip(tables[:num_pre], ctx_lens[:num_pre], strict=True))
        train_lens, eval_lens = [len(t[0]) for t in self._train], [len(t[0]) for t in self._eval]
        i64, i32 = torch.int64, torch.int32
        meta_sections, meta_of = SMLMMeta.prepare(slots, n_train)
        (input_ids, positions, mapping, labels_t, groups_t, logits_t, key_slots, cu_q, ctx_t, table_t, cu_keys,
         cu_train, cu_eval, *meta_views) = upload([
            (ids, i64), (pos, i64), (slot_mapping, i64), (labels, i64), (groups, i64), (logits_idx, i64),
            ([slot for table, ctx in pre for slot in _cache_slots(table, 0, ctx, bs)], i64),
            ([0, *_cumsum(q_lens)], i32), (ctx_lens, i32),
            ([b for t in tables for b in (*t, *[0] * (width - len(t)))], i32),
            ([0, *_cumsum(ctx_lens[:num_pre])], i32), ([0, *_cumsum(train_lens)], i32),
            ([0, *_cumsum(eval_lens)], i32), *meta_sections], dev)  # the metadata's int32 beside the batch's
        return ForwardBatch(
            input_ids=input_ids,
            positions=positions,
            meta=meta_of(meta_views),
            num_train=n_train,
            num_eval=n_eval,
            num_prefill=sum(len(p[1]) for p in self._prefill),
            num_decode=len(self._decode),
            train=VarlenMeta(cu_seqlens=cu_train, max_seqlen=max(train_lens, default=0),
                             host_seqlens=tuple(train_lens)),
            eval=VarlenMeta(cu_seqlens=cu_eval, max_seqlen=max(eval_lens, default=0), host_seqlens=tuple(eval_lens)),
            paged=PagedMeta(
                q_cu_seqlens=cu_q,
                context_lens=ctx_t,
                block_tables=table_t.view(len(tables), width),
                slot_mapping=mapping,
                max_q_len=max(q_lens, default=0),
                max_context_len=max(ctx_lens, default=0),
                num_prefill_seqs=len(self._prefill),
                host_q_lens=tuple(q_lens),
                host_context_lens=tuple(ctx_lens),
                host_block_tables=tuple(tables),
                prefill_key_slots=key_slots if num_pre else None,
                prefill_cu_keys=cu_keys if num_pre else None,
            ),
            labels=labels_t,
            loss_groups=groups_t,
            group_keys=tuple(keys),
            logits_indices=logits_t,
            logits_seq_ids=tuple(logits_seqs),
            host_slots=tuple(slots),
        )


def _cache_slots(table: Sequence[int], lo: int, hi: int, block_size: int) -> list[int]:
    """Flat KV-cache slots (block * block_size + offset) of positions [lo, hi) through ``table``."""
    return [table[p // block_size] * block_size + p % block_size for p in range(lo, hi)]


def _cumsum(values: Sequence[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out
