"""Database rows (SQLAlchemy 2, typed). docs/sql-schema.md shows the schema and queries.

Status columns are plain strings guarded by CHECK constraints (not PG enums) so that a
new status is a one-line migration. Timestamps come from the database clock (``now()``)
so that leases compare across workers without clock skew. Row classes end in ``Row`` to
keep them apart from the wire records (``messages.TrainingJobRecord``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

REQUEST_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_STATUSES = ("queued", "running", "paused", "succeeded", "failed", "cancelled")
JOB_KINDS = ("finetune", "evaluate")
JOB_EVENT_LEVELS = ("info", "warn", "error")
ADAPTER_STATUSES = ("training", "ready", "failed", "archived")
ADAPTER_SOURCES = ("path", "job", "upload")
WORKER_STATUSES = ("starting", "running", "draining", "stopped")
FILE_PURPOSES = ("fine-tune",)

ID = String(256)
Timestamp = DateTime(timezone=True)


def _one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=f"{column}_valid")


def _created() -> Mapped[datetime]:
    return mapped_column(Timestamp, server_default=func.now())


def _updated() -> Mapped[datetime]:
    return mapped_column(Timestamp, server_default=func.now(), onupdate=func.now())


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, list[str]: JSONB}


class RequestRow(Base):
    """One generate request; ``request_id`` is the client's idempotency key."""

    __tablename__ = "inference_requests"
    __table_args__ = (
        _one_of("status", REQUEST_STATUSES),
        Index("ix_inference_requests_adapter_created", "adapter_id", "created_at"),
        Index("ix_inference_requests_status", "status"),
        # the reconciler's look-up: unfinished rows by where their record was
        Index(
            "ix_inference_requests_kafka_position",
            "kafka_topic",
            "kafka_partition",
            "kafka_offset",
            postgresql_where=text("finished_at IS NULL"),
        ),
    )

    request_id: Mapped[str] = mapped_column(ID, primary_key=True)
    adapter_id: Mapped[str | None] = mapped_column(ID)
    status: Mapped[str] = mapped_column(String(16), server_default="queued")
    priority: Mapped[int] = mapped_column(Integer, server_default="0")
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    queued_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    tpot_ms: Mapped[float | None] = mapped_column(Float)
    worker_id: Mapped[str | None] = mapped_column(ID)
    kafka_topic: Mapped[str | None] = mapped_column(String(255))
    kafka_partition: Mapped[int | None] = mapped_column(Integer)
    kafka_offset: Mapped[int | None] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")  # starts not ended cleanly
    content_sha256: Mapped[str | None] = mapped_column(String(64))  # what the request asks for
    # {"topic", "partition", "offset", "timestamp"} of the Kafka records its outcome was published for
    answered_records: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    created_at: Mapped[datetime] = _created()
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = _updated()


class JobRow(Base):
    """A fine-tuning or evaluation job; claimed by one worker at a time through a lease."""

    __tablename__ = "training_jobs"
    __table_args__ = (
        _one_of("status", JOB_STATUSES),
        _one_of("kind", JOB_KINDS),
        Index("ix_training_jobs_claim", "status", "priority", "created_at"),
        Index("ix_training_jobs_adapter_id", "adapter_id"),
    )

    job_id: Mapped[str] = mapped_column(ID, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), server_default="finetune")
    adapter_id: Mapped[str] = mapped_column(ID)
    tenant_id: Mapped[str | None] = mapped_column(ID, ForeignKey("tenants.tenant_id"), index=True)  # null: operator
    status: Mapped[str] = mapped_column(String(16), server_default="queued")
    priority: Mapped[int] = mapped_column(Integer, server_default="0")
    spec: Mapped[dict[str, Any]]
    step: Mapped[int] = mapped_column(Integer, server_default="0")
    total_steps: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[float] = mapped_column(Float, server_default="0")
    last_loss: Mapped[float | None] = mapped_column(Float)
    last_eval_loss: Mapped[float | None] = mapped_column(Float)
    tokens_processed: Mapped[int] = mapped_column(BigInteger, server_default="0")
    worker_id: Mapped[str | None] = mapped_column(ID)
    lease_expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    heartbeat_at: Mapped[datetime | None] = mapped_column(Timestamp)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _created()
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = _updated()


