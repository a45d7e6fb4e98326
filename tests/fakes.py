"""A deterministic stand-in for ``loquetier.engine.engine.Engine`` (same API, no model).

Generation echoes: output token ``i`` is ``(prompt[i % len(prompt)] + 1) % vocab``, one
token per request per step, ``finish_reason="length"`` after ``max_tokens``. Training: one
optimizer step per engine step, loss ``1 / (1 + step)``, a checkpoint every
``checkpoint_every`` steps whose bytes are enough to resume exactly; the exported adapter
is a function of (adapter_id, steps run, seed) only, so a resumed run exports the same
bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from loquetier.engine.errors import EngineError
from loquetier.engine.events import (
    JobCheckpoint,
    JobEvaluated,
    JobFinished,
    JobProgress,
    RequestFinished,
    Timings,
    TokenEvent,
    Usage,
)

VOCAB = 1000


class FakeEngineError(EngineError):
    """Raised where the real engine raises its EngineError, with the same codes."""


class FakeTokenizer:
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1 + (sum(map(ord, w)) % (VOCAB - 1)) for w in text.split()] or [1]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" t{i}" for i in ids)


@dataclass
class _Req:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    stream: bool
    adapter_id: str | None
    out: list[int] = field(default_factory=list)


@dataclass
class _Job:
    job_id: str
    adapter_id: str
    kind: str
    total_steps: int
    checkpoint_every: int
    seed: int
    step: int = 0
    paused: bool = False
    install: bool = True  # as the engine's: on success the adapter is the job's result


class FakeEngine:
    def __init__(self, max_prompt_tokens: int = 64, max_steps_per_step: int = 1) -> None:
        self.tokenizer = FakeTokenizer()
        self.max_prompt_tokens = max_prompt_tokens
        self.requests: dict[str, _Req] = {}
        self.jobs: dict[str, _Job] = {}
        self._cancelled: list[Any] = []  # JobFinished("cancelled") of cancel_job, given out by the next step
        self.hold_cancelled = False  # tests: keep those events back (a slow step) until set False
        self.adapters: dict[str, bytes] = {}
        self.num_submitted = 0
        self.submitted_ids: list[str] = []
        self.arrived_at: dict[str, float | None] = {}  # request_id -> the arrived_at it was added with
        self.max_unstored_checkpoints = 0
        self.stored_checkpoints: list[str] = []  # job ids, one per checkpoint_stored call

    @classmethod
    def from_pretrained(
        cls, model_dir: str, device: str = "cpu", dtype: str = "float32", **limits: Any
    ) -> FakeEngine:
        return cls()

    # --- inference -------------------------------------------------------------------

    def add_request(  # noqa: PLR0917
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        adapter_id: str | None = None,
        sampling: Any = None,
        priority: int = 0,
        ttft_ms: float | None = None,
        tpot_ms: float | None = None,
        stream: bool = False,
        arrived_at: float | None = None,
    ) -> None:
        if request_id in self.requests:
            raise FakeEngineError("duplicate_request", f"request {request_id!r} is already running")
        if adapter_id is not None and adapter_id not in self.adapters:
            raise FakeEngineError("unknown_adapter", f"adapter {adapter_id!r} is not loaded")
        ids = prompt_token_ids if prompt_token_ids is not None else self.tokenizer.encode(prompt or "")
        if len(ids) > self.max_prompt_tokens:
            raise FakeEngineError("prompt_too_long", f"{len(ids)} > {self.max_prompt_tokens}")
        max_tokens = sampling.max_tokens if sampling is not None else 16
        shift = sum(self.adapters[adapter_id]) % 7 if adapter_id else 0
        self.requests[request_id] = _Req(
            request_id, [(i + shift) % VOCAB for i in ids], max_tokens, stream, adapter_id
        )
        self.num_submitted += 1
        self.submitted_ids.append(request_id)
        self.arrived_at[request_id] = arrived_at

    def abort(self, request_id: str) -> bool:
        return self.requests.pop(request_id, None) is not None

    def has_work(self) -> bool:
        return (bool(self.requests) or (bool(self._cancelled) and not self.hold_cancelled)
                or any(not j.paused for j in self.jobs.values()))

    def step(self) -> list[Any]:
        events: list[Any] = []
        if not self.hold_cancelled:  # as the engine: a cancel's event comes with the next step
            events, self._cancelled = list(self._cancelled), []
        for req in list(self.requests.values()):
            token = (req.prompt_ids[len(req.out) % len(req.prompt_ids)] + 1) % VOCAB
            req.out.append(token)
            if req.stream:
                events.append(TokenEvent(req.request_id, [token], self.tokenizer.decode([token])))
            if len(req.out) >= req.max_tokens:
                del self.requests[req.request_id]
                events.append(
                    RequestFinished(
                        req.request_id,
                        list(req.out),
                        self.tokenizer.decode(req.out),
                        "length",
                        Usage(len(req.prompt_ids), len(req.out)),
                        Timings(1.0, 2.0, 3.0),
                        adapter_id=req.adapter_id,
                    )
                )
        for job in list(self.jobs.values()):
            if not job.paused:
                events.extend(self._train_step(job))
        return events

    # --- adapters ----------------------------------------------------------------------

    def load_adapter_bytes(self, adapter_id: str, data: bytes) -> int:
        self.adapters[adapter_id] = data
        return 1

    def replace_adapter(self, adapter_id: str, source: bytes) -> bool:
        self.adapters[adapter_id] = source
        return True

    def load_adapter(self, adapter_id: str, path: Any) -> int:
        return self.load_adapter_bytes(adapter_id, str(path).encode())

    def unload_adapter(self, adapter_id: str) -> None:
        self.adapters.pop(adapter_id, None)

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self.adapters

    def export_adapter(self, adapter_id: str) -> bytes:
        return self.adapters[adapter_id]

    # --- training ----------------------------------------------------------------------

    def add_training_job(  # noqa: PLR0917
        self,
        adapter_id: str,
        data: Any,
        params: Any,
        lora: dict[str, Any] | None = None,
        base_adapter: str | None = None,
        eval_data: Any = None,
        job_id: str | None = None,
        priority: int = 0,
        kind: str = "finetune",
        checkpoint: bytes | None = None,
        install: bool = True,
    ) -> str:
        job_id = job_id or f"job-{len(self.jobs)}"
        total = params.max_steps or 4
        job = _Job(
            job_id, adapter_id, kind, total if kind == "finetune" else 1, params.checkpoint_every, params.seed
        )
        job.install = install
        if checkpoint is not None:
            job.step = json.loads(checkpoint)["step"]
        self.jobs[job_id] = job
        return job_id

    def _train_step(self, job: _Job) -> list[Any]:
        job.step += 1
        loss = 1.0 / (1 + job.step)
        if job.kind == "evaluate":
            del self.jobs[job.job_id]
            return [
                JobEvaluated(job.job_id, 0, 0.5, 0.75),
                JobFinished(job.job_id, job.adapter_id, "succeeded", {"eval_loss": 0.5}),
            ]
        events: list[Any] = [
            JobProgress(job.job_id, job.step, job.total_steps, 0, loss, 1e-3, job.step * 10, 100.0)
        ]
        if job.checkpoint_every and job.step % job.checkpoint_every == 0 and job.step < job.total_steps:
            events.append(JobCheckpoint(job.job_id, job.step, json.dumps({"step": job.step}).encode()))
        if job.step >= job.total_steps:
            del self.jobs[job.job_id]
            adapter = f"adapter:{job.adapter_id}:{job.step}:{job.seed}".encode()
            if job.install:
                self.adapters[job.adapter_id] = adapter
            events.append(JobFinished(job.job_id, job.adapter_id, "succeeded", {"loss": loss}, adapter))
        return events

    def cancel_job(self, job_id: str) -> bool:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            self._cancelled.append(JobFinished(job_id, job.adapter_id, "cancelled", {"steps": float(job.step)}))
        return job is not None

    def pause_job(self, job_id: str) -> None:
        self.jobs[job_id].paused = True

    def resume_job(self, job_id: str) -> None:
        self.jobs[job_id].paused = False

    def set_checkpoint_window(self, max_unstored: int) -> None:
        self.max_unstored_checkpoints = max_unstored

    def checkpoint_job(self, job_id: str) -> bool:
        """A checkpoint of the job as it stands, given out by the next step (as the engine's)."""
        job = self.jobs.get(job_id)
        if job is None or job.step == 0:
            return False
        self._cancelled.append(JobCheckpoint(job_id, job.step, json.dumps({"step": job.step}).encode()))
        return True

    def checkpoint_stored(self, job_id: str) -> bool:
        self.stored_checkpoints.append(job_id)
        return job_id in self.jobs

    def evaluate(self, adapter_id: str, data: Any) -> dict[str, float]:
        return {"loss": 0.5, "token_accuracy": 0.75}

    def stats(self) -> dict[str, Any]:
        return {"num_requests": len(self.requests), "num_jobs": len(self.jobs)}
