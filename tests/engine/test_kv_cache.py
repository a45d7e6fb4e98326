"""BlockManager: no leaks under random add/abort/finish/preempt, prefix-cache sharing and keys."""

from __future__ import annotations

import random

import pytest

from loquetier.engine.kv_cache import BlockManager, NoFreeBlocksError
from loquetier.models.kv_cache import KVCache


def test_random_lifecycle_never_leaks() -> None:
    rng = random.Random(1234)
    bm = BlockManager(num_blocks=48, block_size=4)
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    live: dict[int, int] = {}  # seq -> computed tokens
    next_id = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.3:
            n = rng.randrange(1, 20)
            toks = (rng.choice(prefixes) if rng.random() < 0.5 else [])[: rng.randrange(13)]
            toks = toks + [rng.randrange(50) for _ in range(n)]
            if bm.can_allocate(len(toks)):
                cached = bm.allocate(
                    next_id, toks, adapter_id=rng.choice(["x", "y"]), adapter_version=rng.randrange(2)
                )
                assert cached % 4 == 0 and cached <= len(toks) - 1
                live[next_id] = cached
                next_id += 1
        elif op < 0.7 and live:
            seq = rng.choice(list(live))
            total = bm.num_tokens(seq)
            live[seq] = min(total, live[seq] + rng.randrange(1, 9))
            bm.mark_computed(seq, live[seq])
            if live[seq] == total:
                if bm.can_append(seq, 1):
                    bm.append(seq, [rng.randrange(50)])
                else:
                    bm.preempt(seq)
                    del live[seq]
        elif live:  # finish, abort or preempt: all free everything
            seq = rng.choice(list(live))
            bm.free(seq)
            del live[seq]
        bm.check_invariants()
        held = {b for s in live for b in bm.block_table(s)}
        assert bm.num_free_blocks == bm.num_blocks - len(held)
    for seq in list(live):
        bm.free(seq)
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_prefix_hits > 0


def test_prefix_keys_include_adapter_id_and_version() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    toks = list(range(10))
    assert bm.allocate("a", toks, adapter_id="x", adapter_version=1) == 0
    bm.mark_computed("a", 10)
    assert bm.allocate("b", toks, adapter_id="x", adapter_version=1) == 8
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2]
    assert bm.block_table("b")[2] != bm.block_table("a")[2]  # the last token's block is never shared
    assert bm.allocate("c", toks, adapter_id="x", adapter_version=2) == 0
    assert bm.allocate("d", toks, adapter_id="y", adapter_version=1) == 0
    assert bm.allocate("e", toks, adapter_id=None) == 0
    assert bm.allocate("f", toks[:4] + [99] * 6, adapter_id="x", adapter_version=1) == 4  # chained: 1 block
    for s in "abcdef":
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free_blocks == 16


def test_exhaustion_and_eviction() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", [1, 2, 3, 4, 5])
    bm.mark_computed("a", 5)
    assert not bm.can_allocate(3)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("b", [7, 8, 9])
    assert not bm.has_seq("b")
    bm.free("a")
    assert bm.allocate("c", [1, 2, 3, 4, 6]) == 4  # cached blocks survive the free
    bm.free("c")
    bm.allocate("d", list(range(20, 28)))  # evicts every cached block
    bm.free("d")
    assert bm.allocate("e", [1, 2, 3, 4, 6]) == 0
    bm.free("e")
    bm.check_invariants()


def test_kv_cache_shapes() -> None:
    kv = KVCache(2, 5, 4, 3, 8)
    assert len(kv.k) == 2 and kv.k[0].shape == (5, 4, 3, 8)
    assert KVCache.bytes_per_block(2, 4, 3, 8, kv.k[0].dtype) == 2 * 2 * 4 * 3 * 8 * 4


def test_drop_cached_forgets_free_prefixes_only() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    toks = list(range(13))
    bm.allocate("a", toks)
    bm.mark_computed("a", 13)
    bm.allocate("held", [50 + t for t in toks])
    bm.mark_computed("held", 13)
    bm.free("a")
    assert bm.drop_cached() == 3  # a's three full blocks; held's stay cached while it runs
    assert bm.allocate("b", toks) == 0
    assert bm.allocate("c", [50 + t for t in toks]) == 12
    for s in ("b", "c", "held"):
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free_blocks == 16
