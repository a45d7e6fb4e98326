"""The queries the worker needs, in one namespace: ``from loquetier.db import repo``.

Every function takes an ``AsyncSession`` and runs inside the caller's transaction; none
commits. Typical use::

    async with sessions.begin() as s:
        job = await repo.claim_job(s, worker_id, lease_s=30)
"""

from __future__ import annotations

from loquetier.db.artifacts_repo import (
    adapter_taken,
    archive_adapter,
    drop_archived_payloads,
    get_adapter,
    job_taken_by,
    latest_checkpoint,
    prune_adapter_versions,
    prune_checkpoints,
    ready_versions,
    register_adapter,
    save_checkpoint,
)
from loquetier.db.control_repo import keep_command_ack, kept_command_ack
from loquetier.db.files_repo import file_data
from loquetier.db.jobs_repo import (
    FINAL_JOB_STATUSES,
    claim_job,
    expire_lease,
    finish_job,
    get_job,
    get_jobs,
    insert_job_idempotent,
    job_events,
    pause_job,
    poison_jobs,
    raise_job_step,
    record_job_event,
    record_owned_job_event,
    release_job,
    renew_lease,
    set_job_status,
    update_job_progress,
)
from loquetier.db.requests_repo import (
    add_answered_records,
    finish_request,
    get_request,
    get_requests,
    insert_request_idempotent,
    stale_requests,
    start_request,
)
from loquetier.db.workers_repo import drain_workers, heartbeat_worker, upsert_worker, worker_is_alive, worker_status

__all__ = [
    "FINAL_JOB_STATUSES",
    "adapter_taken",
    "add_answered_records",
    "archive_adapter",
    "drop_archived_payloads",
    "keep_command_ack",
    "kept_command_ack",
    "claim_job",
    "drain_workers",
    "expire_lease",
    "file_data",
    "finish_job",
    "finish_request",
    "get_adapter",
    "get_job",
    "get_jobs",
    "get_request",
    "get_requests",
    "heartbeat_worker",
    "insert_job_idempotent",
    "insert_request_idempotent",
    "job_events",
    "job_taken_by",
    "latest_checkpoint",
    "pause_job",
    "poison_jobs",
    "prune_adapter_versions",
    "prune_checkpoints",
    "raise_job_step",
    "ready_versions",
    "record_job_event",
    "record_owned_job_event",
    "register_adapter",
    "release_job",
    "renew_lease",
    "save_checkpoint",
    "set_job_status",
    "stale_requests",
    "start_request",
    "update_job_progress",
    "upsert_worker",
    "worker_is_alive",
    "worker_status",
]
