"""The plan of one step: the batch taking shape and what each phase of ``Scheduler.schedule`` decided.

``schedule`` is a spine of phases (``decode``, ``training`` floors, ``prefill``, ``training`` fill),
each a public function that reads and extends one ``StepPlan``. Invariants: a phase only adds rows
to ``batch`` (never removes one another phase added, except preemption in the decode phase, which
runs first); ``tokens_left`` is what the step's token ceiling still allows after the rows so far and
the training floors; ``predicted`` is the step model's price of the rows so far (plus the fixed
prices they trigger), at the fit's prices: decode and prefill are planned at the fit, training at
``margin`` times it (``train_cost``), so the uncertainty of an eager step's time is taken from the
optional work, never from prompts; times are seconds on the caller's clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from loquetier.engine.scheduling.budget import JobDemand
from loquetier.engine.scheduling.pricing import GraphPaths, StepCost
from loquetier.engine.sequence import ScheduledBatch


@dataclass
class StepPlan:
    """One step in the making. Inputs first (set by the spine), then each phase's decisions."""

    batch: ScheduledBatch
    cost: StepCost  # the step model's current prices
    graphs: GraphPaths  # which steps replay graphs (the eager ones pay cost.mixed_s)
    train_scale: float  # the AIMD factor on training time (TrainScale.value)
    tokens_left: int  # the step's token ceiling less what is planned so far
    last_train_at: float | None = None  # when a step last trained (the train_probe_s clock)
    # the step model's margin (SchedulerConfig.plan_quantile): training, the optional work, is planned
    # so that the whole step fits its budget at this many times its fitted time
    margin: float = 1.0
    scheduled: set[str] = field(default_factory=set)  # seq_ids with a row in this step
    # decode phase
    time_budget: float | None = None  # the tightest decode budget; the training phase narrows it
    train_budget: float | None = None  # the same, borrowing against tpot_lookahead future tokens
    burst_cap: float = 0.0  # the longest step any decode row allows: tpot_burst targets
    repay_s: float | None = None  # predicted decode-only step of these rows (set with tpot_lookahead)
    # training floors
    demands: list[JobDemand] = field(default_factory=list)
    reserved: int = 0  # training tokens kept by floors
    mixed: bool = False  # the step runs eagerly (not a graph replay)
    probe_due: bool = False  # the step model needs a decode-only sample: stay decode-only if possible
    # prefill phase
    predicted: float = 0.0
    ride_budget: float | None = None  # a training step's time an eager prompt chunk may ride in
    hold_new: bool = False  # new requests wait to be prefilled together
    # training fill
    step_cap: float | None = None  # while serving: the longest step any arrival's TTFT allows
    train_time: float | None = None  # seconds training may use (None: no time cap)

    @property
    def now(self) -> float:
        return self.batch.now

    @cached_property
    def train_cost(self) -> StepCost:
        """The prices the training phases plan at: the fit's times ``margin`` (both fixed per plan)."""
        return self.cost if self.margin == 1.0 else self.cost.scaled(self.margin)

    @property
    def train_predicted(self) -> float:
        """``predicted`` at the training phases' prices: the step so far times ``margin``."""
        return self.predicted * self.margin
