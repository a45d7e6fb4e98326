"""How many KV-cache blocks a GPU holds beside everything else the engine keeps on it.

An engine on CUDA without ``num_kv_blocks`` or ``kv_memory_gb`` sizes its KV cache itself: it
takes ``gpu_memory_utilization`` of the card and gives the KV cache what is left after

- **other**: memory that is not this process's tensors (the CUDA context, library workspaces,
  other processes on the card), read from the driver before the engine allocates;
- **resident**: the weights, the LoRA slot pool (training slots' gradients included) and the
  engine's buffers, measured;
- **step peak**: the largest step's transient memory, measured by running one on a probe engine
  with a KV cache just large enough: a training step of ``max_num_batched_tokens`` target tokens
  at ``max_lora_rank`` (its activations kept for backward, the vocabulary logits of every row, its
  backward, one job's fp32 masters and AdamW moments), then a prefill step of as many tokens over
  an adapter;
- **training state**: the fp32 masters and AdamW moments of the other ``num_train_slots - 1``
  jobs that may train at once, at ``max_lora_rank`` on every target (computed).

What ``1 - gpu_memory_utilization`` leaves free covers CUDA graph pools, allocator fragmentation
and the adapter a request loads. The plan is the engine's ``memory_plan`` and the worker logs it.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from loquetier.engine.errors import EngineError
from loquetier.lora.pool import TARGET_MODULES, ModelDims

if TYPE_CHECKING:
    from collections.abc import Callable

    from loquetier.engine.config import EngineConfig
    from loquetier.models.llama import LlamaModel

_GIB = float(1 << 30)
# fp32 master A and B plus AdamW's two fp32 moments, per trainable parameter (gradients live in
# the pool's training slots, which ``resident`` already counts)
TRAIN_STATE_BYTES_PER_PARAM = 4 * 3
PROBE_JOB = "__loquetier_memory_probe__"


def lora_params(dims: ModelDims, rank: int) -> int:
    """Trainable parameters of a rank-``rank`` adapter on every target module of every layer."""
    return rank * dims.num_layers * sum(sum(dims.module_shape(m)) for m in TARGET_MODULES)


@dataclass(frozen=True)
class MemoryPlan:
    """Where a GPU's memory goes, in bytes; ``num_blocks`` KV blocks of ``block_bytes`` fit."""

    total: int
    utilization: float
    other: int
    resident: int
    step_peak: int
    train_state: int
    block_bytes: int
    num_blocks: int

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def as_dict(self) -> dict[str, Any]:
        """The plan in GiB (rounded), for logs and the engine's info."""
        gib = {f.name + "_gib": round(getattr(self, f.name) / _GIB, 3) for f in dataclasses.fields(self)
               if f.name not in ("utilization", "block_bytes", "num_blocks")}
        return {**gib, "kv_gib": round(self.kv_bytes / _GIB, 3), "utilization": self.utilization,
                "num_kv_blocks": self.num_blocks}


def plan_kv_blocks(*, total: int, utilization: float, other: int, resident: int, step_peak: int,
                   train_state: int, block_bytes: int, min_blocks: int) -> MemoryPlan:
    """The KV blocks that fit in ``utilization`` of ``total`` beside the rest; at least
    ``min_blocks`` (one sequence of the longest context) or an ``EngineError`` that says what to
    change. One block of what is left stays the engine's scratch block (padded graph rows)."""
    left = int(utilization * total) - other - resident - step_peak - train_state
    num_blocks = left // block_bytes - 1
    plan = MemoryPlan(total=total, utilization=utilization, other=other, resident=resident,
                      step_peak=step_peak, train_state=train_state, block_bytes=block_bytes,
                      num_blocks=max(0, num_blocks))
    if num_blocks < min_blocks:
        need = (min_blocks + 1) * block_bytes - left
        raise EngineError(
            "no_memory",
            f"the KV cache does not fit: {utilization:.2f} of the GPU's {total / _GIB:.1f} GiB leaves "
            f"{max(left, 0) / _GIB:.2f} GiB after {other / _GIB:.2f} GiB used outside this engine, "
            f"{resident / _GIB:.2f} GiB of weights and adapter slots, {step_peak / _GIB:.2f} GiB for the "
            f"largest step and {train_state / _GIB:.2f} GiB for training state; one sequence of the "
            f"longest context needs {min_blocks} blocks ({need / _GIB:.2f} GiB more). Raise "
            "gpu_memory_utilization, or lower max_num_batched_tokens, max_lora_rank, max_adapter_slots, "
            "num_train_slots or max_model_len, or set num_kv_blocks / kv_memory_gb")
    return plan


