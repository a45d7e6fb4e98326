"""Scheduling: who runs in each engine step, and how long the step may last.

Modules, one concept each:

- ``config``: ``SchedulerConfig``, the scheduler's limits (``EngineConfig.scheduler``);
- ``queue``: ``RequestQueue``, waiting and running requests with the KV and adapter slots they hold;
- ``budget``: time budgets (mean-TPOT banking, TTFT slack) and token budgets (fair share, AIMD scale);
- ``slo``: the requests' latency contracts, attainment and the scheduler's counters;
- ``pricing``: what a step costs (``StepTimeModel``, fitted online) and which steps replay graphs;
- ``plan``: ``StepPlan``, one step in the making, passed through the phases;
- ``decode``, ``prefill``, ``training``: the phases of ``Scheduler.schedule``;
- ``scheduler``: ``Scheduler``, the spine (``schedule`` / ``postprocess``) and its request/job API.

Invariant: pure Python, no torch, no I/O, no clocks.
"""

from loquetier.engine.scheduling.config import SchedulerConfig
from loquetier.engine.scheduling.pricing import GraphPaths, StepCost, StepFeatures, StepTimeModel
from loquetier.engine.scheduling.scheduler import Scheduler, StepEvents

__all__ = ["GraphPaths", "Scheduler", "SchedulerConfig", "StepCost", "StepEvents", "StepFeatures", "StepTimeModel"]
