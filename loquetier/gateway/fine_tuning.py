"""``/v1/fine_tuning/jobs``: create, list, get, cancel, pause, resume, events and checkpoints.

Creating a job writes its ``training_jobs`` row (with the caller's tenant) and then publishes
the ``TrainingJobRecord`` record on the training topic, which wakes a worker; the worker's own
insert of the same job id is a no-op, and workers also claim queued rows by polling, so the job
runs even if the record is lost. The new adapter's id is ``fine_tuned_model``: it belongs to the
tenant and is servable the moment the job succeeds. Everything else is read from PostgreSQL.

OpenAI's hyperparameters map onto ours: ``n_epochs`` -> ``params.epochs``, ``batch_size`` ->
``params.grad_accum`` (micro-batches per optimizer step; each micro-batch packs examples up
to ``micro_batch_tokens``), ``learning_rate_multiplier`` -> ``params.lr`` = multiplier × 1e-4.
The ``loquetier`` field takes our own ``lora`` and ``params`` settings (docs/wire-format.md).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from loquetier.db import files_repo, repo, tenancy_repo
from loquetier.db.keys_repo import KeyOwner
from loquetier.db.models import JobRow
from loquetier.messages import ControlCommand, TrainingJobRecord
from loquetier.training_files import file_id_of

from .body import read_json
from .completions import check_priority
from .errors import APIError, bad_request, not_found
from .schemas import FineTuneRequest, Hyperparameters, error_text, parse
from .state import Gateway

log = logging.getLogger(__name__)

BASE_LR = 1e-4


def _json(obj: Any) -> Response:
    return Response(orjson.dumps(obj), media_type="application/json")


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def job_object(row: JobRow, gw: Gateway) -> dict[str, Any]:
    spec, params = row.spec, row.spec.get("params") or {}
    suffix = row.adapter_id.removeprefix("ft-").rsplit("-", 1)[0] if row.adapter_id.startswith("ft-") else None
    error = None
    if row.status == "failed":
        error = {"code": "job_failed", "message": (row.error or "the job failed")[:1000], "param": None}
    hyper = {"n_epochs": params.get("epochs") or "auto", "batch_size": params.get("grad_accum", 1),
             "learning_rate_multiplier": float(params.get("lr", BASE_LR)) / BASE_LR}
    return {
        "object": "fine_tuning.job",
        "id": row.job_id,
        "model": spec.get("base_adapter") or gw.model_name,
        "created_at": _ts(row.created_at),
        "finished_at": _ts(row.finished_at),
        "fine_tuned_model": row.adapter_id if row.status == "succeeded" else None,
        "organization_id": row.tenant_id,
        "result_files": [],
        "status": row.status,
        "training_file": file_id_of(spec.get("data")),
        "validation_file": file_id_of(spec.get("eval_data")),
        "hyperparameters": hyper,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "trained_tokens": row.tokens_processed if row.finished_at is not None else None,
        "error": error,
        "seed": params.get("seed", 0),
        "estimated_finish": None,
        "integrations": [],
        "user_provided_suffix": suffix,
        "metadata": None,
        "loquetier": {"adapter_id": row.adapter_id, "step": row.step, "total_steps": row.total_steps,
                      "epoch": row.epoch, "loss": row.last_loss, "eval_loss": row.last_eval_loss,
                      "lora": spec.get("lora"), "params": params},
    }


async def _job(gw: Gateway, owner: KeyOwner, job_id: str) -> JobRow:
    row = await gw.tx(lambda s: tenancy_repo.tenant_job(s, job_id, owner.tenant_id))
    if row is None:
        raise not_found(f"no fine-tuning job {job_id!r}", code="job_not_found", param="fine_tuning_job_id")
    return row


async def _own_file(gw: Gateway, owner: KeyOwner, file_id: str, param: str) -> str:
    row = await gw.tx(lambda s: files_repo.get_file(s, file_id))
    if row is None or row.tenant_id != owner.tenant_id:
        raise not_found(f"no file {file_id!r}", code="file_not_found", param=param)
    return f"{files_repo.FILE_URI_PREFIX}{file_id}"


def _params(hyper: Hyperparameters | None, seed: int | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if hyper is not None:
        if hyper.n_epochs != "auto":
            params["epochs"] = hyper.n_epochs
        if hyper.batch_size != "auto":
            params["grad_accum"] = hyper.batch_size
        if hyper.learning_rate_multiplier != "auto":
            params["lr"] = hyper.learning_rate_multiplier * BASE_LR
    if seed is not None:
        params["seed"] = seed
    return params | (extra or {})


# a job record's params that the body's hyperparameters set, and the names the body gives them
_HYPER_FIELDS = {"epochs": "n_epochs", "grad_accum": "batch_size", "lr": "learning_rate_multiplier"}
_RECORD_FIELDS = {"data": "training_file", "eval_data": "validation_file", "adapter_id": "suffix",
                  "base_adapter": "model", "priority": "loquetier.priority"}


def _body_field(body: FineTuneRequest, loc: tuple[int | str, ...]) -> str:
    """The body field a job record's invalid value came from (``params.lr`` may be the body's
    ``learning_rate_multiplier``, ``lora.rank`` is ``loquetier.lora.rank``)."""
    head, rest = str(loc[0]) if loc else "", ".".join(map(str, loc[1:]))
    if head == "params" and loc[1:]:
        name = str(loc[1])
        options = body.loquetier.params if body.loquetier is not None else None
        if options and name in options:
            return f"loquetier.params.{rest}"
        if name == "seed":
            return "seed"
        if name in _HYPER_FIELDS:
            where = "hyperparameters" if body.hyperparameters is not None else "method.supervised.hyperparameters"
            return f"{where}.{_HYPER_FIELDS[name]}"
    if head in _RECORD_FIELDS:
        return _RECORD_FIELDS[head]
    return "loquetier." + ".".join(map(str, loc)) if loc else "body"


def job_record(body: FineTuneRequest, base_adapter: str | None, data: Any, eval_data: Any) -> TrainingJobRecord:
    """The training job record a creation body asks for, validated, or a 400 naming the body's field."""
    options = body.loquetier
    fields: dict[str, Any] = {
        "job_id": f"ftjob-{uuid.uuid4().hex[:24]}", "adapter_id": f"ft-{body.suffix or 'lora'}-{uuid.uuid4().hex[:8]}",
        "base_adapter": base_adapter, "data": data, "eval_data": eval_data,
        "params": _params(body.all_hyperparameters(), body.seed, options.params if options else None),
        "priority": options.priority if options else 0,
    }
    if options is not None and options.lora is not None:
        fields["lora"] = options.lora
    try:
        return TrainingJobRecord.model_validate(fields, strict=False)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = _body_field(body, err["loc"])
        raise bad_request(f"{param}: {error_text(err)}", param=param) from None


