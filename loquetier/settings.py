"""Process settings, read from the environment (``LOQUETIER_<GROUP>__<FIELD>``).

These are *process* settings: where the broker and database are, what a worker is
called, how often it heartbeats. Engine limits that the compute core validates live in
frozen dataclasses in ``loquetier.engine``; the worker converts ``EngineSettings`` into
them at the boundary (STYLE.md habit 3), and ``EngineSettings`` is validated by building them.

Example::

    LOQUETIER_KAFKA__BOOTSTRAP=localhost:9092
    LOQUETIER_DATABASE__URL=postgresql+asyncpg://postgres@localhost:5432/loquetier
    LOQUETIER_ENGINE__MAX_NUM_SEQS=64
"""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loquetier.engine.config import EngineConfig

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loquetier"
DEFAULT_DATA_DIR = DEFAULT_CACHE_DIR / "data"  # large training files that `loquetier train` hands over
SHIPPED_DATA_DIR = Path(__file__).resolve().parent / "data"  # the example adapters and datasets
_ENGINE = EngineConfig()  # the engine's defaults, which EngineSettings takes over
_SCHEDULER = _ENGINE.scheduler


class KafkaSettings(BaseModel):
    """Broker address and topic names. ``bootstrap=None`` means: start an embedded broker."""

    bootstrap: str | None = None
    requests_topic: str = "loquetier.requests"
    training_topic: str = "loquetier.training"
    control_topic: str = "loquetier.control"
    results_topic: str = "loquetier.results"
    dlq_topic: str = "loquetier.dlq"
    num_partitions: PositiveInt = 4
    replication_factor: PositiveInt = 1
    group_id: str = "loquetier-workers"
    client_id: str = "loquetier"
    max_record_bytes: PositiveInt = 4 * 1024 * 1024
    # A request may name a reply topic (``reply_to``); only topics under this prefix are accepted,
    # so a producer cannot make a worker write into any other topic (docs/gateway.md).
    reply_prefix: str = Field(default="loquetier.replies.", min_length=1)
    reply_timeout_s: PositiveFloat = 30.0  # how long a worker retries a reply topic before dropping the record
    max_dlq_excerpt_bytes: PositiveInt = 64 * 1024  # of a bad key and of a bad value kept in its DLQ record
    # A worker that stops answering heartbeats for this long leaves the group and its partitions go
    # to the others: the takeover after a crash is this plus the rejoin, which tansu holds open for
    # half of it (6 s -> about 9 s). Heartbeats run on the worker's event loop, whose lag stays
    # far below a second (docs/benchmarks/service.md).
    session_timeout_ms: int = Field(default=6_000, ge=1_000, le=300_000)
    heartbeat_interval_ms: int = Field(default=1_000, ge=50, le=100_000)

    @model_validator(mode="after")
    def _heartbeats_fit_in_a_session(self) -> KafkaSettings:
        if 3 * self.heartbeat_interval_ms > self.session_timeout_ms:
            raise ValueError(f"heartbeat_interval_ms={self.heartbeat_interval_ms} must be at most a third of "
                             f"session_timeout_ms={self.session_timeout_ms}")
        return self

    def topics(self) -> list[str]:
        return [
            self.requests_topic,
            self.training_topic,
            self.control_topic,
            self.results_topic,
            self.dlq_topic,
        ]


class DatabaseSettings(BaseModel):
    """PostgreSQL URL (``postgresql+asyncpg://...``). ``url=None`` means: start an embedded one."""

    url: str | None = None
    pool_size: PositiveInt = 5
    max_overflow: int = Field(default=5, ge=0)
    pool_timeout_s: PositiveFloat = 30.0
    echo: bool = False


