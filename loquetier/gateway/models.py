"""``GET /v1/models`` and ``GET /v1/models/{id}``: the base model and the adapters the caller may use.

Adapters made through a key belong to its tenant; adapters loaded by an operator (CLI,
control topic) are shared (``owned_by: "shared"``).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from loquetier.db import tenancy_repo

from .errors import not_found
from .state import Gateway


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
