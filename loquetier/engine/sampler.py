"""On-device sampler: greedy, temperature, top-k, top-p, per-request seeds, chosen-token logprobs.

Randomness is counter-based: row ``i`` draws Gumbel noise from a hash of (its request's seed, the
request's output index, the vocab id), so a seeded request samples the same tokens whatever else
shares its batch, on CPU or CUDA alike. Requests without a seed get one from the engine's
``torch.Generator`` (host side) when their row is built.

Semantics, per row (logits fp32 [V])::

    if temperature < GREEDY_BELOW (1e-5): token = argmax(logits)
    else:
        z = logits / temperature
        z[rank(z) >= top_k] = -inf                      (top_k > 0)
        z[outside the smallest top_p nucleus] = -inf    (top_p < 1; the top token always stays)
        token = argmax(z + gumbel(seed, step))          # == a sample from softmax(z)
    logprob = log_softmax(logits)[token]                 # of the raw (unscaled) distribution

Stop token ids are the scheduler's; stop strings are matched on detokenized text by the engine
(``find_stop_string`` helps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from loquetier.engine.sequence import GREEDY_BELOW
from loquetier.kernels.meta import upload

if TYPE_CHECKING:
    from loquetier.engine.sequence import SamplingParams

_M32 = 0xFFFFFFFF
_MAX_TOP_K = 2**62  # any top_k at or above the vocabulary keeps every token; larger ones fit int64


class RowParams(Protocol):
    temperature: float
    top_k: int
    top_p: float
    seed: int | None


@dataclass(frozen=True)
class SamplingInputs:
    """What sampling reads of a step's requests, handed to the model runner with the batch: each
    row's params and how many tokens it has sampled so far (by sequence id), and the generator that
    seeds unseeded rows (drawn in logits-row order, so the runner builds the tensors)."""

    rows: Mapping[str, tuple[SamplingParams, int]]
    generator: torch.Generator


@dataclass(frozen=True)
class SamplingTensors:
    temperature: torch.Tensor  # [B] fp32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] fp32, 1 = off
    seed: torch.Tensor  # [B] int64 (32-bit values)
    step: torch.Tensor  # [B] int64, index of the token being sampled within its request
    any_top_k: bool
    any_top_p: bool
    all_greedy: bool

    @classmethod
    def build(
        cls,
        params: Sequence[RowParams],
        steps: Sequence[int],
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> SamplingTensors:
        """One row per logits row: its request's params and how many tokens it has sampled so far."""
        # A row without a seed draws one from the engine's generator (all such rows in one draw);
        # a greedy row's seed is never read.
        seeds = [(p.seed & _M32) if p.seed is not None else 0 for p in params]
        unseeded = [i for i, p in enumerate(params) if p.seed is None and p.temperature >= GREEDY_BELOW]
        if unseeded:
            draws = torch.randint(0, 2**32, (len(unseeded),), generator=generator).tolist()
            for i, seed in zip(unseeded, draws, strict=True):
                seeds[i] = seed
        dev = torch.device(device)
        # One buffer per dtype, one asynchronous copy each from pinned memory, no cast on the device.
        temps = [p.temperature if p.temperature >= GREEDY_BELOW else 0.0 for p in params]
        f32, i64 = torch.float32, torch.int64
        temperature, top_p, top_k, seed, step = upload(
            [(temps, f32), ([p.top_p for p in params], f32), ([min(p.top_k, _MAX_TOP_K) for p in params], i64),
             (seeds, i64), (list(steps), i64)], dev)
        return cls(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            step=step,
            any_top_k=any(p.top_k > 0 for p in params),
            any_top_p=any(p.top_p < 1.0 for p in params),
            all_greedy=not any(temps),
        )


    def next_step(self, params: Sequence[RowParams], generator: torch.Generator | None = None) -> SamplingTensors:
        """The same rows one token later (a decode window's next step, built without the host's rows):
        each row's step counter advanced, and unseeded sampled rows given fresh seeds, drawn as the
        next step's ``build`` would draw them."""
        seed = self.seed
        unseeded = [i for i, p in enumerate(params) if p.seed is None and p.temperature >= GREEDY_BELOW]
        if unseeded:
            draws = torch.randint(0, 2**32, (len(unseeded),), generator=generator)
            index = torch.tensor(unseeded, dtype=torch.int64)
            seed = seed.index_copy(0, index.to(seed.device), draws.to(seed.device))
        return dataclasses.replace(self, seed=seed, step=self.step + 1)


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] fp32, log_softmax(logits)[token]


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3 finaliser on int64 tensors holding 32-bit values (products wrap mod 2**64)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B] seeds and steps -> [B, V] fp32 Gumbel(0, 1) noise, a pure function of (seed, step, vocab id)."""
    row = _fmix32(_fmix32(seed & _M32) ^ _fmix32((step * 0x9E3779B9 + 0x7F4A7C15) & _M32))  # [B]
    col = (torch.arange(vocab, device=seed.device) * 0x27D4EB2F + 0x165667B1) & _M32  # [V]
    bits = _fmix32(_fmix32(row[:, None] ^ col[None, :]) ^ row[:, None])  # [B, V]
    u = ((bits >> 8).float() + 0.5) / 2**24  # (0, 1), 24 bits
    return -torch.log(-torch.log(u))


def _restrict(z: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Mask z [B, V] to each row's top-k / top-p support."""
    sorted_z, order = z.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(z.shape[1], device=z.device)[None, :]
    drop = torch.zeros_like(sorted_z, dtype=torch.bool)
    if st.any_top_k:
        drop |= (st.top_k[:, None] > 0) & (ranks >= st.top_k[:, None])
    if st.any_top_p:
        probs = torch.softmax(sorted_z.masked_fill(drop, float("-inf")), dim=-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        drop |= (before >= st.top_p[:, None]) & (ranks > 0)
    return z.scatter(1, order, sorted_z.masked_fill(drop, float("-inf")))


def sample(logits: torch.Tensor, st: SamplingTensors, *, want_logprobs: bool = False) -> SamplerOutput:
    """logits [B, V] (any float dtype) -> chosen tokens (and their logprobs). No host sync."""
    logits = logits.float()
    greedy = logits.argmax(-1)  # [B]
    if st.all_greedy:
        tokens = greedy
    else:
        temp = torch.where(st.temperature > 0, st.temperature, 1.0)[:, None]
        z = logits / temp
        if st.any_top_k or st.any_top_p:
            z = _restrict(z, st)
        sampled = (z + gumbel_noise(st.seed, st.step, logits.shape[1])).argmax(-1)
        tokens = torch.where(st.temperature > 0, sampled, greedy)
    logprobs = None
    if want_logprobs:
        logprobs = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    return SamplerOutput(tokens, logprobs)


def is_stop_token(token_id: int, stop_token_ids: Sequence[int], eos_token_ids: Sequence[int] = (),
                  ignore_eos: bool = False) -> bool:  # fmt: skip
    return token_id in stop_token_ids or (not ignore_eos and token_id in eos_token_ids)


def find_stop_string(text: str, stops: Sequence[str], num_new_chars: int) -> int | None:
    """Index where ``text`` must be cut at the earliest stop string that ends in its last
    ``num_new_chars`` characters (older text was checked before), or None.
    A streamer should hold back the last ``max(len(s) for s in stops) - 1`` characters."""
    start = max(0, len(text) - num_new_chars - max((len(s) for s in stops), default=0) + 1)
    hits = [i for s in stops if (i := text.find(s, start)) != -1]
    return min(hits) if hits else None