class JobEventRow(Base):
    """One entry of a job's history, written in the transaction that made it happen: created,
    started (each claim), paused, resumed, handed back, lease expired, a checkpoint, a metrics report,
    the final status. ``step`` is set for checkpoints and metrics only; a replayed report of the
    same step adds nothing."""

    __tablename__ = "job_events"
    __table_args__ = (
        _one_of("level", JOB_EVENT_LEVELS),
        Index("ix_job_events_job_id_id", "job_id", "id"),
        Index("uq_job_events_job_id_kind_step", "job_id", "kind", "step", unique=True,
              postgresql_where=text("step IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[str] = mapped_column(ID, ForeignKey("training_jobs.job_id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    level: Mapped[str] = mapped_column(String(8), server_default="info")
    message: Mapped[str] = mapped_column(Text)
    step: Mapped[int | None] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    worker_id: Mapped[str | None] = mapped_column(ID)
    created_at: Mapped[datetime] = _created()


class CheckpointRow(Base):
    """A resumable snapshot of a job: bytes in ``data`` or a ``uri`` plus checksum."""

    __tablename__ = "checkpoints"
    __table_args__ = (
        UniqueConstraint("job_id", "step"),
        CheckConstraint("data IS NOT NULL OR uri IS NOT NULL", name="has_payload"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[str] = mapped_column(ID, ForeignKey("training_jobs.job_id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    uri: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _created()


class AdapterRow(Base):
    """One version of a LoRA adapter (PEFT format), from a path, a job, or an upload."""

    __tablename__ = "adapters"
    __table_args__ = (
        _one_of("status", ADAPTER_STATUSES),
        _one_of("source_kind", ADAPTER_SOURCES),
        # an archived version keeps its record, not its weights (0007)
        CheckConstraint("status = 'archived' OR data IS NOT NULL OR uri IS NOT NULL", name="has_payload"),
    )

    adapter_id: Mapped[str] = mapped_column(ID, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(ID, ForeignKey("tenants.tenant_id"), index=True)  # null: shared
    status: Mapped[str] = mapped_column(String(16), server_default="ready")
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(Boolean, server_default="false")
    target_modules: Mapped[list[str]]
    source_kind: Mapped[str] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[str | None] = mapped_column(ID, ForeignKey("training_jobs.job_id", ondelete="SET NULL"))
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    uri: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class ControlAckRow(Base):
    """The answer to one control command, kept by its ``command_id`` so that a command delivered
    again (a worker that stopped before committing its offset) is answered again, not applied
    again. ``digest`` is the command's content: the same id with other content is refused."""

    __tablename__ = "control_acks"
    __table_args__ = (Index("ix_control_acks_created_at", "created_at"),)

    command_id: Mapped[str] = mapped_column(ID, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    ack: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = _created()


class WorkerRow(Base):
    """A worker process; ``heartbeat_at`` tells whether it is alive."""

    __tablename__ = "workers"
    __table_args__ = (_one_of("status", WORKER_STATUSES),)

    worker_id: Mapped[str] = mapped_column(ID, primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), server_default="starting")
    capacity: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    heartbeat_at: Mapped[datetime] = _created()
    started_at: Mapped[datetime] = _created()
    stopped_at: Mapped[datetime | None] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = _updated()


# --- the gateway's tables: tenants, API keys, uploaded files ---------------------------------


class TenantRow(Base):
    """Who owns adapters, jobs and files made through the HTTP gateway."""

    __tablename__ = "tenants"

    tenant_id: Mapped[str] = mapped_column(ID, primary_key=True)
    created_at: Mapped[datetime] = _created()


class ApiKeyRow(Base):
    """An API key of a tenant, stored as the sha256 of the key (the key itself is shown once)."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("max_requests_per_minute IS NULL OR max_requests_per_minute > 0",
                                      name="rate_positive"),
                      CheckConstraint("max_tokens_per_minute IS NULL OR max_tokens_per_minute > 0",
                                      name="token_rate_positive"))

    key_id: Mapped[str] = mapped_column(ID, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ID, ForeignKey("tenants.tenant_id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(ID)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    max_requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created()
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp)


class FileRow(Base):
    """An uploaded JSONL file (training data), bytes in the database; workers read it by id."""

    __tablename__ = "files"
    __table_args__ = (_one_of("purpose", FILE_PURPOSES),)

    file_id: Mapped[str] = mapped_column(ID, primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(ID, ForeignKey("tenants.tenant_id", ondelete="CASCADE"),
                                                  index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_examples: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = _created()