async def create(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    body = parse(FineTuneRequest, await read_json(request))
    body.check_supported()
    base_adapter = await gw.resolve_model(owner, body.model)
    data = await _own_file(gw, owner, body.training_file, "training_file")
    eval_data = await _own_file(gw, owner, body.validation_file, "validation_file") if body.validation_file else None
    check_priority(gw, body.loquetier.priority if body.loquetier else 0)
    job = job_record(body, base_adapter, data, eval_data)
    job_id, adapter_id = job.job_id, job.adapter_id
    spec = job.model_dump(mode="json", by_alias=True)
    config = gw.config

    async def insert(s: Any) -> None:
        await tenancy_repo.lock_tenant(s, owner.tenant_id)  # concurrent creations count one after another
        for file_id, param in ((body.training_file, "training_file"), (body.validation_file, "validation_file")):
            if file_id and await files_repo.get_file(s, file_id) is None:  # deleted since it was looked up
                raise not_found(f"no file {file_id!r}", code="file_not_found", param=param)
        jobs, adapters = await tenancy_repo.tenant_counts(s, owner.tenant_id)
        if jobs + 1 > config.max_jobs_per_tenant:
            raise APIError(403, f"you have {jobs} unfinished fine-tuning jobs, the limit is "
                           f"{config.max_jobs_per_tenant}: wait for some or cancel them", code="quota_exceeded")
        if adapters + jobs + 1 > config.max_adapters_per_tenant:  # each unfinished job makes one more
            raise APIError(403, f"you have {adapters} fine-tuned models and {jobs} jobs making more, the limit is "
                           f"{config.max_adapters_per_tenant}: delete some first (DELETE /v1/models/{{id}})",
                           code="quota_exceeded")
        await repo.insert_job_idempotent(
            s, job_id=job_id, kind="finetune", adapter_id=adapter_id, spec=spec, priority=job.priority,
            total_steps=job.params.max_steps, tenant_id=owner.tenant_id)

    await gw.tx(insert)
    try:
        await gw.bus.publish(gw.settings.kafka.training_topic, job, job_id)
    except KafkaError as exc:  # the row is there: a worker claims it on its next poll
        log.warning("training record not published", extra={"job_id": job_id, "error": repr(exc)})
    return _json(job_object(await _job(gw, owner, job_id), gw))


async def list_jobs(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    limit = _limit(request)
    after = request.query_params.get("after")
    rows = await gw.tx(lambda s: tenancy_repo.tenant_jobs(s, owner.tenant_id, after=after, limit=limit + 1))
    return _json({"object": "list", "data": [job_object(r, gw) for r in rows[:limit]], "has_more": len(rows) > limit})


def _limit(request: Request, default: int = 20) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 3 or not 1 <= int(raw) <= 100:
        raise bad_request("limit must be an integer from 1 to 100", param="limit")
    return int(raw)


async def get_job(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    return _json(job_object(await _job(gw, owner, request.path_params["job_id"]), gw))


async def cancel(request: Request) -> Response:
    """Cancel in the row at once (the owning worker's next lease renewal fails and it stops the job);
    the control record lets the worker that consumes it stop the job sooner."""
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    row = await _job(gw, owner, request.path_params["job_id"])
    if row.status in ("succeeded", "failed"):
        raise bad_request(f"the job has already {row.status}", code="job_finished", param="fine_tuning_job_id")
    if row.status != "cancelled":
        try:
            command = ControlCommand(action="cancel", target_id=row.job_id, command_id=f"cancel-{row.job_id}")
            await gw.bus.publish(gw.settings.kafka.control_topic, command, row.job_id)
        except KafkaError as exc:
            log.warning("cancel record not published", extra={"job_id": row.job_id, "error": repr(exc)})
        await gw.tx(lambda s: repo.finish_job(s, row.job_id, status="cancelled", error="cancelled through the API"))
    return _json(job_object(await _job(gw, owner, row.job_id), gw))


async def pause(request: Request) -> Response:
    """Pause in the row: the owner's next lease renewal (each heartbeat) fails and it stops the job,
    which resumes from its last checkpoint. No control record: one applied after a later resume
    would pause the job again."""
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    row = await _job(gw, owner, request.path_params["job_id"])
    if row.status not in ("queued", "running", "paused"):
        raise bad_request(f"the job's status is {row.status}: only queued or running jobs pause", code="invalid_state",
                          param="fine_tuning_job_id")
    if row.status != "paused":  # the row only: a command could arrive after a resume and pause again
        await gw.tx(lambda s: repo.pause_job(s, row.job_id))
    return await _state_now(gw, owner, row.job_id, "paused")


async def resume(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    row = await _job(gw, owner, request.path_params["job_id"])
    if row.status != "paused":
        raise bad_request(f"the job's status is {row.status}: only paused jobs resume", code="invalid_state",
                          param="fine_tuning_job_id")
    if await gw.tx(lambda s: repo.set_job_status(s, row.job_id, "queued", from_statuses=("paused",))):
        try:  # wakes a worker now; workers also claim queued jobs by polling
            await gw.bus.publish(gw.settings.kafka.training_topic, _job_record(row), row.job_id)
        except (KafkaError, ValidationError) as exc:
            log.warning("training record not published", extra={"job_id": row.job_id, "error": repr(exc)})
    return _json(job_object(await _job(gw, owner, row.job_id), gw))


async def _state_now(gw: Gateway, owner: KeyOwner, job_id: str, wanted: str) -> Response:
    """The job after a change that raced with its worker: 400 if it ended another way meanwhile."""
    row = await _job(gw, owner, job_id)
    if row.status != wanted:
        raise bad_request(f"the job's status is {row.status}, not {wanted}: its worker changed it meanwhile",
                          code="invalid_state", param="fine_tuning_job_id")
    return _json(job_object(row, gw))


def _job_record(row: JobRow) -> TrainingJobRecord:
    return TrainingJobRecord.model_validate(row.spec, strict=False)


async def events(request: Request) -> Response:
    """The job's history (``job_events``), newest first; ``after`` pages on to older entries."""
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    row = await _job(gw, owner, request.path_params["job_id"])
    after = request.query_params.get("after")
    before_id = None
    if after is not None:
        digits = after.removeprefix(EVENT_PREFIX)
        if not after.startswith(EVENT_PREFIX) or not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
            raise bad_request(f"after must be an event id of this job ({EVENT_PREFIX}…)", param="after")
        before_id = int(digits)
    limit = _limit(request)
    rows = await gw.tx(lambda s: repo.job_events(s, row.job_id, before_id=before_id, limit=limit + 1))
    items = [_event(e) for e in rows[:limit]]
    return _json({"object": "list", "data": items, "has_more": len(rows) > limit})


EVENT_PREFIX = "ftevent-"


def _event(event: Any) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": f"{EVENT_PREFIX}{event.id}", "created_at": _ts(event.created_at),
            "level": event.level, "message": event.message, "data": event.data or {},
            "type": "metrics" if event.kind == "metrics" else "message"}


async def checkpoints(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    row = await _job(gw, owner, request.path_params["job_id"])
    ckpts = await gw.tx(lambda s: tenancy_repo.job_checkpoints(s, row.job_id))
    data = [{"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{c.id}", "created_at": _ts(c.created_at),
             "fine_tuned_model_checkpoint": f"{row.adapter_id}@step-{c.step}", "fine_tuning_job_id": row.job_id,
             "step_number": c.step, "metrics": {"step": c.step, "train_loss": (c.meta or {}).get("loss")}}
            for c in ckpts]
    after = request.query_params.get("after")
    if after is not None:
        ids = [c["id"] for c in data]
        data = data[ids.index(after) + 1:] if after in ids else []
    limit = _limit(request, 10)
    return _json({"object": "list", "data": data[:limit], "has_more": len(data) > limit,
                  "first_id": data[0]["id"] if data else None, "last_id": data[:limit][-1]["id"] if data else None})
