"""AdapterManager: which adapters exist (CPU registry) and which GPU slot holds each one.

- Registry: CPU copies, LRU-bounded by bytes. Only copies that can be read again from their PEFT
  directory are dropped ("offloaded"); re-reading bumps the version. In-memory adapters stay.
- Slots: the fixed ``LoRASlotPool``. Slots ``[0, num_train_slots)`` are reserved for adapters under
  training (pinned for the job's life); the rest serve inference and are LRU-evicted when free of
  pins, running-sequence references and use in the current step.
- Versions: every (re)load and every training update gives the adapter a new version, globally
  unique, so a prefix cache keyed by ``(adapter_id, version)`` never reuses stale KV.

Not thread-safe: the engine thread owns it (loads arrive between steps).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .adapter import LoRAAdapter, check_rank, resolve_adapter_dir
from .config import AdapterCapacityError, AdapterError, LoRAConfig
from .pool import LoRASlotPool


@dataclass
class _Entry:
    adapter: LoRAAdapter | None  # None while offloaded (re-read from `source` on demand)
    source: Path | None
    version: int
    num_bytes: int
    pins: int = 0
    refs: int = 0
    slot: int | None = None
    is_training: bool = False


class AdapterManager:
    def __init__(self, pool: LoRASlotPool, *, max_cpu_bytes: int = 1 << 30,
                 adapter_root: str | Path | None = None) -> None:
        self.pool = pool
        self.max_cpu_bytes = max_cpu_bytes
        self.adapter_root = None if adapter_root is None else Path(adapter_root)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # CPU LRU order, oldest first
        self._slot_owner: list[str | None] = [None] * pool.num_slots
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # inference slots, oldest first
        self._step_slots: set[int] = set()
        self._versions = itertools.count(1)

    # --- registry -----------------------------------------------------------------------------

    def load(self, adapter_id: str, source: str | Path | LoRAAdapter | None = None) -> int:
        """Register (or replace) ``adapter_id``; returns its new version.

        ``source``: a PEFT directory, an in-memory adapter, or None for ``adapter_root/adapter_id``.
        Replacing an adapter that is pinned or used by running sequences is refused.
        """
        old = self._entries.get(adapter_id)
        if old is not None:
            self._check_idle(adapter_id, old, "reload")
        path: Path | None = None
        if isinstance(source, LoRAAdapter):
            adapter = source
        else:
            if source is None:
                if self.adapter_root is None:
                    raise AdapterError(f"no path given for {adapter_id!r} and no adapter_root configured")
                path = resolve_adapter_dir(self.adapter_root, adapter_id)
            else:
                path = Path(source)
            adapter = LoRAAdapter.load(path, self.pool.dims, self.pool.max_rank)
        self.check_holdable(adapter_id, adapter)
        self._make_room(adapter.num_bytes, exclude=adapter_id)
        if old is not None:
            self._drop_slot(old)
        entry = _Entry(adapter, path, next(self._versions), adapter.num_bytes)
        self._entries[adapter_id] = entry
        self._entries.move_to_end(adapter_id)
        return entry.version

    def check_holdable(self, adapter_id: str, adapter: LoRAAdapter) -> None:
        """Refuse weights this pool cannot hold: shapes other than the model's, or a rank above the
        slots' (``LoRAAdapter.load`` / ``from_bytes`` check both as they read; an adapter built in
        memory is checked here)."""
        adapter.validate(self.pool.dims)
        if adapter.rank > self.pool.max_rank:
            raise AdapterError(f"adapter {adapter_id!r} has rank {adapter.rank} > the slot pool's "
                               f"max_rank {self.pool.max_rank}")

    def check_fits(self, config: LoRAConfig) -> None:
        """Refuse a new adapter of ``config`` that this engine cannot hold, before any of its memory
        is allocated (a rank of 100,000 would otherwise take gigabytes, then be refused)."""
        check_rank(config, self.pool.max_rank)
        need = LoRAAdapter.estimate_bytes(config, self.pool.dims)
        if need > self.max_cpu_bytes:
            raise AdapterError(f"an adapter of rank {config.rank} needs {need} bytes, more than the CPU budget "
                               f"of {self.max_cpu_bytes} bytes")

    def unload(self, adapter_id: str) -> None:
        """Forget ``adapter_id`` and free its slot; refused while pinned or used by running sequences."""
        entry = self._entry(adapter_id)
        self._check_idle(adapter_id, entry, "unload")
        self._drop_slot(entry)
        del self._entries[adapter_id]

    def get(self, adapter_id: str) -> LoRAAdapter:
        """The CPU copy (re-read from disk if offloaded). Stale while a job trains the adapter."""
        return self._resident(adapter_id)

    def version(self, adapter_id: str) -> int:
        return self._entry(adapter_id).version

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._entries

    @property
    def adapter_ids(self) -> list[str]:
        return list(self._entries)

    @property
    def num_cpu_bytes(self) -> int:
        return sum(e.num_bytes for e in self._entries.values() if e.adapter is not None)

    # --- pins and references --------------------------------------------------------------------

    def pin(self, adapter_id: str) -> None:
        """Never evict ``adapter_id`` (from CPU or its slot) until a matching :meth:`unpin`."""
        self._entry(adapter_id).pins += 1

    def unpin(self, adapter_id: str) -> None:
        entry = self._entry(adapter_id)
        if entry.pins == 0:
            raise AdapterError(f"adapter {adapter_id!r} is not pinned")
        entry.pins -= 1

    def acquire(self, adapter_id: str) -> None:
        """A running sequence starts using ``adapter_id`` (it will not be evicted or replaced)."""
        self._entry(adapter_id).refs += 1

    def release(self, adapter_id: str) -> None:
        entry = self._entry(adapter_id)
        if entry.refs == 0:
            raise AdapterError(f"adapter {adapter_id!r} has no running references to release")
        entry.refs -= 1

    def is_pinned(self, adapter_id: str) -> bool:
        return self._entry(adapter_id).pins > 0

    def num_refs(self, adapter_id: str) -> int:
        return self._entry(adapter_id).refs

    # --- slots ----------------------------------------------------------------------------------

    def new_step(self) -> None:
        """Start a step: slots acquired during the previous step become evictable again."""
        self._step_slots.clear()

    def slot_of(self, adapter_id: str) -> int | None:
        return self._entry(adapter_id).slot

    def acquire_slot(self, adapter_id: str) -> int | None:
        """The slot holding ``adapter_id`` for this step, loading it into a free or LRU-evictable
        inference slot when needed; None when every slot is busy (pinned, referenced or used this step)."""
        entry = self._entry(adapter_id)
        self._entries.move_to_end(adapter_id)
        if entry.slot is None:
            slot = self._free_inference_slot()
            if slot is None:
                return None
            self._write(adapter_id, entry, slot)
        if entry.slot >= self.pool.num_train_slots:  # type: ignore[operator]
            self._slot_lru[entry.slot] = None  # type: ignore[index]
            self._slot_lru.move_to_end(entry.slot)  # type: ignore[arg-type]
        self._step_slots.add(entry.slot)  # type: ignore[arg-type]
        return entry.slot

    def fill_free_slots(self) -> int:
        """Write in-memory adapters that hold no slot into free inference slots, most recently used
        first, evicting nothing: the copy then happens here (between steps, at load time) rather
        than inside the first served step that needs the adapter. Returns how many were written."""
        free = [s for s in range(self.pool.num_train_slots, self.pool.num_slots) if self._slot_owner[s] is None]
        waiting = [k for k, e in reversed(self._entries.items()) if e.slot is None and e.adapter is not None]
        for slot, adapter_id in zip(free, waiting, strict=False):
            self._write(adapter_id, self._entries[adapter_id], slot)
            self._slot_lru[slot] = None
        return min(len(free), len(waiting))

    def acquire_train_slot(self, adapter_id: str) -> int:
        """Move ``adapter_id`` into a free training slot and pin it (for a training job)."""
        entry = self._entry(adapter_id)
        if entry.is_training:
            raise AdapterError(f"adapter {adapter_id!r} is already being trained by another job")
        free = [s for s in range(self.pool.num_train_slots) if self._slot_owner[s] is None]
        if not free:
            raise AdapterError(f"no free training slot for {adapter_id!r} "
                               f"(all {self.pool.num_train_slots} are taken by running jobs)")
        if entry.slot is not None and entry.slot in self._step_slots:
            raise AdapterError(f"adapter {adapter_id!r} is in use by the current step; retry next step")
        self._drop_slot(entry)
        self._write(adapter_id, entry, free[0])
        entry.is_training = True
        entry.pins += 1
        return free[0]

    def mark_updated(self, adapter_id: str) -> int:
        """A job changed the weights in the adapter's training slot: new version (stale KV dies)."""
        entry = self._entry(adapter_id)
        entry.version = next(self._versions)
        return entry.version

    def release_train_slot(self, adapter_id: str, trained: LoRAAdapter | None = None) -> int:
        """The job ended: keep ``trained`` as the CPU copy (new version), unpin, free the slot."""
        entry = self._entry(adapter_id)
        if not entry.is_training:
            raise AdapterError(f"adapter {adapter_id!r} holds no training slot")
        if trained is not None:
            trained.validate(self.pool.dims)  # before any change: refused weights leave the job as it was
        entry.is_training = False
        entry.pins -= 1
        self._drop_slot(entry)
        if trained is not None:
            entry.adapter, entry.source, entry.num_bytes = trained, None, trained.num_bytes
        entry.version = next(self._versions)
        return entry.version

    # --- internals ------------------------------------------------------------------------------

    def _entry(self, adapter_id: str) -> _Entry:
        entry = self._entries.get(adapter_id)
        if entry is None:
            raise AdapterError(f"unknown adapter {adapter_id!r} (not loaded)")
        return entry

    def _check_idle(self, adapter_id: str, entry: _Entry, action: str) -> None:
        if entry.pins:
            why = "being trained" if entry.is_training else "pinned"
            raise AdapterError(f"cannot {action} adapter {adapter_id!r}: it is {why}")
        if entry.refs:
            raise AdapterError(f"cannot {action} adapter {adapter_id!r}: "
                               f"{entry.refs} running sequence(s) use it")

    def _resident(self, adapter_id: str) -> LoRAAdapter:
        entry = self._entry(adapter_id)
        if entry.adapter is None:
            assert entry.source is not None
            adapter = LoRAAdapter.load(entry.source, self.pool.dims, self.pool.max_rank)
            self._make_room(adapter.num_bytes, exclude=adapter_id)
            entry.adapter, entry.num_bytes = adapter, adapter.num_bytes
            entry.version = next(self._versions)  # the file may have changed since it was first read
        self._entries.move_to_end(adapter_id)
        return entry.adapter

    def _make_room(self, num_bytes: int, exclude: str) -> None:
        used = sum(e.num_bytes for k, e in self._entries.items() if e.adapter is not None and k != exclude)
        for key, entry in self._entries.items():
            if used + num_bytes <= self.max_cpu_bytes:
                break
            if key != exclude and entry.adapter is not None and entry.source is not None \
                    and not entry.pins and not entry.refs:
                entry.adapter = None
                used -= entry.num_bytes
        if used + num_bytes > self.max_cpu_bytes:
            raise AdapterCapacityError(f"adapter of {num_bytes} bytes does not fit the CPU budget of "
                                       f"{self.max_cpu_bytes} bytes ({used} held by pinned, used or in-memory "
                                       "adapters; LOQUETIER_ENGINE__ADAPTER_CACHE_BYTES raises it)")

    def _free_inference_slot(self) -> int | None:
        for slot in range(self.pool.num_train_slots, self.pool.num_slots):
            if self._slot_owner[slot] is None:
                return slot
        for slot in self._slot_lru:
            owner = self._slot_owner[slot]
            assert owner is not None
            entry = self._entries[owner]
            if slot not in self._step_slots and not entry.pins and not entry.refs:
                self._drop_slot(entry)
                return slot
        return None

    def _write(self, adapter_id: str, entry: _Entry, slot: int) -> None:
        adapter = self._resident(adapter_id)
        self.pool.write_slot(slot, adapter.weights, adapter.scale)
        self._slot_owner[slot] = adapter_id
        entry.slot = slot

    def _drop_slot(self, entry: _Entry) -> None:
        if entry.slot is None:
            return
        self.pool.clear_slot(entry.slot)
        self._slot_owner[entry.slot] = None
        self._slot_lru.pop(entry.slot, None)
        self._step_slots.discard(entry.slot)
        entry.slot = None
