"""Step pricing: what a step costs, as a linear model fitted online by ridge least squares.

Semantics::

    time_s ≈ c0 + c1·prefill_tokens + c2·decode_rows + c3·train_tokens + c4·eval_tokens + c5·kv_tokens_read
             + c6·mixed + c7·training

``step_features(batch, graphs)`` reads a scheduled batch as those features: ``train_tokens`` are
forward+backward tokens, ``kv_tokens_read`` the KV positions attended over (see
``ScheduledBatch.num_kv_tokens_read``), ``mixed`` is 1 for a step that runs eagerly (``is_eager``: the
runner replays only the steps ``GraphPaths`` says from CUDA graphs), so ``c6`` is the fixed price of
leaving the graph path (about 0 without graphs); ``training`` is 1 for a step with training or eval
rows, whose fixed price ``c7`` is the backward pass's and the optimizers' launches.

Invariants of the fit (``StepTimeModel``):

- ridge regression *towards the prior* coefficients, one pseudo-observation per feature scaled to
  that feature's magnitude: a feature never seen keeps its prior, a feature seen before but not in
  the current window keeps its last fitted value, and a collinear window stays well posed;
- coefficients are >= 0, and the prices of a prompt, training and eval token at least
  ``token_floor`` of the prior's (a window of equal-sized training steps cannot tell the fixed price
  from the per-token one); the solve is bounded (``_solve_bounded``), never clamped after the fact;
- one window per regime (``_regime``: graph decode, graph steps with prompt rows, eager inference,
  training, ...), each of the last ``window`` steps of its kind and none older than ``max_age`` steps
  in all, so the frequent graph steps never push the rare regimes out of the fit;
- once ``robust_after`` steps were seen, a measurement is clipped to ``outlier_factor`` times the
  prediction plus ``outlier_slack_s`` before it enters the fit, and in the rare regimes a lone sample
  more than ``drop_ratio`` times its prediction (while the newest is not) is dropped
  (``_drop_lone_outlier``): one-off slow steps must not price a kind of work out for a window;
- ``margin(q)``: the q-quantile of the fit's one-step-ahead error on eager steps (measured over the
  time the fit predicted just before the step was seen, the last ``margin_window`` eager steps),
  at least 1 and at most ``MAX_MARGIN``; 1 until ``MIN_MARGIN_SAMPLES`` were seen. The fit is a
  mean; a scheduler that plans eager steps at ``margin`` times it (``StepCost.scaled``) plans to
  that quantile of their time instead, so steps that carry prefill and training overrun their
  budget about ``1 - q`` of the time whatever the spread of their time.

Pure Python (8x8 normal equations): no numpy/torch, no clocks.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from loquetier.engine.sequence import ScheduledBatch

NUM_FEATURES = 8
FEATURE_NAMES = ("const", "prefill_tokens", "decode_rows", "train_tokens", "eval_tokens", "kv_tokens_read",
                 "mixed", "training")
_KV, _MIXED, _TRAINING = (FEATURE_NAMES.index(n) for n in ("kv_tokens_read", "mixed", "training"))
_TOKEN_PRICES = tuple(FEATURE_NAMES.index(n) for n in ("prefill_tokens", "train_tokens", "eval_tokens"))
MIN_MARGIN_SAMPLES = 8  # eager steps seen before margin() moves off 1
MAX_MARGIN = 2.0  # margin() never plans an eager step at more than this many times its fitted time


@dataclass(frozen=True)
class StepFeatures:
    prefill_tokens: int = 0
    decode_rows: int = 0
    train_tokens: int = 0
    eval_tokens: int = 0
    kv_tokens_read: int = 0
    mixed: int = 0  # 1: prefill, training or eval rows in the step (no decode graph replay)
    training: int = 0  # 1: training or eval rows in the step

    def vector(self) -> tuple[float, ...]:
        return (
            1.0,
            float(self.prefill_tokens),
            float(self.decode_rows),
            float(self.train_tokens),
            float(self.eval_tokens),
            float(self.kv_tokens_read),
            float(self.mixed),
            float(self.training),
        )


@dataclass(frozen=True)
class StepCost:
    """Coefficients in seconds (per step, per token, per row)."""

    const_s: float = 5e-3
    prefill_token_s: float = 1e-4
    decode_row_s: float = 2e-4
    train_token_s: float = 3e-4
    eval_token_s: float = 1e-4
    kv_token_s: float = 1e-6
    mixed_s: float = 0.0  # fixed extra time of a step that cannot replay a decode graph
    train_step_s: float = 0.0  # fixed extra time of a step with training or eval rows

    def __post_init__(self) -> None:
        if min(self.as_tuple()) < 0:
            raise ValueError(f"step cost coefficients must be >= 0: {self}")

    def as_tuple(self) -> tuple[float, ...]:
        return (
            self.const_s,
            self.prefill_token_s,
            self.decode_row_s,
            self.train_token_s,
            self.eval_token_s,
            self.kv_token_s,
            self.mixed_s,
            self.train_step_s,
        )

    def predict(self, f: StepFeatures) -> float:
        return self.predict_vector(f.vector())

    def scaled(self, factor: float) -> StepCost:
        """Every price times ``factor`` (>= 0): the cost a step planned at ``factor`` times the fit pays."""
        if not factor >= 0.0:  # NaN too
            raise ValueError(f"scale factor must be >= 0, got {factor}")
        return StepCost(*(c * factor for c in self.as_tuple()))

    def predict_vector(self, x: tuple[float, ...]) -> float:
        return sum(c * v for c, v in zip(self.as_tuple(), x, strict=True))


@dataclass(frozen=True)
class GraphPaths:
    """Which steps the runner replays from CUDA graphs: the scheduler's picture of the runner.

    ``decode``: decode-only steps do. ``max_rows`` > 0: inference steps (prompt and decode rows, no
    training) of at most that many rows do too, unless their prompt rows read more than
    ``max_mean_context`` keys each on average (0: no such limit). The runner may give prefill graphs
    up (a capture that fails): ``Scheduler.fall_back_from_prefill_graphs`` records that.
    """

    decode: bool = False
    max_rows: int = 0
    max_mean_context: int = 0


def is_eager(graphs: GraphPaths, prefill_tokens: int, decode_rows: int, train_tokens: int,
             prefill_reads: int = 0) -> int:
    """1 for a step that runs eagerly: training or eval rows, or prefill rows past the graphs' rows,
    or prompt rows reading more than ``graphs.max_mean_context`` keys each on average
    (``prefill_reads``: the keys all of them read). A step counted as a graph step that ran eagerly
    would price the eager step's fixed cost into its few prompt tokens."""
    if train_tokens:
        return 1
    if not prefill_tokens:
        return 0
    if not (graphs.decode and graphs.max_rows) or prefill_tokens + decode_rows > graphs.max_rows:
        return 1
    return int(bool(graphs.max_mean_context) and prefill_reads > graphs.max_mean_context * prefill_tokens)


