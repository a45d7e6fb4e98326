"""The request queue: who waits, who runs, and the KV and adapter slots each running request holds.

Invariants:

- every known sequence is in exactly one of ``waiting`` (WAITING or PREEMPTED, holds nothing) and
  ``running`` (RUNNING: holds KV for all its tokens and, with an adapter, a pinned adapter slot);
- admission (``admit``) needs a free sequence slot, KV for the whole sequence (prefix-cache hits
  skip ahead) and an adapter slot, and never takes anything from a running sequence;
- preemption (``make_room``) is by recompute: the victim frees everything and waits again from
  token 0, and only a decode row that cannot get KV preempts, taking the least important running
  sequence not yet scheduled this step (lowest priority, then latest arrival, then latest added),
  possibly itself;
- ``importance`` is a total order (the add order breaks the last tie), so schedules are deterministic.
"""

from __future__ import annotations

from typing import Protocol

from loquetier.engine.sequence import RequestState, ScheduledBatch, SequenceStatus


class KVAllocator(Protocol):
    """KV memory, implemented by the block manager (through a thin adapter). Counts are per sequence.

    The scheduler calls ``allocate`` in two ways:

    - **admission** (the sequence holds nothing yet): ``allocate(seq_id, seq.num_tokens)`` reserves
      the whole prompt (plus outputs so far, after a preemption). It returns how many leading tokens
      already have K/V (prefix-cache hits, at most ``num_tokens - 1``; 0 without a prefix cache); the
      scheduler starts the prefill there. Chunked prefill then needs no further allocation.
    - **decode**: ``allocate(seq_id, 1)`` makes room for ``seq.token_ids[-1]`` (the token fed this
      step, at position ``seq.num_computed_tokens``), i.e. ``BlockManager.append(seq_id, [token])``.

    ``can_allocate`` is asked first with the same arguments; ``free`` releases everything (finish,
    abort, preemption). The adapter can look sequences up with ``Scheduler.get(seq_id)``.
    """

    def can_allocate(self, seq_id: str, num_new_tokens: int) -> bool: ...

    def allocate(self, seq_id: str, num_new_tokens: int) -> int: ...

    def free(self, seq_id: str) -> None: ...

    @property
    def num_free_blocks(self) -> int: ...


class AdapterSlots(Protocol):
    """GPU adapter slots, implemented by the adapter manager.

    ``ensure_loaded`` is called once when a sequence is admitted (WAITING/PREEMPTED -> RUNNING);
    True means the adapter has a slot now and is pinned for that sequence (a reference count);
    ``release`` is called once when that sequence finishes, is aborted or is preempted. The base
    model (``adapter_id`` None) never calls either.
    """

    def ensure_loaded(self, adapter_id: str) -> bool: ...

    def release(self, adapter_id: str) -> None: ...


class RequestQueue:
    """Waiting and running sequences, with the KV and adapter slots the running ones hold."""

    def __init__(self, max_num_seqs: int, kv: KVAllocator, adapters: AdapterSlots | None = None) -> None:
        self.max_num_seqs = max_num_seqs
        self.kv = kv
        self.adapters = adapters
        self.waiting: list[RequestState] = []  # WAITING or PREEMPTED
        self.running: list[RequestState] = []  # RUNNING (prefilling or decoding)
        self._seqs: dict[str, RequestState] = {}
        self._order: dict[str, int] = {}  # add order: the last tie-break of importance
        self._num_added = 0

    def add(self, seq: RequestState) -> None:
        if seq.seq_id in self._seqs:
            raise ValueError(f"duplicate seq_id {seq.seq_id!r}")
        if seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"sequence {seq.seq_id!r} must be WAITING, is {seq.status}")
        self._seqs[seq.seq_id] = seq
        self._order[seq.seq_id] = self._num_added
        self._num_added += 1
        self.waiting.append(seq)

    def get(self, seq_id: str) -> RequestState | None:
        return self._seqs.get(seq_id)

    def order(self, seq_id: str) -> int:
        """When ``seq_id`` was added, relative to the others (0 first)."""
        return self._order[seq_id]

    def importance(self, seq: RequestState) -> tuple[int, float, int]:
        """Higher is more important: priority, then earlier arrival, then earlier add."""
        return (seq.priority, -seq.arrival_time, -self._order[seq.seq_id])

    def admit(self, seq: RequestState) -> bool:
        """WAITING / PREEMPTED -> RUNNING: a sequence slot, KV for all its tokens, an adapter slot."""
        if len(self.running) >= self.max_num_seqs:
            return False
        if not self.kv.can_allocate(seq.seq_id, seq.num_tokens):
            return False
        if seq.adapter_id is not None and self.adapters is not None:
            if not self.adapters.ensure_loaded(seq.adapter_id):
                return False
        num_cached = self.kv.allocate(seq.seq_id, seq.num_tokens)
        seq.num_computed_tokens = max(0, min(num_cached, seq.num_tokens - 1))
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        return True

    def make_room(self, seq: RequestState, scheduled: set[str], batch: ScheduledBatch) -> bool:
        """Preempt the least important unscheduled running sequences until ``seq`` can decode one more
        token; when none is left, ``seq`` itself is preempted and False returned. Each victim is
        appended to ``batch.preempted``."""
        while not self.kv.can_allocate(seq.seq_id, 1):
            candidates = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
            if not candidates:
                self._preempt(seq, batch)
                return False
            self._preempt(min(candidates, key=self.importance), batch)
        return True

    def remove(self, seq: RequestState) -> None:
        """Forget a finishing sequence (before its status changes to FINISHED): frees what a running
        one holds."""
        if seq.status is SequenceStatus.RUNNING:
            self._release(seq)
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        del self._seqs[seq.seq_id]
        del self._order[seq.seq_id]

    def _preempt(self, seq: RequestState, batch: ScheduledBatch) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.append(seq)
        batch.preempted.append(seq)

    def _release(self, seq: RequestState) -> None:
        """Free the KV and the adapter pin of a RUNNING sequence."""
        self.kv.free(seq.seq_id)
        if seq.adapter_id is not None and self.adapters is not None:
            self.adapters.release(seq.adapter_id)
