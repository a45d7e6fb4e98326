"""What the scheduler admits sequences against: KV blocks (``BlockAllocator`` over the block
manager) and adapter slots (``AdapterSlotGate`` over the adapter manager), its ``KVAllocator``
and ``AdapterSlots`` protocols."""

from __future__ import annotations

from collections.abc import Callable

from loquetier.engine.kv_cache import PENDING_TOKEN, BlockManager
from loquetier.engine.sequence import RequestState
from loquetier.lora.config import AdapterCapacityError, AdapterError
from loquetier.lora.manager import AdapterManager


class BlockAllocator:
    """``KVAllocator`` over ``BlockManager``: admission allocates the whole sequence (prefix hits
    returned), a decode appends the token it feeds."""

    def __init__(self, blocks: BlockManager, lookup: Callable[[str], RequestState | None],
                 adapter_version: Callable[[str | None], int]) -> None:
        self.blocks, self._lookup, self._version = blocks, lookup, adapter_version

    def can_allocate(self, seq_id: str, num_new_tokens: int) -> bool:
        if self.blocks.has_seq(seq_id):
            return self.blocks.can_append(seq_id, num_new_tokens)
        return self.blocks.can_allocate(num_new_tokens)

    def allocate(self, seq_id: str, num_new_tokens: int) -> int:
        seq = self._lookup(seq_id)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        if self.blocks.has_seq(seq_id):
            # the step feeds positions up to num_computed + n - 1; those the blocks do not hold yet are
            # appended (none when a recomputed sequence was admitted with its tokens, its last one fed as
            # a decode row); a pending token, an asynchronous step's still on the device, goes in as
            # PENDING_TOKEN until it is read
            known = seq.token_ids
            end = seq.num_computed_tokens + num_new_tokens
            self.blocks.append(seq_id, [known[p] if p < len(known) else PENDING_TOKEN
                                        for p in range(self.blocks.num_tokens(seq_id), end)])
            return 0
        return self.blocks.allocate(seq_id, seq.token_ids, seq.adapter_id, self._version(seq.adapter_id))

    def free(self, seq_id: str) -> None:
        if self.blocks.has_seq(seq_id):
            self.blocks.free(seq_id)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks


class AdapterSlotGate:
    """``AdapterSlots`` over ``AdapterManager``: admission takes a GPU slot and a reference.

    An adapter whose weights were dropped from memory is read again from its directory here; one
    that can no longer be read (the directory gone or changed) is listed in ``unavailable`` with
    the reason, and its sequence waits, so the engine fails those requests alone after the
    schedule instead of the step failing for everyone. No room in memory yet: the sequence waits."""

    def __init__(self, manager: AdapterManager, held: Callable[[str], bool] = lambda _: False) -> None:
        self.manager = manager
        self.unavailable: dict[str, str] = {}  # adapter_id -> why it could not be read again
        self.held = held  # adapters whose new sequences wait (new weights go in once the running ones end)

    def ensure_loaded(self, adapter_id: str) -> bool:
        if adapter_id not in self.manager or adapter_id in self.unavailable or self.held(adapter_id):
            return False
        try:
            if self.manager.acquire_slot(adapter_id) is None:
                return False
        except AdapterCapacityError:
            return False
        except (AdapterError, OSError) as exc:
            self.unavailable[adapter_id] = str(exc)[:500]
            return False
        self.manager.acquire(adapter_id)
        return True

    def release(self, adapter_id: str) -> None:
        if adapter_id in self.manager:
            self.manager.release(adapter_id)
