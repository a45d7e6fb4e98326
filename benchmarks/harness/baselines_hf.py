"""The baselines: Hugging Face transformers / PEFT used the way their users use them.

- :func:`replay_hf`: serve a trace with ``model.generate``. Between calls, up to ``max_batch`` waiting
  requests (FIFO) are grouped, left-padded, and generated together for the group's largest
  ``max_tokens`` (EOS suppressed, as our engine runs with ``ignore_eos``). With a PEFT model each row
  names its adapter (``adapter_names=[...]``, PEFT's mixed-batch inference); with a plain model no
  adapter is used. Timing is generous to the baseline: each request is credited with its tokens at the
  decode step that produced them (as if streamed), and only its own ``max_tokens`` count as output.
- :func:`peft_train_sequential`: fine-tuning jobs one after another, a plain torch loop over padded
  batches (AdamW, same lr and clipping as our jobs), real (non-pad) tokens counted.
- :func:`replay_peft_unified`: alternate one training step (jobs round-robin) and one generate batch
  over the same trace, the way one would share a GPU with PEFT.

Every loop has a wall-clock limit; a ``generate`` call is cut at the limit by a stopping criterion and
the tokens produced so far are counted, so a slow baseline is measured at the rate it really produced.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .metrics import RequestRecord, TrainingSummary, summarize_training, tpot_from_times
from .workload import Trace, TraceRequest, example_length

PAD_ID = 0
IGNORE_INDEX = -100
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names


def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class _StepClock(StoppingCriteria):
    """A stopping criterion that timestamps every decode step and stops at the deadline."""

    def __init__(self, clock: Callable[[], float], deadline: float) -> None:
        self.clock, self.deadline = clock, deadline
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor | bool:
        now = self.clock()
        self.times.append(now)
        stop = now >= self.deadline
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _left_pad(rows: Sequence[Sequence[int]], device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def generate_batch(
    model: Any,
    group: Sequence[TraceRequest],
    *,
    use_adapters: bool,
    clock: Callable[[], float],
    deadline: float,
    device: str | torch.device,
) -> list[float]:
    """One ``generate`` call over ``group``; returns the time of each decode step (token k of every row)."""
    ids, mask = _left_pad([r.prompt_token_ids for r in group], device)
    max_new = max(r.max_tokens for r in group)
    timer = _StepClock(clock, deadline)
    kwargs: dict[str, Any] = {}
    if use_adapters:
        kwargs["adapter_names"] = [r.adapter_id or BASE_ADAPTER for r in group]
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=PAD_ID,
            stopping_criteria=StoppingCriteriaList([timer]),
            **kwargs,
        )
    return timer.times


def replay_hf(
    model: Any,
    trace: Trace,
    *,
    max_batch: int = 32,
    use_adapters: bool,
    time_limit_s: float,
    device: str | torch.device = "cpu",
    log: Callable[[str], Any] = print,
) -> tuple[list[RequestRecord], float]:
    """Serve ``trace`` with HF ``generate``; returns (records of requests that arrived, window seconds)."""
    model.eval()
    reqs = trace.requests
    records = {
        r.request_id: RequestRecord(
            r.request_id, r.arrival_s, r.num_prompt_tokens, r.max_tokens, r.adapter_id
        )
        for r in reqs
    }
    waiting: deque[TraceRequest] = deque()
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    nxt = num_batches = 0
    while True:
        now = clock()
        while nxt < len(reqs) and reqs[nxt].arrival_s <= now:
            waiting.append(reqs[nxt])
            nxt += 1
        if now >= time_limit_s:
            break
        if not waiting:
            if nxt >= len(reqs):
                break
            time.sleep(max(0.0, min(reqs[nxt].arrival_s - now, time_limit_s - now)))
            continue
        group = [waiting.popleft() for _ in range(min(max_batch, len(waiting)))]
        times = generate_batch(
            model, group, use_adapters=use_adapters, clock=clock, deadline=time_limit_s, device=device
        )
        num_batches += 1
        for r in group:
            rec = records[r.request_id]
            mine = times[: r.max_tokens]
            rec.num_output_tokens = len(mine)
            if mine:
                rec.first_token_s = mine[0]
                rec.tpot_s = tpot_from_times(mine)
            if len(mine) == r.max_tokens:
                rec.finish_s = mine[-1]
    window = clock()
    arrived = [records[r.request_id] for r in reqs if r.arrival_s <= window]
    log(
        f"[hf] {'peft' if use_adapters else 'base'}: {num_batches} generate batches, "
        f"{sum(r.num_output_tokens for r in arrived)} tokens in {window:.1f}s"
    )
    return arrived, window


# ----------------------------------------------------------------------------------------------------
# training


@dataclass
class PeftJob:
    """One fine-tuning job for the PEFT baseline: a fresh adapter in the PEFT model plus its optimizer."""

    adapter_name: str
    examples: list[dict[str, list[int]]]
    batches: list[list[int]]
    optimizer: torch.optim.Optimizer | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    cursor: int = 0
    steps: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0

    @property
    def is_done(self) -> bool:
        return self.cursor >= len(self.batches)


def make_peft_jobs(
    model: Any,
    named_examples: Sequence[tuple[str, list[dict[str, list[int]]]]],
    *,
    rank: int,
    batch_size: int,
    lr: float,
) -> tuple[Any, list[PeftJob]]:
    """A fresh trainable LoRA per job (PEFT's default init and dtype handling) with its own AdamW.

    ``model`` is a plain transformers model (wrapped with ``get_peft_model``) or a PeftModel.
    """
    from peft import PeftModel, get_peft_model

    from .models import lora_config
    from .workload import padded_batches

    jobs = []
    for name, examples in named_examples:
        cfg = lora_config(rank, random_init=False)
        if isinstance(model, PeftModel):
            model.add_adapter(name, cfg)
        else:
            model = get_peft_model(model, cfg, adapter_name=name)
        params = [p for n, p in model.named_parameters() if f".{name}." in n]
        for p in params:
            p.requires_grad_(True)
        job = PeftJob(name, examples, padded_batches(examples, batch_size), params=params)
        job.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        jobs.append(job)
    return model, jobs


def _padded_train_batch(
    examples: Sequence[dict[str, list[int]]], device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and HF labels (IGNORE on prompt and padding)."""
    lens = [example_length(e) for e in examples]
    width = max(lens)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, ex in enumerate(examples):
        p, c = ex["prompt_token_ids"], ex["completion_token_ids"]
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, : len(p) + len(c)] = 1
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
    return ids.to(device), mask.to(device), labels.to(device)


