"""AdapterManager: slots, LRU eviction, pins, refcounts, versions, CPU budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loquetier.lora.adapter import LoRAAdapter
from loquetier.lora.config import AdapterCapacityError, AdapterError, LoRAConfig
from loquetier.lora.manager import AdapterManager
from loquetier.lora.pool import LoRASlotPool, ModelDims

DIMS = ModelDims(num_layers=1, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4)


def adapter(seed: int, rank: int = 2) -> LoRAAdapter:
    a = LoRAAdapter.new(LoRAConfig(rank=rank, target_modules=("q_proj",)), DIMS, seed=seed)
    a.weights[(0, "q_proj")][1].fill_(seed)  # B = seed: tells slots apart
    return a


def manager(num_slots: int = 4, num_train_slots: int = 1, **kw: object) -> AdapterManager:
    pool = LoRASlotPool(DIMS, num_slots=num_slots, max_rank=4, num_train_slots=num_train_slots)
    return AdapterManager(pool, **kw)  # type: ignore[arg-type]


def slot_b(m: AdapterManager, slot: int) -> float:
    return float(m.pool.get(0, "q_proj").b[slot, 0, 0])


def test_acquire_loads_into_inference_slots_and_evicts_lru() -> None:
    m = manager()  # slots 1..3 serve inference
    for i in range(4):
        m.load(f"a{i}", adapter(i + 1))
    assert [m.acquire_slot(f"a{i}") for i in range(3)] == [1, 2, 3]
    assert slot_b(m, 2) == 2.0 and m.pool.get(0, "q_proj").host_ranks[2] == 2
    assert m.acquire_slot("a0") == 1  # already resident: same slot, no rewrite
    m.new_step()
    assert m.acquire_slot("a3") == 2  # LRU among a0 (just used), a1, a2 -> a1's slot
    assert m.slot_of("a1") is None and slot_b(m, 2) == 4.0


def test_fill_free_slots_places_the_newest_without_evicting() -> None:
    m = manager()  # slots 1..3 serve inference
    m.load("a0", adapter(1))
    assert m.fill_free_slots() == 1 and m.slot_of("a0") == 1 and slot_b(m, 1) == 1.0
    for i in range(1, 5):
        m.load(f"a{i}", adapter(i + 1))
    assert m.fill_free_slots() == 2  # two free slots: the two newest, nothing evicted
    assert [m.slot_of(f"a{i}") for i in range(5)] == [1, None, None, 3, 2]
    assert slot_b(m, 2) == 5.0 and slot_b(m, 3) == 4.0
    assert m.fill_free_slots() == 0
    m.new_step()
    assert m.acquire_slot("a1") == 1  # placed slots are evictable like acquired ones (LRU: a0 first)
    assert m.slot_of("a0") is None


def test_slots_used_this_step_are_not_evicted() -> None:
    m = manager(num_slots=2, num_train_slots=0)
    for name in "abc":
        m.load(name, adapter(1))
    assert m.acquire_slot("a") == 0 and m.acquire_slot("b") == 1
    assert m.acquire_slot("c") is None  # both busy in this step
    m.new_step()
    assert m.acquire_slot("c") == 0


def test_pinned_and_referenced_adapters_stay() -> None:
    m = manager(num_slots=3, num_train_slots=1)
    for name in "abc":
        m.load(name, adapter(1))
    m.acquire_slot("a")
    m.acquire_slot("b")
    m.pin("a")
    m.acquire("b")
    m.new_step()
    assert m.acquire_slot("c") is None
    with pytest.raises(AdapterError, match="pinned"):
        m.unload("a")
    with pytest.raises(AdapterError, match="running sequence"):
        m.unload("b")
    with pytest.raises(AdapterError, match="running sequence"):
        m.load("b", adapter(5))
    m.release("b")
    assert m.acquire_slot("c") == 2
    m.unpin("a")
    m.unload("a")
    assert "a" not in m and m.pool.get(0, "q_proj").host_ranks[1] == 0
    with pytest.raises(AdapterError, match="unknown adapter"):
        m.acquire_slot("a")
    with pytest.raises(AdapterError, match="not pinned"):
        m.unpin("b")


def test_versions_change_on_every_reload_and_update() -> None:
    m = manager()
    v1 = m.load("a", adapter(1))
    m.acquire_slot("a")
    v2 = m.load("a", adapter(2))
    assert v2 != v1 and m.version("a") == v2
    assert m.slot_of("a") is None  # stale slot dropped; next acquire writes the new weights
    m.new_step()
    assert slot_b(m, m.acquire_slot("a")) == 2.0
    m.unload("a")
    assert m.load("a", adapter(1)) not in (v1, v2)  # never reused, even after unload
    before = m.version("a")
    assert m.mark_updated("a") == m.version("a") != before


def test_training_slots_are_reserved_and_pinned() -> None:
    m = manager(num_slots=3, num_train_slots=1)
    m.load("t", adapter(3))
    m.load("u", adapter(4))
    assert m.acquire_train_slot("t") == 0 and m.is_pinned("t")
    assert m.acquire_slot("t") == 0  # serving the adapter under training reads its training slot
    with pytest.raises(AdapterError, match="no free training slot"):
        m.acquire_train_slot("u")
    with pytest.raises(AdapterError, match="being trained"):
        m.unload("t")
    v = m.version("t")
    trained = adapter(9)
    assert m.release_train_slot("t", trained) != v
    assert not m.is_pinned("t") and m.slot_of("t") is None and m.get("t") is trained
    m.new_step()
    assert m.acquire_slot("t") == 1 and slot_b(m, 1) == 9.0


def test_rank_above_pool_is_refused() -> None:
    m = manager()
    with pytest.raises(AdapterError, match="max_rank"):
        m.load("big", adapter(1, rank=8))


def test_cpu_budget_offloads_file_backed_adapters(tmp_path: Path) -> None:
    one = adapter(1)
    size = one.num_bytes
    m = manager(max_cpu_bytes=2 * size, adapter_root=tmp_path)
    for name in ("x", "y", "z"):
        adapter(ord(name)).save(tmp_path / name)
    vx = m.load("x")
    m.load("y")
    m.load("z")  # over budget: x (least recently used, file-backed) is offloaded
    assert m.num_cpu_bytes == 2 * size
    assert m.version("x") == vx
    got = m.get("x")  # read back from disk, new version (the file might have changed)
    assert torch.equal(got.weights[(0, "q_proj")][1], adapter(ord("x")).weights[(0, "q_proj")][1])
    assert m.version("x") != vx and m.num_cpu_bytes == 2 * size
    for name in ("x", "y", "z"):
        m.pin(name)
    with pytest.raises(AdapterCapacityError, match="CPU budget"):  # transient: the engine says no_slot
        m.load("mem", adapter(5))  # x and y pinned, in-memory adapters are never dropped
    with pytest.raises(AdapterError, match="safe relative name"):
        m.load("../escape")