def _probe_sequences(config: EngineConfig, max_model_len: int) -> tuple[list[int], list[int]]:
    """The probe's training sequence lengths (``max_num_batched_tokens`` in all, each at most the
    longest context) and prompt lengths (one prefill chunk each, as many as fill a step)."""
    tokens, limits = config.scheduler.max_num_batched_tokens, config.scheduler
    seq = max(2, min(max_model_len, tokens))
    train = [seq] * (tokens // seq) + ([tokens % seq] if tokens % seq >= 2 else [])
    chunk = max(1, min(seq - 1, limits.max_prefill_chunk))  # each prompt leaves room for its token
    prompts = [chunk] * min(math.ceil(tokens / chunk), limits.max_num_seqs)
    return train, prompts


def probe_blocks(config: EngineConfig, max_model_len: int) -> int:
    """A KV cache just large enough for the probe's steps (the larger of its two sets of sequences,
    each sequence one token longer than its rows and rounded up to whole blocks)."""
    bs = config.block_size
    return max(sum(math.ceil((n + 1) / bs) for n in lengths)
               for lengths in _probe_sequences(config, max_model_len)) + 1


def measure(model: LlamaModel, tokenizer: Any, config: EngineConfig, engine_cls: Callable[..., Any],
            max_model_len: int) -> MemoryPlan:
    """Profile the largest steps on a probe engine (``engine_cls(model, tokenizer, config)``,
    discarded after), then plan the KV cache."""
    device = model.device
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    other = max(0, (total - free) - torch.cuda.memory_reserved(device))
    blocks = probe_blocks(config, max_model_len)
    probe = engine_cls(model, tokenizer, dataclasses.replace(config, num_kv_blocks=blocks, cuda_graphs="off"))
    try:
        block_bytes = kv_block_bytes(model, config)
        torch.cuda.synchronize(device)
        resident = torch.cuda.memory_allocated(device) - (blocks + 1) * block_bytes
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run_largest_steps(probe, config, max_model_len)
        torch.cuda.synchronize(device)
        step_peak = torch.cuda.max_memory_allocated(device) - base
    finally:
        model.attach_lora_pool(None)  # the probe's pool goes with it; the engine attaches its own
        del probe
        gc.collect()
        torch.cuda.empty_cache()
    extra_jobs = max(0, min(config.num_train_slots, config.max_adapter_slots) - 1)
    train_state = extra_jobs * lora_params(model.dims, config.max_lora_rank) * TRAIN_STATE_BYTES_PER_PARAM
    min_blocks = math.ceil(max_model_len / config.block_size)
    return plan_kv_blocks(total=total, utilization=config.gpu_memory_utilization, other=other,
                          resident=max(0, resident), step_peak=max(0, step_peak), train_state=train_state,
                          block_bytes=block_bytes, min_blocks=min_blocks)


def kv_block_bytes(model: LlamaModel, config: EngineConfig) -> int:
    from loquetier.models.kv_cache import KVCache

    cfg = model.cfg
    return KVCache.bytes_per_block(cfg.num_layers, config.block_size, cfg.num_kv_heads, cfg.head_dim, cfg.dtype)


def run_largest_steps(probe: Any, config: EngineConfig, max_model_len: int) -> None:
    """A training step of ``max_num_batched_tokens`` target tokens at the largest rank, then a
    prefill of as many prompt tokens over an adapter of that rank (random ids, greedy, one token)."""
    from loquetier.engine.sequence import SamplingParams
    from loquetier.lora.params import TrainingParams

    train, prompts = _probe_sequences(config, max_model_len)
    vocab = probe.model.cfg.vocab_size
    gen = torch.Generator().manual_seed(20261206)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    rank, targets = config.max_lora_rank, list(TARGET_MODULES)
    if config.num_train_slots > 0:
        examples = [{"prompt_token_ids": ids(1), "completion_token_ids": ids(n - 1)} for n in train]
        params = TrainingParams(max_steps=1, micro_batch_tokens=sum(train), min_share=1.0)
        probe.add_training_job(PROBE_JOB, examples, params, lora=dict(rank=rank, alpha=rank, target_modules=targets),
                               job_id=PROBE_JOB, install=True)
        probe.run_until_idle()
    serving_slots = config.max_adapter_slots > config.num_train_slots
    adapter = PROBE_JOB if serving_slots and PROBE_JOB in probe.adapters else None
    prompt_ids = [ids(n) for n in prompts]
    greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    probe.generate(prompt_ids, [adapter] * len(prompt_ids), greedy)