def peft_train_step(
    peft_model: Any, job: PeftJob, device: str | torch.device, max_grad_norm: float | None = 1.0
) -> float:
    """One optimizer step of ``job`` on its next padded batch; returns the loss."""
    batch = [job.examples[i] for i in job.batches[job.cursor]]
    job.cursor += 1
    peft_model.train()
    peft_model.set_adapter(job.adapter_name)
    for p in job.params:
        p.requires_grad_(True)
    ids, mask, labels = _padded_train_batch(batch, device)
    out = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(job.params, max_grad_norm)
    assert job.optimizer is not None
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
    job.steps += 1
    job.real_tokens += int(mask.sum().item())
    job.padded_tokens += int(mask.numel())
    return float(out.loss.detach().item())


def peft_train_sequential(
    peft_model: Any,
    jobs: Sequence[PeftJob],
    *,
    time_limit_s: float,
    device: str | torch.device = "cpu",
    log: Callable[[str], Any] = print,
) -> TrainingSummary:
    """The jobs one after another (each gets an equal share of the time limit); real tokens/s.

    One untimed step of the first job warms the kernels up first (its tokens are not counted).
    """
    if jobs and not jobs[0].is_done:
        peft_train_step(peft_model, jobs[0], device)
        jobs[0].steps = jobs[0].real_tokens = jobs[0].padded_tokens = 0
    sync(device)
    start = time.perf_counter()
    per_job = time_limit_s / max(1, len(jobs))
    for k, job in enumerate(jobs):
        job_deadline = start + per_job * (k + 1)
        while not job.is_done and time.perf_counter() < job_deadline:
            peft_train_step(peft_model, job, device)
            sync(device)
    sync(device)
    seconds = time.perf_counter() - start
    real = sum(j.real_tokens for j in jobs)
    padded = sum(j.padded_tokens for j in jobs)
    summary = summarize_training(
        real, seconds, padded_tokens=padded, optimizer_steps=sum(j.steps for j in jobs)
    )
    log(
        f"[hf] peft training: {summary.optimizer_steps} steps, {real} real / {padded} padded tokens "
        f"in {seconds:.1f}s = {summary.real_tokens_per_s:.0f} real tokens/s"
    )
    return summary


def replay_peft_unified(
    peft_model: Any,
    trace: Trace,
    jobs: Sequence[PeftJob],
    *,
    max_batch: int = 32,
    time_limit_s: float,
    device: str | torch.device = "cpu",
    log: Callable[[str], Any] = print,
) -> tuple[list[RequestRecord], float, TrainingSummary]:
    """Alternate one training step (round-robin over unfinished jobs) and one PEFT generate batch."""
    reqs = trace.requests
    records = {
        r.request_id: RequestRecord(
            r.request_id, r.arrival_s, r.num_prompt_tokens, r.max_tokens, r.adapter_id
        )
        for r in reqs
    }
    waiting: deque[TraceRequest] = deque()
    sync(device)
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    nxt = turn = 0
    train_s = 0.0
    while True:
        now = clock()
        while nxt < len(reqs) and reqs[nxt].arrival_s <= now:
            waiting.append(reqs[nxt])
            nxt += 1
        if now >= time_limit_s or (nxt >= len(reqs) and not waiting):
            break
        live = [j for j in jobs if not j.is_done]
        if live:
            t0 = clock()
            peft_train_step(peft_model, live[turn % len(live)], device)
            sync(device)
            train_s += clock() - t0
            turn += 1
        if waiting:
            peft_model.eval()
            group = [waiting.popleft() for _ in range(min(max_batch, len(waiting)))]
            times = generate_batch(
                peft_model, group, use_adapters=True, clock=clock, deadline=time_limit_s, device=device
            )
            for r in group:
                rec = records[r.request_id]
                mine = times[: r.max_tokens]
                rec.num_output_tokens = len(mine)
                if mine:
                    rec.first_token_s = mine[0]
                    rec.tpot_s = tpot_from_times(mine)
                if len(mine) == r.max_tokens:
                    rec.finish_s = mine[-1]
        elif not live:
            time.sleep(max(0.0, min(reqs[nxt].arrival_s - now, time_limit_s - now)))
    window = clock()
    arrived = [records[r.request_id] for r in reqs if r.arrival_s <= window]
    real = sum(j.real_tokens for j in jobs)
    training = summarize_training(
        real,
        window,
        padded_tokens=sum(j.padded_tokens for j in jobs),
        optimizer_steps=sum(j.steps for j in jobs),
    )
    log(
        f"[hf] peft unified: {training.optimizer_steps} train steps ({train_s:.1f}s), "
        f"{sum(r.num_output_tokens for r in arrived)} output tokens in {window:.1f}s"
    )
    return arrived, window, training
