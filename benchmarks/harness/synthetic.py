"""A synthetic GPU for the scheduler: what a scheduled step costs under a known price list, and
stand-ins for the KV cache and a training job. No torch, no model, no clock.

The scheduler simulator (``benchmarks/sim_scheduler.py``) and the scheduler tests
(``tests/engine/test_scheduler.py``) drive a real ``Scheduler`` on a virtual clock with these; each
brings its own price lists (the "hardware" and the prior the scheduler starts from).

Semantics::

    step_time(batch) = cost.predict(features(batch)) * (1 + noise * U(-1, 1)) * (1 + eager_tail * Exp(1) * eager)

``step_features`` is the scheduler's own reading of a batch (prompt tokens, decode rows, training and eval
tokens, keys read, whether the step runs eagerly, whether it trains), so the truth and the scheduler's
online fit describe a step with the same features and differ only in their coefficients.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from loquetier.engine.scheduling.pricing import GraphPaths, StepFeatures, step_features
from loquetier.engine.sequence import ScheduledBatch


class StepPrice(Protocol):
    """A price list: the seconds a step with these features takes (``StepCost`` is one)."""

    def predict(self, f: StepFeatures) -> float: ...


def step_time(batch: ScheduledBatch, graphs: GraphPaths, cost: StepPrice, rng: random.Random,
              noise: float, eager_tail: float = 0.0) -> float:
    """Seconds ``batch`` takes under ``cost`` when ``graphs`` says which steps replay graphs, with
    multiplicative noise uniform in ``[-noise, noise]``, and for an eager step a further factor
    ``1 + eager_tail * E`` with ``E`` exponential of mean 1 (a host's jitter: mostly small, now and
    then several times ``eager_tail``). One draw from ``rng`` per call (two with ``eager_tail``), also
    when the noise is 0, so runs stay comparable."""
    f = step_features(batch, graphs)
    uniform = rng.uniform(-1.0, 1.0)
    tail = rng.expovariate(1.0) if eager_tail > 0.0 else 0.0
    return cost.predict(f) * (1.0 + noise * uniform) * (1.0 + eager_tail * tail * f.mixed)


def sampled_tokens(batch: ScheduledBatch, token_id: int) -> dict[str, int]:
    """What a model runner returns for ``batch``: ``token_id`` for every decode row and every prompt
    whose last chunk ran."""
    sampled = {s.seq_id: token_id for s in batch.decode_seqs}
    sampled |= {c.seq.seq_id: token_id for c in batch.prefill_chunks if c.is_final}
    return sampled


class FakeKV:
    """Paged KV accounting (the scheduler's KV protocol): ``num_blocks`` blocks of ``block_size`` tokens.

    At admission a sequence finds ``prefix_hit`` of its tokens in a prefix cache (at most all but one).
    """

    def __init__(self, num_blocks: int = 10_000, block_size: int = 16, prefix_hit: int = 0) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_hit = prefix_hit
        self.tokens: dict[str, int] = {}  # seq_id -> tokens held
        self.num_used_blocks = 0

    def _blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self.num_used_blocks

    def can_allocate(self, seq_id: str, num_new_tokens: int) -> bool:
        have = self.tokens.get(seq_id, 0)
        return self._blocks(have + num_new_tokens) - self._blocks(have) <= self.num_free_blocks

    def allocate(self, seq_id: str, num_new_tokens: int) -> int:
        """Holds ``num_new_tokens`` more for ``seq_id``; returns the tokens a prefix cache supplied."""
        assert self.can_allocate(seq_id, num_new_tokens)
        is_admission = seq_id not in self.tokens
        have = self.tokens.get(seq_id, 0)
        self.num_used_blocks += self._blocks(have + num_new_tokens) - self._blocks(have)
        self.tokens[seq_id] = have + num_new_tokens
        return min(self.prefix_hit, num_new_tokens - 1) if is_admission and self.prefix_hit else 0

    def free(self, seq_id: str) -> None:
        self.num_used_blocks -= self._blocks(self.tokens.pop(seq_id))


@dataclass
class FakeJob:
    """A training (or eval) job with ``ready`` tokens of work every step (the scheduler's ``TrainWork``)."""

    job_id: str
    priority: int = 0
    min_share: float = 0.0
    is_eval: bool = False
    ready: int = 1_000_000

    def num_ready_tokens(self) -> int:
        return self.ready
