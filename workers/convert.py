"""Converters between the three vocabularies: wire records, engine values, engine events.

They live at the worker boundary and nowhere else (ARCHITECTURE.md §1).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from pydantic import TypeAdapter

from loquetier.engine.events import JobFinished, JobProgress, RequestFinished
from loquetier.engine.sequence import SamplingParams
from loquetier.lora.params import TrainingParams
from loquetier.messages import (
    GenerateRequest,
    GenerateResult,
    JobDoneResult,
    ProgressResult,
    ResultRecord,
    SamplingSpec,
    Timings,
    TrainingJobRecord,
    Usage,
    decode_record,
    encode_record,
)

PACKED = "msgpack_b64"
_RESULT = TypeAdapter[Any](ResultRecord)
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled", "cancelled": "cancelled"}


def sampling_params(spec: SamplingSpec) -> SamplingParams:
    return SamplingParams(
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        seed=spec.seed,
        stop=tuple(spec.stop),
        logprobs=bool(spec.logprobs),
        ignore_eos=spec.ignore_eos,
    )


def request_kwargs(req: GenerateRequest, *, min_ttft_ms: float = 0.0, min_tpot_ms: float = 0.0) -> dict[str, Any]:
    """Keyword arguments of ``engine.add_request`` (the request_id goes separately).

    The engine weights priorities as ``1 + priority`` and needs them >= 0; the wire allows
    any int32, so lower values mean "no boost". Latency targets below ``min_ttft_ms`` /
    ``min_tpot_ms`` are raised to them (``WorkerSettings``).
    """
    return {
        "prompt": req.prompt,
        "prompt_token_ids": list(req.prompt_token_ids) if req.prompt_token_ids is not None else None,
        "adapter_id": req.adapter_id,
        "sampling": sampling_params(req.sampling),
        "priority": max(0, req.priority),
        "ttft_ms": _at_least(req.slo.ttft_ms if req.slo else None, min_ttft_ms),
        "tpot_ms": _at_least(req.slo.tpot_ms if req.slo else None, min_tpot_ms),
        "stream": req.stream,
    }


def _at_least(value: float | None, floor: float) -> float | None:
    return None if value is None else max(value, floor)


def request_fingerprint(req: GenerateRequest) -> str:
    """sha256 of what a request asks for (adapter, prompt or chat turns, sampling) and, when it has one,
    where its answer goes (``reply_to``): two records with one request_id and different fingerprints
    are two different requests. So a copy of a gateway's request naming another reply topic is
    refused, not sent the stored answer. Priority, SLO and streaming change how a request is
    served, not its answer, and are left out."""
    sampling = req.sampling.model_dump(mode="json")
    if not sampling["ignore_eos"]:  # left out when off: the fingerprint of rows stored before it existed
        del sampling["ignore_eos"]
    content: dict[str, Any] = {
        "adapter_id": req.adapter_id,
        "prompt": req.prompt,
        "prompt_token_ids": req.prompt_token_ids,
        "messages": [m.model_dump(mode="json") for m in req.messages] if req.messages is not None else None,
        "sampling": sampling,
    }
    if req.reply_to is not None:  # absent: the fingerprint of rows stored before reply_to counted
        content["reply_to"] = req.reply_to
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def generate_result(ev: RequestFinished, adapter_id: str | None) -> GenerateResult:
    t = ev.timings
    return GenerateResult(
        request_id=ev.request_id,
        adapter_id=ev.adapter_id if ev.adapter_id is not None else adapter_id,
        token_ids=list(ev.token_ids),
        text=ev.text,
        finish_reason=_FINISH_REASONS.get(ev.finish_reason, "stop"),  # type: ignore[arg-type]
        usage=Usage(prompt_tokens=ev.usage.prompt_tokens, completion_tokens=ev.usage.completion_tokens),
        timings=Timings(queued_ms=t.queued_ms, ttft_ms=t.ttft_ms, tpot_ms=t.tpot_ms),
        logprobs=list(ev.logprobs) if ev.logprobs is not None else None,
    )


def stored(record: Any) -> dict[str, Any]:
    """A result record as data for ``inference_requests.result`` (JSONB).

    JSONB cannot hold U+0000, which a model may well generate; such a record is stored as
    its msgpack bytes (base64) next to its type and id, so the republished record is still
    byte-identical.
    """
    data: dict[str, Any] = record.model_dump(mode="json", by_alias=True)
    if "\\u0000" in json.dumps(data):
        packed = base64.b64encode(encode_record(record)).decode()
        return {"type": data.get("type"), "request_id": data.get("request_id"), PACKED: packed}
    return data


def from_stored(data: dict[str, Any]) -> Any:
    """The record a finished request published, rebuilt from its row (for redeliveries)."""
    if PACKED in data:
        return decode_record("results", base64.b64decode(data[PACKED]))
    return _RESULT.validate_python(data, strict=False)


def training_params(job: TrainingJobRecord) -> TrainingParams:
    return TrainingParams(**job.params.model_dump(), priority=max(0, job.priority))


def job_data(data: Any) -> Any:
    """Inline examples as plain dicts, or the JSONL path as given."""
    if isinstance(data, list):
        return [example.model_dump() for example in data]
    return data


def job_spec(job: TrainingJobRecord) -> dict[str, Any]:
    """The whole wire record, stored in ``training_jobs.spec`` so that any worker can run it."""
    spec: dict[str, Any] = job.model_dump(mode="json", by_alias=True)
    return spec


def job_from_spec(spec: dict[str, Any]) -> TrainingJobRecord:
    return TrainingJobRecord.model_validate(spec, strict=False)


def progress_result(ev: JobProgress, adapter_id: str, eval_loss: float | None = None) -> ProgressResult:
    return ProgressResult(
        job_id=ev.job_id,
        adapter_id=adapter_id,
        step=max(0, ev.step),
        total_steps=max(0, ev.total_steps) if ev.total_steps is not None else None,
        epoch=float(max(0, ev.epoch)),
        loss=ev.loss,
        eval_loss=eval_loss,
        lr=ev.lr,
        tokens_processed=max(0, ev.tokens_processed),
        tokens_per_s=ev.tokens_per_s,
    )


def job_done_result(ev: JobFinished, step: int, version: int | None, kind: str = "finetune") -> JobDoneResult:
    metrics = dict(ev.metrics or {})
    if kind == "evaluate":  # an eval job's loss is an eval loss
        metrics.setdefault("eval_loss", metrics.get("loss", float("nan")))
    return JobDoneResult(
        job_id=ev.job_id,
        adapter_id=ev.adapter_id,
        status=ev.status,  # type: ignore[arg-type]
        step=max(0, step),
        loss=metrics.get("loss"),
        eval_loss=metrics.get("eval_loss"),
        adapter_version=version,
        error=ev.error,
    )
