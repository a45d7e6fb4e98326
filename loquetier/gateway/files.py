"""``/v1/files``: upload (``purpose=fine-tune``, JSONL), list, read, download and delete.

A file is checked line by line on upload (``loquetier.training_files``), so a bad file is a
400 naming its line, not a failed job later. Its bytes go to PostgreSQL (``files``), where a
worker reads them when a job names ``file:<file_id>``. A file belongs to the uploader's tenant.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from loquetier.db import files_repo, tenancy_repo
from loquetier.db.models import FileRow
from loquetier.training_files import TrainingFileError, parse_jsonl

from .body import BodyTooLarge, client_left_mid_body
from .errors import APIError, bad_request, not_found
from .state import Gateway


def file_object(row: FileRow) -> dict[str, Any]:
    return {"id": row.file_id, "object": "file", "bytes": row.size_bytes, "created_at": int(row.created_at.timestamp()),
            "filename": row.filename, "purpose": row.purpose, "status": "processed", "status_details": None,
            "expires_at": None}


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status, media_type="application/json")


async def upload(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("send the file as multipart/form-data with fields 'file' and 'purpose'", code="invalid_body")
    limit = gw.config.max_file_bytes
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=limit)
    except BodyTooLarge:
        raise
    except ClientDisconnect:
        raise client_left_mid_body() from None
    except Exception as exc:  # the multipart parser's own errors (malformed body, too many parts)
        detail = str(getattr(exc, "detail", None) or "malformed multipart body").rstrip(".")
        raise bad_request(f"could not read the upload: {detail} (are its parts separated by the boundary that "
                          "its content-type header names?)", code="invalid_body") from None
    try:
        if not form:  # a boundary that matches nothing parses as an empty form
            raise bad_request("could not read the upload: the multipart body holds no parts (does its "
                              "boundary match the content-type header's?)", code="invalid_body")
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "fine-tune":
            raise bad_request("purpose must be 'fine-tune'", param="purpose")
        if not isinstance(upload, UploadFile):
            raise bad_request("the form needs a 'file' part", param="file")
        data = await upload.read(limit + 1)
        filename = (upload.filename or "upload.jsonl")[:512]
    finally:
        await form.close()
    if len(data) > limit:
        raise APIError(413, f"the file is larger than {limit} bytes", code="file_too_large")
    try:
        examples = await asyncio.to_thread(parse_jsonl, data)
    except TrainingFileError as exc:
        raise bad_request(f"not a usable fine-tuning file: {exc}", param="file", code="invalid_file") from None
    config = gw.config

    async def add(s: Any) -> FileRow:
        await tenancy_repo.lock_tenant(s, owner.tenant_id)  # concurrent uploads count one after another
        num, size = await files_repo.tenant_usage(s, owner.tenant_id)
        if num + 1 > config.max_files_per_tenant or size + len(data) > config.max_file_bytes_per_tenant:
            raise APIError(403, f"your files would pass the limit of {config.max_files_per_tenant} files or "
                           f"{config.max_file_bytes_per_tenant} bytes (you have {num}, {size} bytes): delete "
                           "some first", code="quota_exceeded")
        return await files_repo.add_file(s, tenant_id=owner.tenant_id, purpose="fine-tune", filename=filename,
                                         data=data, num_examples=len(examples))

    row = await gw.tx(add)
    return _json(file_object(row))


async def _own_file(gw: Gateway, tenant_id: str, file_id: str, *, with_data: bool = False) -> FileRow:
    row = await gw.tx(lambda s: files_repo.get_file(s, file_id, with_data=with_data))
    if row is None or row.tenant_id != tenant_id:
        raise not_found(f"no file {file_id!r}", code="file_not_found", param="file_id")
    return row


MAX_LIST = 10_000  # OpenAI's limit and default for one page of files


async def list_files(request: Request) -> Response:
    """Newest first unless ``order=asc``; ``limit`` (1-10,000), ``after`` (a file id), ``purpose``."""
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    query = request.query_params
    raw = query.get("limit", str(MAX_LIST))
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(MAX_LIST)) or not 1 <= int(raw) <= MAX_LIST:
        raise bad_request(f"limit must be an integer from 1 to {MAX_LIST}", param="limit")
    limit = int(raw)
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("order must be 'asc' or 'desc'", param="order")
    after, purpose = query.get("after"), query.get("purpose")
    rows = await gw.tx(lambda s: files_repo.list_files(s, owner.tenant_id, limit=limit + 1, after=after,
                                                       newest_first=order == "desc", purpose=purpose))
    data = [file_object(r) for r in rows[:limit]]
    return _json({"object": "list", "data": data, "has_more": len(rows) > limit,
                  "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


async def get_file(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    return _json(file_object(await _own_file(gw, owner.tenant_id, request.path_params["file_id"])))


async def file_content(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    row = await _own_file(gw, owner.tenant_id, request.path_params["file_id"], with_data=True)
    return Response(row.data, media_type="application/jsonl")


async def delete_file(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    file_id = request.path_params["file_id"]
    await _own_file(gw, owner.tenant_id, file_id)

    async def delete(s: Any) -> bool:
        # under the tenant's lock, which a job's creation holds while it checks its files and inserts:
        # a job created on the file meanwhile is seen here, or sees the file gone
        await tenancy_repo.lock_tenant(s, owner.tenant_id)
        users = await files_repo.jobs_using_file(s, file_id)
        if users:
            raise bad_request(f"the file is used by unfinished fine-tuning job(s) {', '.join(users[:5])}",
                              param="file_id", code="file_in_use")
        return await files_repo.delete_file(s, file_id)

    if not await gw.tx(delete):  # another call deleted it meanwhile
        raise not_found(f"no file {file_id!r}", code="file_not_found", param="file_id")
    return _json({"id": file_id, "object": "file", "deleted": True})