def step_features(batch: ScheduledBatch, graphs: GraphPaths, train_tokens: int | None = None,
                  eval_tokens: int | None = None) -> StepFeatures:
    """The features of ``batch``; ``train_tokens`` / ``eval_tokens`` None: as granted (else: as used)."""
    train = batch.num_train_tokens if train_tokens is None else train_tokens
    evals = batch.num_eval_tokens if eval_tokens is None else eval_tokens
    return StepFeatures(
        prefill_tokens=batch.num_prefill_tokens,
        decode_rows=batch.num_decode_rows,
        train_tokens=train,
        eval_tokens=evals,
        kv_tokens_read=batch.num_kv_tokens_read,
        mixed=is_eager(graphs, batch.num_prefill_tokens, batch.num_decode_rows, train + evals,
                       batch.num_prefill_row_reads),
        training=int(bool(train or evals)),
    )


class StepTimeModel:
    """Fits ``StepCost`` online from ``observe(features, measured_s)``; ``cost`` is the current fit."""

    def __init__(
        self,
        prior: StepCost | None = None,
        window: int = 128,
        prior_weight: float = 0.1,
        min_token_cost_s: float = 1e-7,
        outlier_factor: float = 4.0,
        outlier_slack_s: float = 0.02,
        robust_after: int = 16,
        max_age: int | None = None,
        drop_ratio: float = 1.5,
        token_floor: float = 0.25,
        margin_window: int = 64,
    ) -> None:
        if window < 2:
            raise ValueError("window must be >= 2")
        if prior_weight <= 0:
            raise ValueError("prior_weight must be > 0")
        if outlier_factor < 1.0 or drop_ratio < 1.0 or outlier_slack_s < 0.0 or robust_after < 0:
            raise ValueError("outlier_factor and drop_ratio must be >= 1, outlier_slack_s and robust_after >= 0")
        self.prior = prior or StepCost()
        self.cost = self.prior
        self.window = window
        self.max_age = 8 * window if max_age is None else max_age
        if self.max_age < window:
            raise ValueError("max_age must be >= window")
        self.prior_weight = prior_weight
        self.min_token_cost_s = min_token_cost_s
        if not 0.0 <= token_floor <= 1.0:
            raise ValueError("token_floor must be in [0, 1]")
        self.token_floor = token_floor
        self.outlier_factor = outlier_factor
        self.outlier_slack_s = outlier_slack_s
        self.robust_after = robust_after
        self.num_clipped = 0  # measurements clipped as outliers (see the module docstring)
        self.num_dropped = 0  # lone outliers dropped from a rare regime's window (_drop_lone_outlier)
        self.drop_ratio = drop_ratio
        if margin_window < MIN_MARGIN_SAMPLES:
            raise ValueError(f"margin_window must be >= {MIN_MARGIN_SAMPLES}")
        # measured / predicted of the latest eager steps, the prediction from the fit before each (margin)
        self._eager_errors: deque[float] = deque(maxlen=margin_window)
        # One window per regime (see _regime): the rare regimes keep their samples while graph steps stream.
        self._windows: dict[tuple[int, int, int], deque[tuple[int, tuple[float, ...], float]]] = {}
        # Running sums of X^T X and X^T y over the window (updated incrementally: O(64) per step).
        self._xtx = [[0.0] * NUM_FEATURES for _ in range(NUM_FEATURES)]
        self._xty = [0.0] * NUM_FEATURES
        self.num_observed = 0
        self._target = list(self.prior.as_tuple())  # ridge target per coefficient (see _fit)

    def predict(self, f: StepFeatures) -> float:
        return self.cost.predict(f)

    @property
    def num_decode_only(self) -> int:
        """Samples in the windows with ``mixed == 0`` (the graph-replay regime)."""
        return sum(len(w) for key, w in self._windows.items() if key[0] == 0)

    @property
    def num_samples(self) -> int:
        return sum(len(w) for w in self._windows.values())

    def observe(self, f: StepFeatures, measured_s: float) -> None:
        if measured_s < 0:
            raise ValueError("measured step time must be >= 0")
        predicted = self.cost.predict(f)
        if f.mixed and self.num_observed >= self.robust_after and predicted > 0.0:
            self._eager_errors.append(measured_s / predicted)  # before any clipping: the error as it was
        if self.num_observed >= self.robust_after:
            limit = self.outlier_factor * predicted + self.outlier_slack_s
            if measured_s > limit:
                measured_s = limit
                self.num_clipped += 1
        x = f.vector()
        samples = self._windows.setdefault(_regime(f), deque())
        samples.append((self.num_observed, x, measured_s))
        self._accumulate(x, measured_s, 1.0)
        if len(samples) > self.window:
            _, old_x, old_y = samples.popleft()
            self._accumulate(old_x, old_y, -1.0)
        oldest = self.num_observed - self.max_age
        for w in self._windows.values():
            while w and w[0][0] <= oldest:
                _, old_x, old_y = w.popleft()
                self._accumulate(old_x, old_y, -1.0)
        self.num_observed += 1
        self.cost = self._fit()
        if len(samples) >= 8 and self.num_observed > self.robust_after and _regime(f) != _GRAPH_DECODE:
            self._drop_lone_outlier(samples)

    def margin(self, quantile: float) -> float:
        """The ``quantile`` (in [0, 1); 0 turns the margin off) of measured over predicted time of the
        latest eager steps, clamped to [1, ``MAX_MARGIN``]; 1.0 while fewer than ``MIN_MARGIN_SAMPLES``
        were seen."""
        if not 0.0 <= quantile < 1.0:
            raise ValueError(f"quantile must be in [0, 1), got {quantile}")
        if quantile == 0.0 or len(self._eager_errors) < MIN_MARGIN_SAMPLES:
            return 1.0
        errors = sorted(self._eager_errors)
        q = errors[min(len(errors) - 1, max(0, math.ceil(quantile * len(errors)) - 1))]
        return min(max(q, 1.0), MAX_MARGIN)

    @property
    def num_eager_errors(self) -> int:
        """Eager steps in ``margin``'s window."""
        return len(self._eager_errors)

    def _drop_lone_outlier(self, samples: deque[tuple[int, tuple[float, ...], float]]) -> None:
        """Drop the one sample of a rare regime that is more than ``drop_ratio`` times its prediction
        (and ``outlier_slack_s`` over it), when it is the only such sample and not the newest: a
        one-off (a kernel compiled, an allocator growing) that came before the model could judge it,
        or that the few samples of the regime could not outvote, and that would otherwise price every
        step of its kind for a whole window. A lasting change keeps the newest sample above the fit too,
        and a fit that is off puts several samples above it: neither drops."""
        def excess(x: tuple[float, ...], y: float) -> float:
            return y - self.drop_ratio * self.cost.predict_vector(x) - self.outlier_slack_s

        above = [s for s in samples if excess(s[1], s[2]) > 0.0]
        if len(above) != 1 or above[0] is samples[-1]:
            return  # none, the newest (a change may be starting) or several (the fit is off, not them)
        worst = above[0]
        samples.remove(worst)
        self._accumulate(worst[1], worst[2], -1.0)
        self.num_dropped += 1
        self.cost = self._fit()

    def _accumulate(self, x: tuple[float, ...], y: float, sign: float) -> None:
        for i in range(NUM_FEATURES):
            if x[i] == 0.0:
                continue
            self._xty[i] += sign * x[i] * y
            row = self._xtx[i]
            for j in range(NUM_FEATURES):
                row[j] += sign * x[i] * x[j]

    def _fit(self) -> StepCost:
        n = self.num_samples
        # A feature the window has not seen (e.g. no prefill during a quiet spell) is pulled towards
        # its last fitted value rather than the prior: a rare regime is remembered, not relearned.
        prior = self._target
        xtx = [row[:] for row in self._xtx]
        xty = self._xty[:]
        for i in range(NUM_FEATURES):
            # One pseudo-observation per feature at the feature's typical magnitude, pulling to the target.
            scale = xtx[i][i] / n if xtx[i][i] > 1e-12 else 1.0
            lam = self.prior_weight * scale
            xtx[i][i] += lam
            xty[i] += lam * prior[i]
        floors = [0.0] + [self.min_token_cost_s] * (NUM_FEATURES - 1)
        floors[_KV] = 0.0  # kv cost may legitimately be ~0
        floors[_MIXED] = 0.0  # no graphs: mixed and decode-only steps cost the same
        floors[_TRAINING] = 0.0
        for i in _TOKEN_PRICES:  # a prompt, training or eval token is never close to free
            floors[i] = max(floors[i], self.token_floor * self.prior.as_tuple()[i])
        clamped = _solve_bounded(xtx, xty, floors)
        self._target = [c if self._xtx[i][i] > 1e-12 else t
                        for i, (c, t) in enumerate(zip(clamped, self._target, strict=True))]
        return StepCost(*clamped)


