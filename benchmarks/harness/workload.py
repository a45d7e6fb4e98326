"""Synthetic workloads: arrival traces, ShareGPT-like lengths, adapter popularity, fine-tuning data.

Nothing is downloaded: the length distributions are log-normals whose parameters are shipped here.
Every generator takes a ``numpy.random.Generator`` (or a seed) so a trace is reproducible and the
same trace can be replayed against our engine and every baseline.

Arrival patterns (times in seconds from the start of the run):

- ``poisson``: a homogeneous Poisson process at ``rate`` requests/s.
- ``burst``: a base Poisson rate with periodic bursts (``burst_factor`` x the rate for
  ``burst_s`` seconds every ``period_s`` seconds).
- ``step``: the step-rate pattern, the rate steps up and back down (``STEP_PROFILE`` multiples of
  ``rate``, each for an equal share of the duration).
- ``offline``: every request arrives at t = 0 (a capacity measurement).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# ShareGPT-like lengths: log-normal with means ~200 tokens (prompt) and ~200 tokens (output).
# mean of a log-normal = exp(mu + sigma^2 / 2), so mu = ln(mean) - sigma^2 / 2.
PROMPT_SIGMA = 0.9
OUTPUT_SIGMA = 0.8
PROMPT_MU = math.log(200.0) - PROMPT_SIGMA**2 / 2
OUTPUT_MU = math.log(200.0) - OUTPUT_SIGMA**2 / 2
MIN_PROMPT_TOKENS = 4
MIN_OUTPUT_TOKENS = 4

STEP_PROFILE = (0.5, 1.0, 1.5, 2.0, 1.5, 1.0, 0.5)  # multiples of the mean rate
PATTERNS = ("poisson", "burst", "step", "offline")
POPULARITIES = ("uniform", "zipf", "none")


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


@dataclass(frozen=True)
class LengthDist:
    """A clipped log-normal over token counts."""

    mu: float
    sigma: float
    min_tokens: int
    max_tokens: int

    @property
    def mean_unclipped(self) -> float:
        return math.exp(self.mu + self.sigma**2 / 2)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        raw = rng.lognormal(self.mu, self.sigma, size=n)
        return np.clip(np.rint(raw), self.min_tokens, self.max_tokens).astype(np.int64)

    def scaled(self, mean: float) -> LengthDist:
        """The same shape with another (unclipped) mean, e.g. short lengths for a quick run."""
        return LengthDist(math.log(mean) - self.sigma**2 / 2, self.sigma, self.min_tokens, self.max_tokens)


def sharegpt_lengths(
    max_context: int, *, prompt_mean: float = 200.0, output_mean: float = 200.0, max_output: int | None = None
) -> tuple[LengthDist, LengthDist]:
    """(prompt, output) length distributions clipped so prompt + output fits ``max_context``.

    The prompt is clipped to half the context and the output to the rest (or ``max_output``).
    """
    max_prompt = max(MIN_PROMPT_TOKENS, max_context // 2)
    max_out = max_context - max_prompt if max_output is None else min(max_output, max_context - max_prompt)
    prompt = LengthDist(PROMPT_MU, PROMPT_SIGMA, MIN_PROMPT_TOKENS, max_prompt).scaled(prompt_mean)
    output = LengthDist(OUTPUT_MU, OUTPUT_SIGMA, MIN_OUTPUT_TOKENS, max(MIN_OUTPUT_TOKENS, max_out))
    return prompt, output.scaled(output_mean)


# ----------------------------------------------------------------------------------------------------
# arrivals


def piecewise_poisson(segments: Sequence[tuple[float, float]], rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process whose rate is constant on each ``(duration_s, rate)`` piece."""
    times: list[float] = []
    start = 0.0
    for duration, rate in segments:
        if rate > 0:
            t = start + rng.exponential(1.0 / rate)
            while t < start + duration:
                times.append(t)
                t += rng.exponential(1.0 / rate)
        start += duration
    return np.asarray(times, dtype=np.float64)


