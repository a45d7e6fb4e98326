"""The requests' side of a step's postprocessing: the scheduler has applied the sampled tokens;
here the step decides which requests a stop string finishes, tells the scheduler, and turns the
outcome into events. The request book only reports and records; it never drives the scheduler."""

from __future__ import annotations

from collections.abc import Callable

from loquetier.engine.events import EngineEvent
from loquetier.engine.requests import RequestBook
from loquetier.engine.scheduling.scheduler import Scheduler, StepEvents
from loquetier.engine.scheduling.slo import RequestMetrics


def request_events(step: StepEvents, logprobs: dict[str, float], requests: RequestBook, scheduler: Scheduler,
                   clock: Callable[[], float]) -> list[EngineEvent]:
    """Token and result events of one step's requests; a request whose stop string appeared in
    this step finishes now with ``"stop"``."""
    reads = requests.read_tokens(step, logprobs)
    stopped: dict[str, RequestMetrics] = {}
    for read in reads:
        if read.hit_stop and read.seq_id not in stopped:
            metrics = scheduler.finish(read.seq_id, "stop", clock())
            if metrics is not None:
                stopped[read.seq_id] = metrics
    return requests.events(step, reads, stopped)