_GRAPH_DECODE = (0, 0, 0)  # the regime of decode-only steps (see _regime)


def _regime(f: StepFeatures) -> tuple[int, int, int]:
    """A step's kind: graph replay or eager, with training or eval rows, with prompt rows."""
    return (f.mixed, f.training, int(f.prefill_tokens > 0))


def _solve_bounded(a: list[list[float]], b: list[float], floors: list[float]) -> list[float]:
    """Least squares with each coefficient at or above its floor: solve, pin the coefficients below
    their floor at it, solve again for the others (their right-hand side less the pinned terms), until
    none is below. Clamping one unconstrained solution instead would keep the others at values that
    only made sense beside the clamped one's negative value (e.g. a negative price per training token
    offset by an absurd price per prompt token when the two came together in the window's steps)."""
    n = len(b)
    pinned: dict[int, float] = {}
    x = list(floors)
    for _ in range(n):
        free = [i for i in range(n) if i not in pinned]
        rhs = [b[i] - sum(a[i][j] * v for j, v in pinned.items()) for i in free]
        sol = _solve([[a[i][j] for j in free] for i in free], rhs)
        below = [i for i, v in zip(free, sol, strict=True) if v < floors[i]]
        for i, v in zip(free, sol, strict=True):
            x[i] = v
        if not below:
            break
        for i in below:
            pinned[i] = floors[i]
            x[i] = floors[i]
    return [max(v, lo) for v, lo in zip(x, floors, strict=True)]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve ``a x = b`` for symmetric positive definite ``a``: Jacobi-scaled (features range from 1
    to ~1e5 per step, so the normal equations span ~1e10 in scale), then Gaussian elimination with
    partial pivoting."""
    d = [math.sqrt(a[i][i]) if a[i][i] > 0.0 else 1.0 for i in range(len(b))]
    x = _eliminate([[a[i][j] / (d[i] * d[j]) for j in range(len(b))] for i in range(len(b))],
                   [b[i] / d[i] for i in range(len(b))])
    return [x[i] / d[i] for i in range(len(b))]


def _eliminate(a: list[list[float]], b: list[float]) -> list[float]:
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        p = m[col][col]
        if p == 0.0:
            continue
        for r in range(col + 1, n):
            factor = m[r][col] / p
            if factor != 0.0:
                for c in range(col, n + 1):
                    m[r][c] -= factor * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        s = m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))
        x[r] = s / m[r][r] if m[r][r] != 0.0 else 0.0
    return x