def arrival_times(
    pattern: str,
    rate: float,
    duration_s: float,
    rng: np.random.Generator,
    *,
    num_requests: int | None = None,
    burst_factor: float = 4.0,
    burst_s: float = 2.0,
    period_s: float = 10.0,
) -> np.ndarray:
    """Arrival times (sorted, seconds) for one of :data:`PATTERNS`."""
    if pattern == "offline":
        n = num_requests if num_requests is not None else int(round(rate * duration_s))
        return np.zeros(n)
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration_s must be > 0")
    if pattern == "poisson":
        segments = [(duration_s, rate)]
    elif pattern == "burst":
        # keep the mean rate at `rate`: the base rate is lowered to pay for the bursts
        burst_frac = min(burst_s / period_s, 1.0)
        base = rate / (1.0 + burst_frac * (burst_factor - 1.0))
        segments = []
        t = 0.0
        while t < duration_s:
            quiet = min(period_s - burst_s, duration_s - t)
            segments.append((quiet, base))
            t += quiet
            if t < duration_s:
                hot = min(burst_s, duration_s - t)
                segments.append((hot, base * burst_factor))
                t += hot
    elif pattern == "step":
        piece = duration_s / len(STEP_PROFILE)
        mean_mult = sum(STEP_PROFILE) / len(STEP_PROFILE)
        segments = [(piece, rate * m / mean_mult) for m in STEP_PROFILE]
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    times = piecewise_poisson(segments, rng)
    if num_requests is not None:
        times = times[:num_requests]
    return times


def adapter_choices(
    n: int, adapter_ids: Sequence[str], popularity: str, rng: np.random.Generator, *, zipf_s: float = 1.1
) -> list[str | None]:
    """Which adapter each of ``n`` requests uses: ``uniform``, ``zipf`` (rank-k weight k^-s) or ``none``."""
    if popularity == "none" or not adapter_ids:
        return [None] * n
    k = len(adapter_ids)
    if popularity == "uniform":
        probs = np.full(k, 1.0 / k)
    elif popularity == "zipf":
        weights = 1.0 / np.arange(1, k + 1) ** zipf_s
        probs = weights / weights.sum()
    else:
        raise ValueError(f"unknown popularity {popularity!r}; expected one of {POPULARITIES}")
    idx = rng.choice(k, size=n, p=probs)
    return [adapter_ids[i] for i in idx]


# ----------------------------------------------------------------------------------------------------
# traces


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    arrival_s: float
    prompt_token_ids: list[int]
    max_tokens: int
    adapter_id: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class Trace:
    requests: list[TraceRequest]
    meta: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return max((r.arrival_s for r in self.requests), default=0.0)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def with_adapters(self, adapter_ids: Sequence[str | None]) -> Trace:
        """The same arrivals and lengths with other adapters (e.g. ``[None] * n`` for the base model)."""
        if len(adapter_ids) != len(self.requests):
            raise ValueError("one adapter id per request")
        reqs = [
            TraceRequest(r.request_id, r.arrival_s, r.prompt_token_ids, r.max_tokens, a)
            for r, a in zip(self.requests, adapter_ids, strict=True)
        ]
        return Trace(reqs, dict(self.meta))

    def renamed(self, prefix: str) -> Trace:
        """The same requests with ids ``{prefix}-{id}`` (one engine may replay a trace several times)."""
        reqs = [
            TraceRequest(
                f"{prefix}-{r.request_id}", r.arrival_s, r.prompt_token_ids, r.max_tokens, r.adapter_id
            )
            for r in self.requests
        ]
        return Trace(reqs, dict(self.meta))

    def without_adapters(self) -> Trace:
        return self.with_adapters([None] * len(self.requests))


