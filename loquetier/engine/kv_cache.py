"""The paged KV cache's host-side allocator (``BlockManager``); the device storage it hands out
blocks of is ``loquetier.models.kv_cache.KVCache``. A token at position ``p`` of a sequence lives at
block ``table[p // block_size]``, offset ``p % block_size``.

BlockManager lifecycle of one sequence::

    cached = bm.allocate(seq_id, prompt_ids, adapter_id, adapter_version)  # blocks for the prompt; returns
                                                    # how many leading tokens already have K/V (prefix hits)
    bm.mark_computed(seq_id, n)                     # after a step: K/V of the first n tokens are written;
                                                    # full blocks among them become prefix-cache entries
    bm.append(seq_id, [new_token])                  # before decoding a token: room for it
    bm.free(seq_id)                                 # finish, abort or preemption (recompute later)

Prefix cache: a full block's key is a chained SHA-256 over (parent key, adapter_id, adapter_version,
the block's tokens), so a reloaded adapter (new version) never reuses stale K/V. Blocks are
ref-counted; a freed block keeps its key and stays reusable until it is evicted to serve a new
allocation (least recently freed first). At most ``len(prompt) - 1`` tokens are served from the
cache, so at least one token is computed (for its logits) and that token's block is never shared.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

PENDING_TOKEN = -1  # a token an asynchronous step samples on the device, until ``set_token`` writes it in


class NoFreeBlocksError(RuntimeError):
    pass


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    key: bytes | None = None  # prefix-cache key once full and computed


@dataclass
class _SeqState:
    token_ids: list[int]
    adapter_id: Hashable
    adapter_version: int
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # chained keys of the leading full computed blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self._cached: dict[bytes, int] = {}
        self._seqs: dict[Hashable, _SeqState] = {}
        self.num_prefix_hits = 0  # tokens served from the prefix cache (counter)

    # -- queries --------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def has_seq(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seqs[seq_id].blocks)

    def num_tokens(self, seq_id: Hashable) -> int:
        return len(self._seqs[seq_id].token_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, num_tokens: int) -> bool:
        """Conservative: ignores prefix hits."""
        return self.blocks_needed(num_tokens) <= self.num_free_blocks

    def can_append(self, seq_id: Hashable, num_new_tokens: int = 1) -> bool:
        state = self._seqs[seq_id]
        need = self.blocks_needed(len(state.token_ids) + num_new_tokens) - len(state.blocks)
        return need <= self.num_free_blocks

    # -- lifecycle ------------------------------------------------------------------------------------
    def allocate(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int],
        adapter_id: Hashable = None,
        adapter_version: int = 0,
    ) -> int:
        """Blocks for ``token_ids``; returns the number of leading tokens whose K/V are cached."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already holds blocks")
        if not token_ids:
            raise ValueError("cannot allocate an empty sequence")
        state = _SeqState([int(t) for t in token_ids], adapter_id, adapter_version)
        hits: list[int] = []
        if self.enable_prefix_caching:
            parent = b""
            for i in range((len(token_ids) - 1) // self.block_size):
                key = self._key(parent, state, i)
                block = self._cached.get(key)
                if block is None:
                    break
                hits.append(block)
                state.keys.append(key)
                parent = key
        fresh = self.blocks_needed(len(token_ids)) - len(hits)
        reviving = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        if fresh + reviving > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {fresh + reviving} blocks, {self.num_free_blocks} free")
        for b in hits:
            self._ref(b)
        state.blocks = hits + [self._take_free() for _ in range(fresh)]
        self._seqs[seq_id] = state
        self.num_prefix_hits += len(hits) * self.block_size
        return len(hits) * self.block_size

    def append(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Extend the sequence (e.g. by its newly sampled token), allocating blocks as needed."""
        state = self._seqs[seq_id]
        need = self.blocks_needed(len(state.token_ids) + len(token_ids)) - len(state.blocks)
        if need > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {need} blocks, {self.num_free_blocks} free")
        state.token_ids.extend(int(t) for t in token_ids)
        state.blocks.extend(self._take_free() for _ in range(need))

    def set_token(self, seq_id: Hashable, position: int, token_id: int) -> None:
        """The token at ``position`` read from the device: written in where it was appended as
        ``PENDING_TOKEN``; nothing to do where it is not appended yet."""
        tokens = self._seqs[seq_id].token_ids
        if position >= len(tokens) or tokens[position] == token_id:
            return
        if tokens[position] != PENDING_TOKEN:
            raise ValueError(f"position {position} of {seq_id!r} holds token {tokens[position]}, not {token_id}")
        tokens[position] = int(token_id)

    def reserve(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Blocks for the sequence's first ``num_tokens`` positions, tokens not yet known (a decode
        window writes K/V ahead of the host learning its tokens); later appends within them take no
        block. False, and nothing taken, when the free blocks do not cover it."""
        state = self._seqs[seq_id]
        need = self.blocks_needed(num_tokens) - len(state.blocks)
        if need > self.num_free_blocks:
            return False
        state.blocks.extend(self._take_free() for _ in range(need))
        return True

    def mark_computed(self, seq_id: Hashable, num_computed_tokens: int) -> None:
        """K/V of the first ``num_computed_tokens`` tokens are in the cache: publish full blocks."""
        if not self.enable_prefix_caching:
            return
        state = self._seqs[seq_id]
        num_full = min(num_computed_tokens, len(state.token_ids)) // self.block_size
        while len(state.keys) < num_full:
            i = len(state.keys)
            if PENDING_TOKEN in state.token_ids[i * self.block_size : (i + 1) * self.block_size]:
                break  # a token not read yet: the block's key is not known
            key = self._key(state.keys[-1] if state.keys else b"", state, i)
            state.keys.append(key)
            block = self._blocks[state.blocks[i]]
            if block.key is None and key not in self._cached:
                block.key = key
                self._cached[key] = block.block_id

    def free(self, seq_id: Hashable) -> None:
        """Release every block of a sequence (finish, abort, or preemption by recompute)."""
        state = self._seqs.pop(seq_id)
        # Tail first, so a prefix's later blocks are evicted before its earlier ones.
        for b in reversed(state.blocks):
            block = self._blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[b] = None

    preempt = free

    def drop_cached(self) -> int:
        """Forget the cached prefixes of free blocks (blocks in use keep theirs), so the next prompts
        compute every token: a benchmark that replays the same prompts starts each replay cold.
        Returns the number of prefixes forgotten."""
        dropped = 0
        for b in self._free:
            block = self._blocks[b]
            if block.key is not None:
                del self._cached[block.key]
                block.key = None
                dropped += 1
        return dropped

    # -- internals ------------------------------------------------------------------------------------
    def _key(self, parent: bytes, state: _SeqState, index: int) -> bytes:
        tokens = state.token_ids[index * self.block_size : (index + 1) * self.block_size]
        h = hashlib.sha256(parent)
        h.update(repr((state.adapter_id, state.adapter_version, tokens)).encode())
        return h.digest()

    def _ref(self, b: int) -> None:
        block = self._blocks[b]
        if block.ref_count == 0:
            del self._free[b]
        block.ref_count += 1

    def _take_free(self) -> int:
        b, _ = self._free.popitem(last=False)
        block = self._blocks[b]
        if block.key is not None:  # evict its prefix-cache entry
            del self._cached[block.key]
            block.key = None
        block.ref_count = 1
        return b

    def check_invariants(self) -> None:
        """Ref counts equal the number of sequences holding each block; free <=> ref 0 (for tests)."""
        counts = [0] * self.num_blocks
        for state in self._seqs.values():
            for b in state.blocks:
                counts[b] += 1
        for block in self._blocks:
            if block.ref_count != counts[block.block_id]:
                raise AssertionError(
                    f"block {block.block_id}: ref {block.ref_count} != holders {counts[block.block_id]}"
                )
            if (block.ref_count == 0) != (block.block_id in self._free):
                raise AssertionError(f"block {block.block_id}: free list disagrees with ref count")
        for key, b in self._cached.items():
            if self._blocks[b].key != key:
                raise AssertionError(f"cache entry for block {b} is stale")
