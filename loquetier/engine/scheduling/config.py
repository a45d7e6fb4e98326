"""The scheduler's limits: one frozen, validated dataclass, ``EngineConfig.scheduler``.

Invariants: every knob has exactly one default, here; a ``SchedulerConfig`` that exists is valid
(``__post_init__`` checks every range, ``TrainScale`` the AIMD parameters). Times are in ms unless a
name ends in ``_s``; shares are in [0, 1]. ``prefill_coalesce_ms=None`` means "the scheduler's choice"
and is resolved once, when a ``Scheduler`` is built, from the graph paths it starts with
(``resolve_coalesce``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from loquetier.engine.scheduling.pricing import GraphPaths
from loquetier.engine.scheduling.train_scale import TrainScale

AUTO_PREFILL_COALESCE_MS = 100.0  # prefill_coalesce_ms=None when only decode-only steps replay graphs


@dataclass(frozen=True)
class SchedulerConfig:
    """What one step may hold and how the scheduler trades latency against training."""

    max_num_seqs: int = 64  # running inference sequences
    max_num_batched_tokens: int = 2048  # per-step token ceiling (decode rows + prefill + train + eval)
    max_prefill_chunk: int = 512
    min_prefill_tokens_per_step: int = 16
    default_ttft_ms: float = 1000.0
    default_tpot_ms: float = 100.0
    tpot_headroom: float = 0.9  # plan steps to this fraction of the tightest target
    slo_window: int = 256  # SLO events in the attainment window
    slo_target: float = 0.95  # window attainment below which training stops growing
    min_train_tokens_per_step: int = 0
    train_decrease: float = 0.5
    train_increase: float = 0.05
    min_train_scale: float = 0.05
    step_model_window: int = 128
    # A step may spend time decode rows banked by running ahead of their mean TPOT, up to this many
    # TPOT targets (1: every step within one target, i.e. TPOT enforced per token gap).
    tpot_burst: float = 8.0
    # With tpot_burst > 1: tokens of a sequence's future (at most what max_tokens leaves) whose
    # predicted decode-only steps may repay a longer training step now (0: spend only what was banked).
    # This is what lets training run beside decoders while an eager training step costs several TPOT
    # targets (docs/benchmarks/README.md has the measurements).
    tpot_lookahead: int = 16
    # When the step model says no training step fits the decoders' budget and no step has trained for
    # this long, one step trains on what half the spare time buys anyway (0: never), so an
    # overestimated fixed training price is measured again instead of starving training for good.
    train_probe_s: float = 2.0
    # > 0: a decode-only step holds new prefills back until the oldest waited this long, so arrivals
    # are prefilled together and most steps stay decode-only. None: AUTO_PREFILL_COALESCE_MS when only
    # decode-only steps replay graphs, else 0 (resolve_coalesce).
    prefill_coalesce_ms: float | None = None
    # With decode graphs: keep at least this many decode-only steps in the step model's window (a
    # step now and then skips optional training), so mixed_s stays identifiable from const_s.
    min_decode_only_samples: int = 8
    # A step that would otherwise be decode-only takes training only for at least this many times the
    # fixed prices the training triggers (mixed_s, train_step_s) in training work, or this many times
    # the most training work any step can carry, when that is less.
    train_amortize: float = 1.0
    # > 0: while serving (requests in the system, or one arrived in the last ``serving_idle_s``), no
    # step is planned longer than this share of the default TTFT target, training included. A request
    # that arrives during a step waits for it to end and then needs a prefill step of its own, so two
    # steps and the step model's error must fit its TTFT target; the decoders' TPOT budgets alone let
    # a training step last up to ``tpot_burst`` TPOT targets. 0: off (the decoders' budgets only).
    ttft_step_share: float = 0.0
    # The share of a prompt's remaining TTFT slack that a step carrying its prefill may be planned to
    # (training fills the rest of such a step). At tpot_headroom (0.9) a prompt that waited out a
    # training step gets a step planned to 90 % of what is left of its target, and a training step
    # that runs 10-15 % over its prediction takes it past the target.
    ttft_headroom: float = 0.9
    serving_idle_s: float = 5.0
    # > 0: a step's training is planned so that the whole step fits its budget at this quantile of an
    # eager step's time rather than at the step model's mean: the training phases scale every price
    # by the quantile of the fit's recent error on eager steps (StepTimeModel.margin, at least 1);
    # prompts and decode rows keep the fit's prices. 0: training planned at the fit too.
    plan_quantile: float = 0.9

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one decode row each)")
        if not 1 <= self.max_prefill_chunk <= self.max_num_batched_tokens:
            raise ValueError("max_prefill_chunk must be in [1, max_num_batched_tokens]")
        if not 0 <= self.min_prefill_tokens_per_step <= self.max_prefill_chunk:
            raise ValueError("min_prefill_tokens_per_step must be in [0, max_prefill_chunk]")
        if self.default_ttft_ms <= 0 or self.default_tpot_ms <= 0:
            raise ValueError("default SLO targets must be > 0")
        if not 0.0 < self.tpot_headroom <= 1.0:
            raise ValueError("tpot_headroom must be in (0, 1]")
        if self.slo_window < 1:
            raise ValueError("slo_window must be >= 1")
        if not 0.0 <= self.slo_target <= 1.0:
            raise ValueError("slo_target must be in [0, 1]")
        if not 0 <= self.min_train_tokens_per_step <= self.max_num_batched_tokens:
            raise ValueError("min_train_tokens_per_step must be in [0, max_num_batched_tokens]")
        if self.step_model_window < 2:
            raise ValueError("step_model_window must be >= 2")
        if not 1.0 <= self.tpot_burst <= 100.0:
            raise ValueError("tpot_burst must be in [1, 100]")
        if not 0.0 <= self.train_probe_s <= 3600.0:
            raise ValueError("train_probe_s must be in [0, 3600]")
        if not 0 <= self.tpot_lookahead <= 4096:
            raise ValueError("tpot_lookahead must be in [0, 4096]")
        if not 0.0 < self.train_amortize <= 100.0:
            raise ValueError("train_amortize must be in (0, 100]")
        if self.prefill_coalesce_ms is not None and not 0.0 <= self.prefill_coalesce_ms <= 60_000.0:
            raise ValueError("prefill_coalesce_ms must be in [0, 60000] or None")
        if not 0 <= self.min_decode_only_samples < self.step_model_window:
            raise ValueError("min_decode_only_samples must be in [0, step_model_window)")
        if not 0.0 < self.ttft_headroom <= 1.0:
            raise ValueError("ttft_headroom must be in (0, 1]")
        if not 0.0 <= self.ttft_step_share <= 1.0:
            raise ValueError("ttft_step_share must be in [0, 1]")
        if not 0.0 <= self.serving_idle_s <= 3600.0:
            raise ValueError("serving_idle_s must be in [0, 3600]")
        if not 0.0 <= self.plan_quantile < 1.0:
            raise ValueError("plan_quantile must be in [0, 1)")
        # TrainScale validates the AIMD parameters.
        TrainScale(self.train_decrease, self.train_increase, self.min_train_scale)


def resolve_coalesce(config: SchedulerConfig, graphs: GraphPaths) -> SchedulerConfig:
    """``config`` with ``prefill_coalesce_ms`` decided: coalescing is worth it only where a prefill
    step costs much more than a decode step, i.e. when decode-only steps replay graphs and steps with
    prompt rows do not."""
    if config.prefill_coalesce_ms is not None:
        return config
    auto = AUTO_PREFILL_COALESCE_MS if graphs.decode and not graphs.max_rows else 0.0
    return replace(config, prefill_coalesce_ms=auto)
