"""``GET /v1/models`` and ``GET /v1/models/{id}``: the base model and the adapters the caller may use;
``DELETE /v1/models/{id}``: stop serving one of the caller's own fine-tuned adapters.

Adapters made through a key belong to its tenant; adapters loaded by an operator (CLI,
control topic) are shared (``owned_by: "shared"``) and only an operator unloads them. A deleted
adapter's versions are archived (workers drop it on their next sync, and the ``unload`` command
published here makes the one that reads it drop it at once); its checkpoints stay with its jobs.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
from aiokafka.errors import KafkaError
from starlette.requests import Request
from starlette.responses import Response

from loquetier.db import repo, tenancy_repo
from loquetier.messages import ControlCommand

from .errors import APIError, bad_request, not_found
from .state import Gateway

log = logging.getLogger(__name__)


def _model(model_id: str, created: int, owned_by: str, parent: str | None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "parent": parent}


async def list_models(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    rows = await gw.tx(lambda s: tenancy_repo.visible_adapters(s, owner.tenant_id))
    data = [_model(gw.model_name, 0, "loquetier", None)]
    data += [_model(adapter_id, int(created.timestamp()), "you" if tenant else "shared", gw.model_name)
             for adapter_id, created, tenant in rows]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


async def get_model(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    model_id = request.path_params["model"]
    if model_id == gw.model_name:
        return Response(orjson.dumps(_model(model_id, 0, "loquetier", None)), media_type="application/json")
    rows = await gw.tx(lambda s: tenancy_repo.visible_adapters(s, owner.tenant_id))
    for adapter_id, created, tenant in rows:
        if adapter_id == model_id:
            body = _model(adapter_id, int(created.timestamp()), "you" if tenant else "shared", gw.model_name)
            return Response(orjson.dumps(body), media_type="application/json")
    raise not_found(f"the model {model_id!r} does not exist or you do not have access to it", code="model_not_found",
                    param="model")


async def delete_model(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    model_id = request.path_params["model"]
    rows = await gw.tx(lambda s: tenancy_repo.visible_adapters(s, owner.tenant_id))
    tenant = next((t for adapter_id, _, t in rows if adapter_id == model_id), "")
    if model_id == gw.model_name:
        raise APIError(403, f"the model {model_id!r} is the base model every adapter runs on: it cannot be deleted",
                       code="permission_denied", param="model")
    if tenant is None:
        raise APIError(403, f"the model {model_id!r} is a shared adapter: only an operator can unload it "
                       "(`loquetier adapters unload`)", code="permission_denied", param="model")
    if tenant != owner.tenant_id:
        raise not_found(f"the model {model_id!r} does not exist or you do not have access to it",
                        code="model_not_found", param="model")
    training = await gw.tx(lambda s: tenancy_repo.unfinished_jobs_of_adapter(s, model_id))
    if training:
        raise bad_request(f"the model is trained or used as a base by unfinished job(s) {', '.join(training[:5])}; "
                          "cancel them first", code="model_in_use", param="model")
    await gw.tx(lambda s: repo.archive_adapter(s, model_id))
    gw.forget_adapters(owner.tenant_id)
    try:
        # its own id each time: a command id is applied once, and a model id can be made and deleted again
        command = ControlCommand(action="unload", target_id=model_id,
                                 command_id=f"delete-{uuid.uuid4().hex[:16]}-{model_id}"[:256])
        await gw.bus.publish(gw.settings.kafka.control_topic, command, model_id)
    except KafkaError as exc:  # archived: workers drop it on their next sync anyway
        log.warning("unload record not published", extra={"adapter_id": model_id, "error": repr(exc)})
    return Response(orjson.dumps({"id": model_id, "object": "model", "deleted": True}), media_type="application/json")
