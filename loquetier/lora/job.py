"""TrainingJob: one independent fine-tuning run of one adapter on the shared base model.

The job owns a pinned training slot, fp32 master weights, its optimizer, LR schedule, gradient
accumulation, clipping, seed and data order. The engine drives it without knowing its internals::

    mb = job.next_micro_batch()               # whole sequences, packed up to micro_batch_tokens
    ...  b.add_train(seq.token_ids, seq.labels, slot=job.slot, group=(job.job_id, mb.index))
    ...  backward of loss_sum[group] / mb.num_target_tokens   (possibly over several steps)
    job.on_micro_batch_done(loss_sum, mb.num_target_tokens)   # may run an optimizer step

The engine calls ``job.queue_update(loss_sum_on_device)`` between the two, before it reads the step's
losses: the optimizer step is then queued on the device there, and ``on_micro_batch_done`` accounts it.

Gradients: backward accumulates fp32 LoRA gradients into ``ModuleLoRA.grad_a/grad_b[slot, :r]``.
The masters' ``.grad`` ARE those slices (set once, zeroed in place), so the optimizer reads them
directly. Masters are kept in slot layout: ``a`` = A [r, in], ``bt`` = B.T [r, out]; every update
is elementwise or a global norm, so the layout changes nothing. At an accumulation boundary the
summed per-micro-batch means are divided by the number of micro-batches (HF Trainer semantics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .adapter import LoRAAdapter
from .config import AdapterError, LoRAConfig
from .data import DataCursor, DataStream, MicroBatch, TrainSequence, data_fingerprint
from .evaluate import EvalResult, EvaluationJob
from .manager import AdapterManager
from .params import TrainingParams
from .schedule import lr_at

_MAX_COUNTED_EXAMPLES = 1 << 20  # example visits packed to count a run's steps (~1 s of host work)


@dataclass
class JobMetrics:
    losses: list[float] = field(default_factory=list)  # mean completion-token loss of each optimizer step
    lrs: list[float] = field(default_factory=list)  # LR used by each optimizer step
    evals: list[tuple[int, EvalResult]] = field(default_factory=list)  # (step, result)
    num_tokens: int = 0  # tokens (prompt + completion) of finished micro-batches
    num_target_tokens: int = 0  # completion tokens scored


TRAIN_KEY_PREFIX = "\x00train:"  # ids with a NUL are refused (Engine, wire), so no adapter id is a job's key


def is_internal_key(value: object) -> bool:
    """An engine-private manager key (it has a NUL): refused wherever a caller names an adapter."""
    return isinstance(value, str) and "\x00" in value


def train_key(job_id: str) -> str:
    """The adapter manager's key for the weights a job trains."""
    return TRAIN_KEY_PREFIX + job_id


