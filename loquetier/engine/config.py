"""Engine limits: one tree of frozen, validated dataclasses (process settings live in loquetier.settings).

Invariants: every knob has exactly one default, in the dataclass that owns it (the scheduler's in
``SchedulerConfig``, the field ``EngineConfig.scheduler``); an ``EngineConfig`` that exists is valid.
``from_kwargs`` takes the flat keyword limits of ``Engine.from_pretrained`` and puts each where it
belongs, so the two dataclasses never share a field name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from loquetier.engine.scheduling.config import SchedulerConfig

_DTYPES = ("float32", "bfloat16", "float16")
BLAS_CHOICES = ("cublas", "cublaslt", "torch")


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped at 8192)
    block_size: int = 16
    # The KV cache: num_kv_blocks blocks, else kv_memory_gb of memory, else on CUDA what is left of
    # gpu_memory_utilization of the card after the weights, adapter slots, the largest step and
    # training state (measured at start: engine/memory.py), and 1 GiB on the CPU.
    num_kv_blocks: int | None = None
    kv_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    max_adapter_slots: int = 8  # GPU slots, training slots included
    num_train_slots: int = 4  # slots [0, num_train_slots) carry gradients
    max_lora_rank: int = 64
    adapter_cache_bytes: int = 8 << 30  # CPU registry bound (LRU); 8B rank-16 adapters are ~63 MB each
    enable_prefix_caching: bool = True
    gradient_checkpointing: bool = False
    seed: int = 0
    # Decode-only steps replayed from CUDA graphs (engine/graphs.py): "auto" = on CUDA with the
    # Triton paged-decode kernel; "on" = required; "off"; "eager" = the same static padded path
    # without capturing (tests, debugging).
    cuda_graphs: str = "auto"
    # Steps with prefill chunks replay graphs too, up to this many rows (None: max_num_batched_tokens;
    # 0: only decode-only steps replay graphs).
    graph_max_tokens: int | None = None
    # Decode-only graph steps with nothing waiting run up to this many steps on the device with one
    # host synchronization, each step's sampled tokens fed to the next (1 = one step at a time).
    decode_window: int = 4
    # A decode window whose successor is known (same rows, nothing waiting) queues that successor on
    # the device before the host applies its tokens: the GPU runs on while the host works.
    chain_windows: bool = True
    # Other inference steps that replay graphs (a prompt chunk in them, a prompt waiting) are scheduled
    # and queued while the GPU runs the step before, whose tokens the host applies meanwhile; stop
    # checks run one step behind (engine/async_step.py).
    async_steps: bool = True
    # The BLAS library of the GEMMs on CUDA (torch's ``preferred_blas_library``, a setting of the whole
    # process): "cublas", "cublaslt", or "torch" (leave torch's choice). On the H200 cuBLASLt took
    # offline decode 1.5-2 % faster but the unified benchmark's serving and training slower (TPOT p50
    # 24.9 against 20.4 ms serving alone, training share 0.48 against 0.67): cuBLAS by default
    # (docs/benchmarks/offline.md, unified.md).
    blas: str = "cublas"
    # What a step holds (max_num_seqs, max_num_batched_tokens, max_prefill_chunk), the SLO defaults
    # and how the scheduler trades latency against training.
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("block_size", "max_adapter_slots", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not isinstance(self.scheduler, SchedulerConfig):
            raise TypeError(f"scheduler must be a SchedulerConfig, got {type(self.scheduler).__name__}")
        if not 0 <= self.num_train_slots <= self.max_adapter_slots:
            raise ValueError("num_train_slots must be in [0, max_adapter_slots]")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.kv_memory_gb is not None and not self.kv_memory_gb > 0:
            raise ValueError("kv_memory_gb must be > 0")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in [0.05, 1.0]")
        if self.cuda_graphs not in ("auto", "on", "off", "eager"):
            raise ValueError(f"cuda_graphs must be 'auto', 'on', 'off' or 'eager', got {self.cuda_graphs!r}")
        if self.graph_max_tokens is not None and self.graph_max_tokens < 0:
            raise ValueError("graph_max_tokens must be >= 0 or None")
        if self.blas not in BLAS_CHOICES:
            raise ValueError(f"blas must be one of {BLAS_CHOICES}, got {self.blas!r}")
        if not 1 <= self.decode_window <= 64:
            raise ValueError("decode_window must be in [1, 64]")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """An ``EngineConfig`` from flat keyword limits: the scheduler's knobs (``max_num_seqs``,
        ``tpot_burst``, ...) go into ``scheduler`` (on top of a ``scheduler=`` given too)."""
        own = {f.name for f in fields(cls)}
        scheduler_knobs = {f.name for f in fields(SchedulerConfig)}
        unknown = sorted(set(kwargs) - own - scheduler_knobs)
        if unknown:
            raise TypeError(f"unknown engine limits {unknown}; known: {sorted(own | scheduler_knobs)}")
        knobs = {k: kwargs.pop(k) for k in sorted(set(kwargs) & scheduler_knobs)}
        if knobs:
            kwargs["scheduler"] = replace(kwargs.get("scheduler", SchedulerConfig()), **knobs)
        return cls(**kwargs)
