"""Engine limits: one frozen, validated dataclass (process settings live in loquetier.settings)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    dtype: str = "float32"
    max_num_seqs: int = 64  # running inference sequences
    max_num_batched_tokens: int = 2048  # rows in one step: decode + prefill + train + eval
    max_prefill_chunk: int = 512
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped at 8192)
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_memory_gb
    kv_memory_gb: float = 1.0
    max_adapter_slots: int = 8  # GPU slots, training slots included
    num_train_slots: int = 4  # slots [0, num_train_slots) carry gradients
    max_lora_rank: int = 64
    adapter_cache_bytes: int = 2 << 30  # CPU registry bound (LRU)
    enable_prefix_caching: bool = True
    gradient_checkpointing: bool = False
    default_ttft_ms: float = 1000.0
    default_tpot_ms: float = 100.0
    seed: int = 0
    # Decode-only steps replayed from CUDA graphs (engine/graphs.py): "auto" = on CUDA with the
    # Triton paged-decode kernel; "on" = required; "off"; "eager" = the same static padded path
    # without capturing (tests, debugging).
    cuda_graphs: str = "auto"
    # Steps with prefill chunks replay graphs too, up to this many rows (None: max_num_batched_tokens;
    # 0: only decode-only steps replay graphs).
    graph_max_tokens: int | None = None
    # Mean-TPOT banking: a step may last up to this many TPOT targets while every decode row is ahead
    # of its mean (scheduler ``tpot_burst``; 1 = every step within one target).
    tpot_burst: float = 8.0
    # With tpot_burst > 1, a sequence may also borrow against this many of its future tokens (at most
    # what max_tokens leaves), priced at the predicted decode-only step (scheduler ``tpot_lookahead``;
    # 0 = spend only time already banked). This is what lets training run beside decoders at all while
    # an eager training step costs several TPOT targets: without it, on the H200 with the 8B shape,
    # training ran in probes only (9 % of its solo rate; docs/benchmarks/README.md).
    tpot_lookahead: int = 16
    # Hold new prefills this long so arrivals are prefilled together and most steps stay decode-only
    # (scheduler ``prefill_coalesce_ms``); None = 100 ms when decode steps replay CUDA graphs, else 0.
    prefill_coalesce_ms: float | None = None
    # Decode-only graph steps with nothing waiting run up to this many steps on the device with one
    # host synchronization, each step's sampled tokens fed to the next (1 = one step at a time).
    decode_window: int = 4

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk", "block_size",
                     "max_adapter_slots", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        if self.max_prefill_chunk > self.max_num_batched_tokens:
            raise ValueError("max_prefill_chunk must be <= max_num_batched_tokens")
        if not 0 <= self.num_train_slots <= self.max_adapter_slots:
            raise ValueError("num_train_slots must be in [0, max_adapter_slots]")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.kv_memory_gb <= 0:
            raise ValueError("kv_memory_gb must be > 0")
        if self.cuda_graphs not in ("auto", "on", "off", "eager"):
            raise ValueError(f"cuda_graphs must be 'auto', 'on', 'off' or 'eager', got {self.cuda_graphs!r}")
        if self.graph_max_tokens is not None and self.graph_max_tokens < 0:
            raise ValueError("graph_max_tokens must be >= 0 or None")
        if not 1.0 <= self.tpot_burst <= 100.0:
            raise ValueError("tpot_burst must be in [1, 100]")
        if not 0 <= self.tpot_lookahead <= 4096:
            raise ValueError("tpot_lookahead must be in [0, 4096]")
        if self.prefill_coalesce_ms is not None and not 0.0 <= self.prefill_coalesce_ms <= 60_000.0:
            raise ValueError("prefill_coalesce_ms must be in [0, 60000] or None")
        if not 1 <= self.decode_window <= 64:
            raise ValueError("decode_window must be in [1, 64]")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine limits {unknown}; known: {sorted(known)}")
        return cls(**kwargs)