class EngineSettings(BaseModel):
    """Knobs the worker turns into the engine's ``EngineConfig`` (``limits``), validated by building
    that config: the ranges live in the engine's dataclasses only. Defaults are the engine's own,
    read from those dataclasses, except where a worker deliberately differs (said on the line)."""

    model_dir: Path | None = None
    device: str = "auto"  # worker: CUDA when there is one (the engine's default is "cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # worker: bfloat16 on CUDA
    max_num_seqs: int = _SCHEDULER.max_num_seqs
    max_num_batched_tokens: int = 4096  # worker: steps twice the engine's default, for a served GPU
    # the KV cache: num_kv_blocks, else kv_memory_gb, else (on CUDA) what gpu_memory_utilization of the
    # card leaves after the weights, adapter slots, the largest step and training state
    num_kv_blocks: int | None = _ENGINE.num_kv_blocks
    kv_memory_gb: float | None = _ENGINE.kv_memory_gb
    gpu_memory_utilization: float = _ENGINE.gpu_memory_utilization
    block_size: int = _ENGINE.block_size
    max_adapter_slots: int = _ENGINE.max_adapter_slots
    max_lora_rank: int = _ENGINE.max_lora_rank
    adapter_cache_bytes: int = _ENGINE.adapter_cache_bytes  # adapters held in CPU memory (LRU by use)
    max_prompt_tokens: PositiveInt = 32768  # the worker's intake guard, not an engine limit
    default_ttft_ms: float = _SCHEDULER.default_ttft_ms
    default_tpot_ms: float = _SCHEDULER.default_tpot_ms
    cuda_graphs: Literal["auto", "on", "off"] = "auto"  # decode-only steps replayed from CUDA graphs
    tpot_burst: float = _SCHEDULER.tpot_burst  # mean-TPOT banking (SchedulerConfig.tpot_burst)
    tpot_lookahead: int = _SCHEDULER.tpot_lookahead  # future tokens a long step may borrow against
    prefill_coalesce_ms: float | None = _SCHEDULER.prefill_coalesce_ms  # None: the engine's choice
    ttft_step_share: float = _SCHEDULER.ttft_step_share  # while serving, steps within this share of TTFT
    ttft_headroom: float = _SCHEDULER.ttft_headroom  # a prompt's prefill step planned to this share of its slack
    slo_target: float = _SCHEDULER.slo_target  # window attainment below which training stops growing
    plan_quantile: float = _SCHEDULER.plan_quantile  # eager steps planned at this quantile of their time

    def limits(self) -> dict[str, Any]:
        """``Engine.from_pretrained`` keyword limits (device and dtype are resolved apart)."""
        names = ("max_num_seqs", "max_num_batched_tokens", "num_kv_blocks", "kv_memory_gb", "gpu_memory_utilization",
                 "block_size", "max_adapter_slots",
                 "max_lora_rank", "adapter_cache_bytes", "default_ttft_ms", "default_tpot_ms", "cuda_graphs",
                 "tpot_burst",
                 "tpot_lookahead", "prefill_coalesce_ms", "ttft_step_share", "ttft_headroom",
                 "slo_target", "plan_quantile")
        limits = {name: getattr(self, name) for name in names}
        return {k: v for k, v in limits.items() if v is not None}

    @model_validator(mode="after")
    def _engine_accepts(self) -> EngineSettings:
        """Fail at start-up, with the engine's own message, on limits the engine would refuse."""
        EngineConfig.from_kwargs(**self.limits())  # ValueError -> ValidationError
        return self


class WorkerSettings(BaseModel):
    """Identity, timing and guards of one worker process."""

    id: str = Field(default_factory=lambda: f"{socket.gethostname()}-worker")
    max_inflight: PositiveInt = 256
    # sys.setswitchinterval for the worker process: how long the event loop may keep the GIL
    # while the engine thread waits for it (Python's default is 5 ms, a third of a decode step)
    gil_switch_interval_ms: float = Field(default=0.5, gt=0.0, le=100.0)
    # The engine in a process of its own (``workers/engine_process.py``): its steps share no GIL with
    # the event loop's Kafka and PostgreSQL work. False: an engine thread in the worker process.
    engine_process: bool = True
    heartbeat_s: PositiveFloat = 5.0
    lease_s: PositiveFloat = 30.0
    progress_every_s: PositiveFloat = 2.0
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    checkpoint_storage: Literal["db", "uri"] = "db"
    checkpoint_dir: Path = DEFAULT_CACHE_DIR / "checkpoints"
    # A job's checkpoints kept (the newest; older rows and their files are deleted as a new one is
    # stored): a job with checkpoint_every 1 would otherwise store weights and optimizer state at every step
    keep_checkpoints: int = Field(default=3, ge=1, le=10_000)
    # A training job with this many checkpoints sent by the engine and not yet stored takes no step
    # until one is: a job that checkpoints faster than the database stores (checkpoint_every 1 on a large
    # model) waits, instead of piling up checkpoints' bytes in the worker. 0: no bound.
    max_unstored_checkpoints: int = Field(default=2, ge=0, le=1000)
    # A paused job running here is checkpointed as it stands before it stops (it resumes from there):
    # the pause waits this long for that checkpoint to be stored, then stops the job either way
    pause_checkpoint_s: PositiveFloat = 60.0
    # Versions of one adapter kept (the newest; older rows and their files are deleted as a new one is
    # registered): every load of a path or finished fine-tune with overwrite adds a version
    keep_adapter_versions: int = Field(default=5, ge=1, le=10_000)
    # Control "load" paths (and path base adapters) must resolve, symlinks followed, under
    # adapter_dir or one of adapter_roots (JSON list in the environment).
    adapter_dir: Path = DEFAULT_CACHE_DIR / "adapters"
    adapter_roots: list[Path] = Field(default_factory=lambda: [SHIPPED_DATA_DIR])
    # A training job's data path (not inline, not an upload) must resolve, symlinks followed, to a
    # file under one of these (JSON list in the environment); `loquetier train` copies a large
    # local file into the first before it sends the job.
    data_roots: list[Path] = Field(default_factory=lambda: [DEFAULT_DATA_DIR, SHIPPED_DATA_DIR])
    max_data_file_bytes: PositiveInt = 1024**3
    max_adapter_bytes: PositiveInt = 2 * 1024**3  # adapter_model.safetensors read from a load path
    # A request or job started this many times without ending (its worker crashed or
    # stalled each time) is failed with code "poisoned" and never tried again.
    max_attempts: PositiveInt = 2
    # a request's latency targets (``slo``) below these are raised to them: tighter ones no step can
    # meet, and each miss would hold every job's training at its floor (one client's 0.001 ms targets
    # cut a job's steps a second to a quarter); set them to what the hardware can serve
    min_ttft_ms: float = Field(default=50.0, ge=0.0)
    min_tpot_ms: float = Field(default=10.0, ge=0.0)
    drain_timeout_s: PositiveFloat = 10.0  # a stop waits this long for in-flight requests
    engine_stall_s: PositiveFloat = 120.0  # an engine thread silent this long stops the worker
    reconcile_every_s: PositiveFloat = 30.0  # look for unfinished rows nobody will finish
    # Control "drain" must carry this token; unset, no drain command is accepted (SIGTERM still works).
    operator_token: SecretStr | None = None

    def load_roots(self) -> list[Path]:
        """Directories a control "load" path may resolve into."""
        return [self.adapter_dir, *self.adapter_roots]