class TrainingJob:
    _adam: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None  # see _adam_lists

    def __init__(self, job_id: str, adapter_id: str, manager: AdapterManager,
                 data: Sequence[TrainSequence], params: TrainingParams, *,
                 lora: LoRAConfig | None = None, init: LoRAAdapter | None = None,
                 eval_data: Sequence[TrainSequence] | None = None, data_fingerprint: str | None = None) -> None:
        """Start a job. ``init`` (an existing adapter to continue from) or ``lora`` (a new
        PEFT-initialised adapter drawn from ``params.seed``). Registers the weights with the manager
        under a key of the job's own (``train_key``), not under ``adapter_id``: an adapter of that id
        keeps serving its weights while the job trains, and nothing can ask for the weights in
        training by name. Takes a training slot."""
        if init is None:
            if lora is None:
                raise AdapterError("a training job needs either `lora` (new adapter) or `init`")
            manager.check_fits(lora)
            init = LoRAAdapter.new(lora, manager.pool.dims, seed=params.seed)
        if init.config.dropout:
            raise AdapterError("LoRA dropout is not implemented by the SMLM kernels; use dropout=0")
        self._job_id, self.adapter_id, self.manager, self.params = job_id, adapter_id, manager, params
        self.config, self.eval_data = init.config, eval_data
        self.stream = DataStream(data, micro_batch_tokens=params.micro_batch_tokens, seed=params.seed,
                                 num_epochs=params.num_epochs)
        self.total_steps = self._count_steps()
        self.generator = torch.Generator().manual_seed(params.seed)  # for stochastic ops (none yet)
        self.step, self.metrics = 0, JobMetrics()
        self._running: MicroBatch | None = None
        self._queued: float | BaseException | None = None  # the lr of an update queued (queue_update)
        self._accum: list[tuple[float, int]] = []  # (loss_sum, num_target_tokens) since the last step
        self._eval: EvaluationJob | None = None
        self.checkpointed_step, self._last_eval = -1, -1  # step of the last checkpoint (checkpoint.py)
        self._window: tuple[DataCursor, int, int, int] | None = None  # see rewind()
        self._fingerprint = data_fingerprint
        self.key = train_key(job_id)
        manager.load(self.key, init)
        try:
            self.slot = manager.acquire_train_slot(self.key)
        except AdapterError:
            manager.unload(self.key)
            raise
        self._build_masters(init)

    # --- the scheduler's TrainWork protocol ---------------------------------------------------

    @property
    def job_id(self) -> str:
        return self._job_id

    @property
    def priority(self) -> int:
        return self.params.priority

    @property
    def min_share(self) -> float:
        return self.params.min_share

    @property
    def is_eval(self) -> bool:
        return False

    def num_ready_tokens(self) -> int:
        """Tokens of the next micro-batch; 0 while one runs, an eval of this job runs, or when done."""
        if self._running is not None or self.is_done or (self._eval is not None and not self._eval.is_done):
            return 0
        return self.stream.peek_num_tokens()

    # --- driving the job -------------------------------------------------------------------------

    @property
    def is_done(self) -> bool:
        if self.params.max_steps is not None and self.step >= self.params.max_steps:
            return True
        return self.stream.is_exhausted and self._running is None and not self._accum

    def next_micro_batch(self) -> MicroBatch | None:
        """The next micro-batch to run, or None when the job has no more data."""
        if self._running is not None:
            raise RuntimeError(f"{self._job_id}: micro-batch {self._running.index} is still running")
        if self.is_done:
            return None
        if not self._accum:  # the first micro-batch of an accumulation window: where rewind() returns to
            m = self.metrics
            self._window = (self.stream.cursor, self.stream.num_micro_batches, m.num_tokens, m.num_target_tokens)
        self._running = self.stream.next()
        return self._running

    def rewind(self) -> None:
        """Start the current accumulation window again: zero the gradients and put the data back
        where the window began. For a step that failed after this job's rows entered it (their
        backward may have added part of a gradient); the window's micro-batches are run again."""
        self.zero_grad()
        self._running, self._queued = None, None
        self._accum.clear()
        if self._window is not None:
            cursor, num_micro_batches, num_tokens, num_target_tokens = self._window
            self.stream.cursor, self.stream.num_micro_batches = cursor, num_micro_batches
            self.metrics.num_tokens, self.metrics.num_target_tokens = num_tokens, num_target_tokens

    def on_micro_batch_done(self, loss_sum: float, num_target_tokens: int) -> bool:
        """The running micro-batch's backward is complete (its gradients are in the slot).

        ``loss_sum``: summed token cross-entropy of its completion tokens (for metrics only; the
        gradient was already scaled by the engine). Returns True when an optimizer step ran.
        """
        mb = self._running
        if mb is None:
            raise RuntimeError(f"{self._job_id}: no micro-batch is running")
        self._running = None
        queued, self._queued = self._queued, None
        if isinstance(queued, BaseException):
            raise queued
        self._accum.append((float(loss_sum), int(num_target_tokens)))
        self.metrics.num_tokens += mb.num_tokens
        self.metrics.num_target_tokens += int(num_target_tokens)
        boundary = self._closes_window(len(self._accum))
        if boundary:
            self._account(queued if queued is not None else self._update(len(self._accum)))
        return boundary

    def queue_update(self, loss_sum: torch.Tensor) -> bool:
        """Queue on the device now the optimizer step that the running micro-batch's completion makes
        (``on_micro_batch_done`` then only accounts it), skipped on the device if ``loss_sum``, the
        micro-batch's last piece's loss still on the device, is not finite (that job then fails, as
        its host check finds). The engine calls it after a step's backward, before it reads the
        step's losses: the host's launches of the update run while the GPU ends the backward,
        instead of between two steps. False when nothing was queued: not AdamW, or the micro-batch
        does not end the accumulation window."""
        if (self._running is None or self._queued is not None or not isinstance(self.optimizer, torch.optim.AdamW)
                or not self._closes_window(len(self._accum) + 1)):
            return False
        try:
            self._queued = self._update(len(self._accum) + 1, found_inf=(~torch.isfinite(loss_sum)).float())
        except Exception as exc:  # raised where the host accounts it: this job fails, alone
            self._queued = exc
        return True

    def _closes_window(self, num_micro_batches: int) -> bool:
        return num_micro_batches == self.params.grad_accum or self.stream.is_exhausted

    def _update(self, num_micro_batches: int, found_inf: torch.Tensor | None = None) -> float:
        """The optimizer step's device work over ``num_micro_batches`` accumulated micro-batches;
        its lr. With ``found_inf`` (1.0 on the device: a non-finite loss) the weights and the
        optimizer's state stay as they were, and the gradients are zeroed either way."""
        if num_micro_batches > 1:
            torch._foreach_div_(self._grads, num_micro_batches)  # one multi-tensor launch, not one per tensor
        if self.params.max_grad_norm is not None:
            self._clip(self.params.max_grad_norm)
        lr = lr_at(self.step, base_lr=self.params.lr, schedule=self.params.lr_schedule,
                   warmup_steps=self.params.warmup_steps, total_steps=self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if isinstance(self.optimizer, torch.optim.AdamW):
            self._adamw_step(lr, found_inf)
        else:
            self.optimizer.step()
        self._sync_slot()
        self.zero_grad()
        return lr

    def _account(self, lr: float) -> None:
        """The host's side of an optimizer step whose device work is queued."""
        n = len(self._accum)
        self.metrics.losses.append(sum(s / max(1, c) for s, c in self._accum) / n)
        self.metrics.lrs.append(lr)
        self._accum.clear()
        self.step += 1
        self.manager.mark_updated(self.key)

    def zero_grad(self) -> None:
        torch._foreach_zero_(self._grads)

    # Each optimizer step works on some 450 tensors a job (two per target module and layer of an 8B
    # model). torch's own ``clip_grad_norm_`` and ``AdamW.step`` walk and group them in Python on
    # every call: a few ms of host time a job, which the GPU waits for between two training steps.
    # The two below make the same multi-tensor calls over lists built once.

    @torch.no_grad()
    def _clip(self, max_norm: float) -> None:
        """``clip_grad_norm_(params, max_norm)``: the global 2-norm, then one scale of every gradient
        (by min(1, max_norm / (norm + 1e-6)), on the device: no synchronization)."""
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self._grads)))
        torch._foreach_mul_(self._grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))

    @torch.no_grad()
    def _adamw_step(self, lr: float, found_inf: torch.Tensor | None = None) -> None:
        """``AdamW(fused=True).step()``: the same fused kernel over the same state, which stays the
        optimizer's own (checkpoints dump and load it as before); one step count for all tensors.
        ``found_inf`` as a grad scaler gives it: 1.0 skips the step on the device."""
        if self._adam is None:
            self._adam = self._adam_lists()
        avgs, sqs, step = self._adam
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        step.add_(1)
        torch._fused_adamw_(self._param_data, self._grads, avgs, sqs, [], [step] * len(avgs), amsgrad=False,
                            lr=lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                            eps=group["eps"], maximize=False, grad_scale=None, found_inf=found_inf)
        if found_inf is not None:
            step.sub_(found_inf)

    def _adam_lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The optimizer's state as the fused kernel takes it, created as ``AdamW`` creates it on its
        first step where it is missing; every tensor's step is one tensor (they are all equal)."""
        state = self.optimizer.state
        first = state[self._params[0]]
        step = first["step"] if "step" in first else torch.zeros((), dtype=torch.float32, device=self._params[0].device)
        for p in self._params:
            st = state[p]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] = step
        return [state[p]["exp_avg"] for p in self._params], [state[p]["exp_avg_sq"] for p in self._params], step

    def load_optimizer_state(self, state_dict: dict[str, object]) -> None:
        """The optimizer's state from a checkpoint (``checkpoint.restore``)."""
        self.optimizer.load_state_dict(state_dict)
        self._adam = None

    @property
    def should_checkpoint(self) -> bool:
        every = self.params.checkpoint_every
        due = (every > 0 and self.step > 0 and self.step % every == 0) or self.is_done
        return due and self.checkpointed_step != self.step and self.at_boundary

    @property
    def should_eval(self) -> bool:
        if not self.eval_data or self._last_eval == self.step or not self.at_boundary:
            return False
        every = self.params.eval_every
        return (every > 0 and self.step > 0 and self.step % every == 0) or self.is_done

    def start_eval(self) -> EvaluationJob:
        """An eval of the current weights; training waits (num_ready_tokens() == 0) until it is done."""
        if not self.eval_data:
            raise RuntimeError(f"{self._job_id}: no eval data")
        step = self.step
        self._last_eval = step
        self._eval = EvaluationJob(f"{self._job_id}/eval@{step}", self.adapter_id, self.eval_data,
                                   micro_batch_tokens=self.params.micro_batch_tokens,
                                   priority=self.params.priority, min_share=self.params.min_share,
                                   on_done=lambda r: self.metrics.evals.append((step, r)))
        return self._eval

    @property
    def at_boundary(self) -> bool:
        """Between optimizer steps: no micro-batch running, nothing accumulated."""
        return self._running is None and not self._accum

    # --- weights ---------------------------------------------------------------------------------

    def adapter(self) -> LoRAAdapter:
        """A CPU snapshot of the current weights in PEFT layout (fp32)."""
        weights = {key: (a.detach().cpu().clone(), bt.detach().T.cpu().contiguous())
                   for key, (a, bt) in self.masters.items()}
        return LoRAAdapter(self.config, weights)

    def finish(self) -> LoRAAdapter:
        """Release the training slot and the job's key; returns the trained adapter (the caller
        installs it under ``adapter_id``)."""
        trained = self.adapter()
        self.manager.release_train_slot(self.key, trained)
        self.manager.unload(self.key)
        return trained

    def abandon(self) -> None:
        """Release the training slot and the job's key, keeping nothing (a failed or cancelled job)."""
        self.manager.release_train_slot(self.key)
        self.manager.unload(self.key)

    def _build_masters(self, init: LoRAAdapter) -> None:
        device, r = self.manager.pool.device, self.config.rank
        self.masters: dict[tuple[int, str], tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self._params: list[torch.nn.Parameter] = []
        # in master order, for one multi-tensor launch each: the gradient slices the kernels
        # accumulate into, and the slot's weights in the pool that each optimizer step refreshes
        self._grads: list[torch.Tensor] = []
        self._slot_views: list[torch.Tensor] = []
        for key, (a, b) in sorted(init.weights.items()):
            lora = self.manager.pool.get(*key)
            assert lora.grad_a is not None and lora.grad_b is not None
            pa = torch.nn.Parameter(a.detach().to(device, torch.float32).clone())
            pb = torch.nn.Parameter(b.detach().T.to(device, torch.float32).contiguous())
            ga, gb = lora.grad_a[self.slot, :r], lora.grad_b[self.slot, :r]
            pa.grad, pb.grad = ga, gb
            self.masters[key] = (pa, pb)
            self._params += [pa, pb]
            self._grads += [ga, gb]
            self._slot_views += [lora.a[self.slot, :r], lora.b[self.slot, :r]]
        self._param_data = [p.detach() for p in self._params]
        self._adam = None
        self.zero_grad()
        if self.params.optimizer == "adamw":
            # fused: one multi-tensor kernel over the job's tensors, the step count on the device
            # (the foreach path reads one step count per tensor on the host: ~450 of them per job)
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self._params, lr=self.params.lr, weight_decay=self.params.weight_decay, fused=True)
        else:
            self.optimizer = torch.optim.SGD(self._params, lr=self.params.lr,
                                             weight_decay=self.params.weight_decay)
        self._sync_slot()

    @torch.no_grad()
    def _sync_slot(self) -> None:
        """The fp32 masters into the slot's pool weights (model dtype), one multi-tensor copy."""
        torch._foreach_copy_(self._slot_views, self._param_data)

    def _count_steps(self) -> int | None:
        """Optimizer steps of the whole run (for the LR schedule and progress).

        Each epoch packs its own shuffled order, so an epoch's micro-batch count is known only by
        packing it: that is done for at most ``_MAX_COUNTED_EXAMPLES`` example visits (and never past
        ``max_steps``); later epochs count as the mean of the packed ones. The work is bounded
        whatever ``epochs`` says (10**12 epochs once looped here for good), and the same data and
        params always give the same count, so a resumed run keeps its schedule.
        """
        params = self.params
        num_epochs = params.num_epochs
        if num_epochs is None:
            return params.max_steps
        enough = None if params.max_steps is None else params.max_steps * params.grad_accum
        num_counted = max(1, min(num_epochs, _MAX_COUNTED_EXAMPLES // len(self.stream.sequences)))
        num_mb = 0
        for epoch in range(num_counted):
            num_mb += self.stream.micro_batches_per_epoch(epoch)
            if enough is not None and num_mb >= enough:
                return params.max_steps
        if num_epochs > num_counted:
            num_mb = math.ceil(num_mb * (num_epochs / num_counted))
        steps = math.ceil(num_mb / params.grad_accum)
        return steps if params.max_steps is None else min(steps, params.max_steps)

    # --- checkpoints (taken and restored by checkpoint.py) ------------------------------------------

    @property
    def data_fingerprint(self) -> str:
        """The training data's hash, computed once (given when the data was prepared ahead)."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.stream.sequences)
        return self._fingerprint