def make_trace(
    *,
    pattern: str = "poisson",
    rate: float = 4.0,
    duration_s: float = 30.0,
    num_requests: int | None = None,
    vocab_size: int = 32000,
    max_context: int = 2048,
    prompt_mean: float = 200.0,
    output_mean: float = 200.0,
    max_output: int | None = None,
    adapter_ids: Sequence[str] = (),
    popularity: str = "uniform",
    seed: int = 0,
    **pattern_kw: float,
) -> Trace:
    """A reproducible request trace: arrivals x lengths x adapters, with random prompt token ids.

    Prompt token ids avoid the first 3 ids (commonly BOS/EOS/PAD) so no prompt ends early.
    """
    rng = _rng(seed)
    times = arrival_times(pattern, rate, duration_s, rng, num_requests=num_requests, **pattern_kw)
    n = len(times)
    prompt_dist, output_dist = sharegpt_lengths(
        max_context, prompt_mean=prompt_mean, output_mean=output_mean, max_output=max_output
    )
    prompt_lens = prompt_dist.sample(n, rng)
    output_lens = output_dist.sample(n, rng)
    adapters = adapter_choices(n, list(adapter_ids), popularity, rng)
    low = min(3, vocab_size - 1)
    requests = [
        TraceRequest(
            f"req-{i:05d}",
            float(times[i]),
            rng.integers(low, vocab_size, size=int(prompt_lens[i])).tolist(),
            int(output_lens[i]),
            adapters[i],
        )
        for i in range(n)
    ]
    meta: dict[str, object] = {
        "pattern": pattern,
        "rate": rate,
        "duration_s": duration_s,
        "num_requests": n,
        "popularity": popularity,
        "num_adapters": len(adapter_ids),
        "seed": seed,
        "prompt_mean": prompt_mean,
        "output_mean": output_mean,
    }
    return Trace(requests, meta)


# ----------------------------------------------------------------------------------------------------
# fine-tuning data


def synthetic_examples(
    n: int,
    vocab_size: int,
    seed: int | np.random.Generator = 0,
    *,
    prompt_mean: float = 200.0,
    completion_mean: float = 200.0,
    max_tokens: int = 1024,
) -> list[dict[str, list[int]]]:
    """Instruction-style examples of random token ids: ``{"prompt_token_ids", "completion_token_ids"}``.

    Lengths follow the ShareGPT-like log-normals; each example fits ``max_tokens`` (the micro-batch)
    so packing never has to split one.
    """
    rng = _rng(seed)
    prompt_dist, completion_dist = sharegpt_lengths(
        max_tokens, prompt_mean=prompt_mean, output_mean=completion_mean
    )
    prompt_lens = prompt_dist.sample(n, rng)
    completion_lens = completion_dist.sample(n, rng)
    low = min(3, vocab_size - 1)
    return [
        {
            "prompt_token_ids": rng.integers(low, vocab_size, size=int(p)).tolist(),
            "completion_token_ids": rng.integers(low, vocab_size, size=int(c)).tolist(),
        }
        for p, c in zip(prompt_lens, completion_lens, strict=True)
    ]


def example_length(example: dict[str, list[int]]) -> int:
    return len(example["prompt_token_ids"]) + len(example["completion_token_ids"])


def pack_micro_batches(examples: Sequence[dict[str, list[int]]], budget: int = 1024) -> list[list[int]]:
    """Greedy in-order packing of example indices into micro-batches of at most ``budget`` tokens.

    Mirrors what the engine does with ``micro_batch_tokens`` (no padding, no splitting); an example
    longer than the budget gets a micro-batch of its own.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, ex in enumerate(examples):
        length = example_length(ex)
        if current and used + length > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += length
    if current:
        batches.append(current)
    return batches


def padded_batches(examples: Sequence[dict[str, list[int]]], batch_size: int) -> list[list[int]]:
    """Consecutive groups of ``batch_size`` example indices: the PEFT user's padded batches."""
    return [list(range(i, min(i + batch_size, len(examples)))) for i in range(0, len(examples), batch_size)]


def padding_stats(
    examples: Sequence[dict[str, list[int]]], batches: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """(real tokens, padded tokens) when each batch is padded to its longest example."""
    real = padded = 0
    for batch in batches:
        lens = [example_length(examples[i]) for i in batch]
        real += sum(lens)
        padded += max(lens) * len(lens)
    return real, padded