class GatewaySettings(BaseModel):
    """The OpenAI-compatible HTTP gateway (``loquetier gateway``, docs/gateway.md)."""

    id: str = Field(default_factory=lambda: f"{socket.gethostname()}-gateway", pattern=r"^[A-Za-z0-9._-]{1,128}$")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_name: str | None = None  # the base model's name in /v1/models; default: the model directory's name
    max_body_bytes: PositiveInt = 4 * 1024 * 1024  # a JSON body larger than this is refused (413)
    max_file_bytes: PositiveInt = 16 * 1024 * 1024  # an uploaded training file larger than this is refused (413)
    max_inflight: PositiveInt = 1024  # requests waiting for results at once; more get 429
    max_inflight_per_key: PositiveInt = 256  # of those, one API key's at once: one caller cannot fill the gateway
    stream_stall_s: PositiveFloat = 60.0  # a stream whose client reads nothing for this long loses its places
    # chat completions without max_tokens: None = up to the end of the context, as OpenAI's (slow on a CPU)
    default_max_tokens: PositiveInt | None = None
    # what one tenant may keep (403 quota_exceeded past it): files, their bytes, unfinished jobs, served adapters
    max_files_per_tenant: PositiveInt = 1000
    max_file_bytes_per_tenant: PositiveInt = 2 * 1024**3
    max_jobs_per_tenant: PositiveInt = 32
    max_adapters_per_tenant: PositiveInt = 256
    request_timeout_s: PositiveFloat = 600.0
    key_cache_s: float = Field(default=10.0, ge=0)  # a revoked key stops working within this
    model_cache_s: float = Field(default=2.0, ge=0)
    worker_alive_s: PositiveFloat = 15.0  # a worker whose heartbeat is older counts as gone (503)
    # a connection whose request headers are not all in within this long is closed (slow clients that
    # hold sockets open without ever asking anything)
    header_timeout_s: PositiveFloat = 10.0
    # a request body must come at this many bytes a second on average (after header_timeout_s of
    # grace) or its connection is closed: a byte every few seconds does not hold a socket for good
    min_body_bytes_per_s: PositiveInt = 16 * 1024
    # open connections at most; past it a new request is answered 503 (the process also raises its
    # open-file limit to the system's hard limit at start)
    max_connections: PositiveInt = 4096
    # the highest ``loquetier.priority`` a client may ask for (higher runs first); above it a 400.
    # Lowering one's own priority is always allowed
    max_priority: int = Field(default=0, ge=-(2**31), lt=2**31)


class Settings(BaseSettings):
    """All process settings. Read once per process through :func:`get_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="LOQUETIER_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    cache_dir: Path = DEFAULT_CACHE_DIR

    @model_validator(mode="after")
    def _local_state_in_cache(self) -> Settings:
        """A worker's checkpoint and adapter directories default to the cache, wherever it is."""
        defaults = {"checkpoint_dir": "checkpoints", "adapter_dir": "adapters"}
        moved = {k: self.cache_dir / v for k, v in defaults.items() if k not in self.worker.model_fields_set}
        if moved and self.cache_dir != DEFAULT_CACHE_DIR:
            self.worker = self.worker.model_copy(update=moved)
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; ``get_settings.cache_clear()`` re-reads the environment."""
    return Settings()
