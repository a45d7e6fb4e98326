"""How late the event loop runs: a periodic task measures its own wakeup delay.

A task that asks to sleep ``interval_s`` and wakes later was kept waiting by whatever held the
loop (a long callback, a blocking call, a flood of small callbacks). The delays go to the
Prometheus histogram ``loquetier_event_loop_lag_seconds`` and, every ``report_s``, to one log line
with the percentiles of that period (``event loop lag``); :meth:`LoopLag.summary` gives those of
the whole run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque

from .metrics import LOOP_LAG

log = logging.getLogger(__name__)


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class LoopLag:
    def __init__(self, interval_s: float = 0.01, report_s: float = 10.0, keep: int = 100_000) -> None:
        self.interval_s = interval_s
        self.report_s = report_s
        self.samples: deque[float] = deque(maxlen=keep)  # seconds late, the newest last

    async def run(self) -> None:
        period: list[float] = []
        next_report = time.monotonic() + self.report_s
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, time.perf_counter() - start - self.interval_s)
            self.samples.append(lag)
            period.append(lag)
            LOOP_LAG.observe(lag)
            if time.monotonic() >= next_report:
                log.info("event loop lag", extra=_stats(period))
                period = []
                next_report = time.monotonic() + self.report_s

    def summary(self) -> dict[str, float]:
        return _stats(list(self.samples))


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"num": len(ordered), "p50_ms": round(_percentile(ordered, 50) * 1e3, 3),
            "p99_ms": round(_percentile(ordered, 99) * 1e3, 3),
            "max_ms": round((ordered[-1] if ordered else math.nan) * 1e3, 3)}
