"""Benchmark metrics: throughput, latency percentiles, SLO attainment, fine-tuning tokens/s, floors.

All times are seconds on one wall clock (``time.perf_counter``) unless a name says ``_ms``.

SLO rules (a request that never got its first token inside the measured window is a miss under
every rule, and its TTFT is infinite in the percentiles):

- ``slo``: TTFT <= ``ttft_s`` (default 1 s) and mean TPOT <= ``tpot_s`` (default 60 ms).
- ``admit6``: the paper's "admitted within 6 s" rule: the request counts if its admission (first
  scheduled) or, where admission is not observable (the HF baselines), its first token comes within
  ``admit_s`` (6 s) of its arrival.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

H200_BANDWIDTH_BPS = 4.27e12  # measured device-to-device copy, bytes read + written per second
H200_BF16_FLOPS = 797e12
DEFAULT_TTFT_S = 1.0
DEFAULT_TPOT_S = 0.060
DEFAULT_ADMIT_S = 6.0


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation as numpy's default; NaN when empty.

    ``inf`` values (requests never served) sort last, so a p99 over a set with >1% misses is inf.
    """
    xs = sorted(values)
    if not xs:
        return math.nan
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    if frac == 0.0 or xs[lo] == xs[hi]:
        return xs[lo]
    if math.isinf(xs[hi]):
        return math.inf
    return xs[lo] + (xs[hi] - xs[lo]) * frac


@dataclass
class RequestRecord:
    """What one system did with one trace request (times absolute, on the run's clock)."""

    request_id: str
    arrival_s: float
    num_prompt_tokens: int
    max_tokens: int
    adapter_id: str | None = None
    admitted_s: float | None = None  # first scheduled; None when not observable
    first_token_s: float | None = None
    finish_s: float | None = None
    num_output_tokens: int = 0  # tokens generated inside the window (partial if unfinished)
    tpot_s: float | None = None  # mean gap between output tokens after the first

    @property
    def ttft_s(self) -> float:
        return math.inf if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def is_finished(self) -> bool:
        return self.finish_s is not None

    def meets_slo(self, ttft_s: float = DEFAULT_TTFT_S, tpot_s: float = DEFAULT_TPOT_S) -> bool:
        if self.first_token_s is None or self.ttft_s > ttft_s:
            return False
        if self.tpot_s is not None and self.tpot_s > tpot_s:
            return False
        # an unfinished request with no tpot yet: its gaps so far are unknown, count it a miss
        return self.is_finished or self.tpot_s is not None

    def admitted_within(self, admit_s: float = DEFAULT_ADMIT_S) -> bool:
        t = self.admitted_s if self.admitted_s is not None else self.first_token_s
        return t is not None and t - self.arrival_s <= admit_s


@dataclass(frozen=True)
class ServingSummary:
    num_requests: int
    num_finished: int
    duration_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    slo_attainment: float
    admit6_attainment: float
    ttft_target_s: float
    tpot_target_s: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize_serving(
    records: Sequence[RequestRecord],
    duration_s: float,
    *,
    ttft_s: float = DEFAULT_TTFT_S,
    tpot_s: float = DEFAULT_TPOT_S,
    admit_s: float = DEFAULT_ADMIT_S,
) -> ServingSummary:
    """Summary over ``records`` (every request that arrived inside the window) and the window length.

    Throughput counts every output token generated inside the window (finished or not), so a baseline
    cut off by the time limit is measured at the rate it was actually producing.
    """
    n = len(records)
    finished = [r for r in records if r.is_finished]
    tokens = sum(r.num_output_tokens for r in records)
    tpots = [r.tpot_s for r in records if r.tpot_s is not None]
    dur = max(duration_s, 1e-9)
    return ServingSummary(
        num_requests=n,
        num_finished=len(finished),
        duration_s=duration_s,
        output_tokens=tokens,
        output_tokens_per_s=tokens / dur,
        requests_per_s=len(finished) / dur,
        ttft_p50_s=percentile([r.ttft_s for r in records], 50),
        ttft_p99_s=percentile([r.ttft_s for r in records], 99),
        tpot_p50_s=percentile(tpots, 50),
        tpot_p99_s=percentile(tpots, 99),
        slo_attainment=sum(r.meets_slo(ttft_s, tpot_s) for r in records) / n if n else math.nan,
        admit6_attainment=sum(r.admitted_within(admit_s) for r in records) / n if n else math.nan,
        ttft_target_s=ttft_s,
        tpot_target_s=tpot_s,
    )


def tpot_from_times(token_times: Sequence[float]) -> float | None:
    """Mean gap between consecutive output tokens after the first (None with fewer than two)."""
    if len(token_times) < 2:
        return None
    return (token_times[-1] - token_times[0]) / (len(token_times) - 1)


# ----------------------------------------------------------------------------------------------------
# fine-tuning


@dataclass(frozen=True)
class TrainingSummary:
    real_tokens: int  # tokens of real examples processed (no padding)
    padded_tokens: int  # tokens the GPU computed, padding included (== real for packed runs)
    seconds: float
    real_tokens_per_s: float
    padding_fraction: float
    optimizer_steps: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize_training(
    real_tokens: int, seconds: float, *, padded_tokens: int | None = None, optimizer_steps: int = 0
) -> TrainingSummary:
    padded = real_tokens if padded_tokens is None else padded_tokens
    return TrainingSummary(
        real_tokens=real_tokens,
        padded_tokens=padded,
        seconds=seconds,
        real_tokens_per_s=real_tokens / seconds if seconds > 0 else math.nan,
        padding_fraction=1.0 - real_tokens / padded if padded else 0.0,
        optimizer_steps=optimizer_steps,
    )


# ----------------------------------------------------------------------------------------------------
# floors


def decode_floor_s(
    weight_bytes: float, extra_bytes: float = 0.0, bandwidth_bps: float = H200_BANDWIDTH_BPS
) -> float:
    """Memory floor of one decode step: every weight byte (plus KV / adapter bytes) read once."""
    return (weight_bytes + extra_bytes) / bandwidth_bps


def kv_bytes_read(
    context_lens: Iterable[int], num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2
) -> int:
    """K and V bytes one decode step reads over the given context lengths."""
    per_token = 2 * num_layers * num_kv_heads * head_dim * dtype_bytes
    return per_token * sum(context_lens)


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is zero or either is NaN."""
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b
