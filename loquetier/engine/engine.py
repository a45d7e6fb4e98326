"""Engine: one frozen base model, many adapters, inference and fine-tuning in one step.

    engine = Engine.from_pretrained(model_dir, device="cuda", dtype="bfloat16")
    engine.load_adapter("pirate", "/adapters/pirate")
    outs = engine.generate(["Hello"], adapter_ids=["pirate"], sampling=SamplingParams(max_tokens=16))
    job_id = engine.add_training_job("mascot", data, TrainingParams(lr=1e-3, max_steps=50),
                                     lora=dict(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    engine.run_until_idle()

``step()`` is the spine: schedule → run one forward (+ backward of the training rows) → postprocess.
No I/O happens here: the worker turns the returned events into Kafka records and database rows.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from loquetier.engine.admission import AdapterSlotGate, BlockAllocator
from loquetier.engine.async_step import AsyncSteps
from loquetier.engine.config import EngineConfig
from loquetier.engine.decode_window import DecodeWindow
from loquetier.engine.errors import EngineError
from loquetier.engine.events import EngineEvent, JobCheckpoint, JobFinished, RequestFailed
from loquetier.engine.graphs import GRAPH_MAX_MEAN_CONTEXT, DecodeGraphs
from loquetier.engine.isolation import StepIsolation
from loquetier.engine.jobs import JobBook
from loquetier.engine.kv_cache import BlockManager
from loquetier.engine.memory import MemoryPlan, kv_block_bytes
from loquetier.engine.memory import measure as measure_memory
from loquetier.engine.postprocess import request_events
from loquetier.engine.requests import GenerationOutput, RequestBook
from loquetier.engine.runner import ModelRunner
from loquetier.engine.scheduling import GraphPaths, Scheduler, StepCost, StepTimeModel
from loquetier.engine.sequence import RequestState, SamplingParams, ScheduledBatch, StepResult
from loquetier.lora.adapter import LoRAAdapter
from loquetier.lora.config import AdapterCapacityError, AdapterError, LoRAConfig
from loquetier.lora.data import PreparedData
from loquetier.lora.job import is_internal_key
from loquetier.lora.manager import AdapterManager
from loquetier.lora.params import TrainingParams
from loquetier.lora.pool import TARGET_MODULES, LoRASlotPool
from loquetier.models.attention import decode_uses_triton
from loquetier.models.llama import LlamaModel
from loquetier.models.tokenizer_load import load_tokenizer

_WARMUP_ADAPTER = "__loquetier_warmup__"
_WARMUP_TRAIN = "__loquetier_warmup_train__"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _gpu_prior(model: LlamaModel, kv_bytes_per_token: float, captured: bool) -> StepCost:
    """A starting step-cost model for a GPU, from the model's size (the step model fits the real
    costs online; a prior in the right decade keeps its first decisions sane): weights read once per
    step at ~3 TB/s, 2 FLOP per parameter per token at ~300 TFLOP/s (training: 3x), KV read at
    ~3 TB/s, with decode graphs ~0.5 ms more per layer for a step that runs eagerly, and ~3 ms per
    layer for a step's backward and optimizer launches."""
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    token_s = 2.0 * params / 3e14
    return StepCost(const_s=weight_bytes / 3e12 + 2e-3, prefill_token_s=token_s, decode_row_s=token_s,
                    train_token_s=3.0 * token_s, eval_token_s=token_s, kv_token_s=kv_bytes_per_token / 3e12,
                    mixed_s=5e-4 * model.cfg.num_layers if captured else 0.0,
                    train_step_s=3e-3 * model.cfg.num_layers)


def apply_blas(choice: str, device: torch.device) -> str | None:
    """Make ``choice`` (an ``EngineConfig.blas`` value) torch's BLAS library for this process's CUDA
    GEMMs; returns the library in use after, or None off CUDA (nothing to choose). A CUDA graph keeps
    the GEMM kernels of its capture: capture again after a change."""
    if device.type != "cuda":
        return None
    if choice != "torch":
        try:
            torch.backends.cuda.preferred_blas_library(choice)
        except RuntimeError as exc:  # e.g. a build without cuBLASLt
            raise EngineError("no_device", f"blas={choice!r}: {exc}") from exc
    return str(torch.backends.cuda.preferred_blas_library()).rsplit(".", 1)[-1].lower()


class Engine:
    def __init__(self, model: LlamaModel, tokenizer: Any, config: EngineConfig) -> None:
        self.device = model.device
        self.blas = apply_blas(config.blas, self.device)  # before any graph is captured
        cfg = model.cfg
        self.max_model_len = config.max_model_len or min(cfg.max_position_embeddings, 8192)
        # where the GPU's memory goes, when the engine sized its KV cache itself (engine/memory.py)
        self.memory_plan: MemoryPlan | None = None
        if config.num_kv_blocks is None and config.kv_memory_gb is None and self.device.type == "cuda":
            self.memory_plan = measure_memory(model, tokenizer, config, type(self), self.max_model_len)
            config = dataclasses.replace(config, num_kv_blocks=self.memory_plan.num_blocks)
        self.config, self.model, self.tokenizer = config, model, tokenizer
        pool = LoRASlotPool(model.dims, num_slots=config.max_adapter_slots, max_rank=config.max_lora_rank,
                            num_train_slots=config.num_train_slots, dtype=cfg.dtype, device=self.device)
        model.attach_lora_pool(pool)
        self.adapters = AdapterManager(pool, max_cpu_bytes=config.adapter_cache_bytes)
        per_block = kv_block_bytes(model, config)
        kv_gb = 1.0 if config.kv_memory_gb is None else config.kv_memory_gb
        num_blocks = config.num_kv_blocks or max(1, int(kv_gb * (1 << 30)) // per_block)
        # one block more than the manager hands out: the scratch block of padded graph rows
        self.kv = model.make_kv_cache(num_blocks + 1, config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        eos = set(cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = tuple(sorted(eos))
        graphs = self._decode_graphs(model, config, num_blocks)
        captured = graphs is not None and graphs.mode == "capture"
        graph_rows = graphs.max_tokens if captured and graphs.max_tokens > graphs.max_batch else 0
        prior = _gpu_prior(model, per_block / config.block_size, captured) if self.device.type == "cuda" else None
        self._gate = AdapterSlotGate(self.adapters)
        self.scheduler = Scheduler(
            config.scheduler, BlockAllocator(self.blocks, self._lookup, self._adapter_version),
            self._gate, prior_cost=prior,
            graphs=GraphPaths(decode=captured, max_rows=graph_rows,
                              max_mean_context=graphs.max_mean_context if captured else GRAPH_MAX_MEAN_CONTEXT),
            eos_token_id=self.eos_token_ids[0] if self.eos_token_ids else None)
        self.runner = ModelRunner(model, self.kv, self.blocks, self.adapters, config, graphs=graphs)
        self.requests = RequestBook(tokenizer, self.eos_token_ids, config.seed, self.device)
        self.jobs = JobBook(self.adapters, self.scheduler, tokenizer, cfg.vocab_size, config, self.max_model_len)
        self._gate.held = self.jobs.install_pending
        self._clock = time.monotonic
        self.isolation = StepIsolation(self.runner, self.scheduler, self.requests, self.jobs)
        self.window = DecodeWindow(self.scheduler, self.runner, self.blocks, self.requests, self.jobs,
                                   config.decode_window, self.max_model_len, chain=config.chain_windows)
        self.steps = AsyncSteps(self.scheduler, self.runner, self.blocks, self.requests, self.jobs, self.window,
                                enabled=config.async_steps)
        self._backlog: list[EngineEvent] = []
        self._ready: ScheduledBatch | None = None  # scheduled while a step was in flight, run by the next call
        self._ids = itertools.count()
        self.num_steps = 0

    def _decode_graphs(self, model: LlamaModel, config: EngineConfig, scratch_block: int) -> DecodeGraphs | None:
        mode = config.cuda_graphs
        if mode == "off":
            return None
        capturable = self.device.type == "cuda" and decode_uses_triton(model.attn_impl, self.device)
        if mode == "on" and not capturable:
            raise EngineError("no_device", "cuda_graphs='on' needs CUDA and the Triton paged-decode kernel")
        if mode == "auto" and not capturable:
            return None
        limits = config.scheduler
        max_tokens = limits.max_num_batched_tokens if config.graph_max_tokens is None else config.graph_max_tokens
        return DecodeGraphs(model, self.kv, limits.max_num_seqs, self.max_model_len, scratch_block,
                            mode="eager" if mode == "eager" else "capture",
                            max_tokens=min(max_tokens, limits.max_num_batched_tokens),
                            max_segments=config.max_adapter_slots)

    def warmup(self) -> dict[str, Any]:
        """Run every kind of step once before serving, so no served step waits for a kernel build.

        On a GPU the first step of each new shape class compiles Triton kernel variants (SMLM block
        sizes for short, medium and long adapter segments, split-K and paged-decode split variants,
        the backward kernels) for up to a second or two each. This runs each LoRA-targeted linear
        once per forward SMLM launch variant (``LlamaModel.warm_lora_launches``), prompts of several
        lengths and decode batches of several sizes, with no adapter and with a temporary adapter of
        the pool's largest rank, plus (with training slots) two tiny training steps beside prompt and
        decode rows. Then the temporary adapters are unloaded and the scheduler forgets the warm-up's
        step times (compiles are no step cost). Needs an idle engine; returns what ran. Tokens served
        afterwards do not change.
        """
        if self.has_work():
            raise EngineError("busy", "warm-up needs an idle engine (no requests, no jobs)")
        t0 = time.perf_counter()
        steps0 = self.num_steps
        gen = torch.Generator().manual_seed(20261129)
        vocab, cfg = self.model.cfg.vocab_size, self.config

        def tokens(n: int) -> list[int]:
            return torch.randint(3, vocab, (max(1, min(n, self.max_model_len - 8)),), generator=gen).tolist()

        targets = list(TARGET_MODULES)
        temporary: list[str] = []
        adapter_ids: list[str | None] = [None]
        if cfg.max_adapter_slots > cfg.num_train_slots:
            lora = LoRAConfig(rank=cfg.max_lora_rank, alpha=cfg.max_lora_rank, target_modules=targets)
            self.load_adapter(_WARMUP_ADAPTER, LoRAAdapter.new(lora, self.model.dims))
            temporary.append(_WARMUP_ADAPTER)
            adapter_ids.append(_WARMUP_ADAPTER)
        lora_launches = 0
        slot = self.adapters.acquire_slot(_WARMUP_ADAPTER) if temporary else None
        if slot is not None:  # the SMLM launch variants that served steps might reach only later
            lora_launches = self.model.warm_lora_launches(slot)
            self.adapters.new_step()
        # segment lengths on both sides of the SMLM row-block sizes, and a prompt of several chunks
        lengths = [1, 3, 17, 40, 200, cfg.scheduler.max_prefill_chunk + 5]
        greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        for group in sorted({1, 3, 17, min(70, cfg.scheduler.max_num_seqs)}):
            prompts = [tokens(lengths[i % len(lengths)]) for i in range(group)]
            self.generate(prompts, [adapter_ids[i % len(adapter_ids)] for i in range(group)], greedy)
        if cfg.num_train_slots > 0:
            # Two training steps with prompt and decode rows beside them (a floor share keeps the
            # training rows in every step): such a step runs eagerly with decode rows, whose
            # attention and SMLM launches are variants of their own. A first one built while serving
            # once cost 0.6 s on the H200, and the step model read that as the price of training.
            examples = [{"prompt_token_ids": tokens(8), "completion_token_ids": tokens(8)} for _ in range(8)]
            share = min(1.0, 64 / cfg.scheduler.max_num_batched_tokens)
            job = self.add_training_job(
                _WARMUP_TRAIN, examples, TrainingParams(max_steps=2, micro_batch_tokens=64, min_share=share),
                lora=dict(rank=cfg.max_lora_rank, alpha=cfg.max_lora_rank, target_modules=targets),
                job_id=_WARMUP_TRAIN)
            longer = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            for i, n in enumerate((17, 40, 3)):
                self.add_request(f"__loquetier_warmup_{i}__", prompt_token_ids=tokens(n),
                                 adapter_id=adapter_ids[i % len(adapter_ids)], sampling=longer,
                                 ttft_ms=60_000.0, tpot_ms=60_000.0)
            self.run_until_idle()
            self._backlog = [e for e in self._backlog if getattr(e, "job_id", None) != job]
            temporary.append(_WARMUP_TRAIN)
        for adapter_id in temporary:
            if adapter_id in self.adapters:
                self.adapters.unload(adapter_id)
        self.adapters.fill_free_slots()  # what the temporary adapters displaced
        sched = self.scheduler
        sched.step_model = StepTimeModel(sched.step_model.prior, window=sched.step_model.window)
        sched.train_scale.reset()
        _freeze_heap()
        return {"seconds": time.perf_counter() - t0, "steps": self.num_steps - steps0,
                "adapters": len(adapter_ids) - 1, "training": cfg.num_train_slots > 0,
                "lora_launch_layouts": lora_launches}

    def capture_graphs(self, recapture: bool = False) -> int:
        """Capture the decode CUDA graphs of every batch-size bucket now (a few seconds for an 8B
        model) instead of on each bucket's first decode step; returns how many were captured.
        ``recapture``: drop the graphs captured so far first (a graph keeps the kernel paths and the
        LoRA overlap that were on when it was captured)."""
        graphs = self.runner.graphs
        self._backlog += self._land()  # captures rewrite the graphs' inputs
        self.window.drop_chained()
        if graphs is not None and recapture:
            graphs.drop()
        captured = graphs.capture_all() if graphs is not None else 0
        _freeze_heap()
        return captured

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "cpu", dtype: str = "float32",
                        **limits: Any) -> Engine:
        """Load a local Hugging Face Llama-family directory (Llama, Mistral, Qwen2, SmolLM)."""
        config = EngineConfig.from_kwargs(device=device, dtype=dtype, **limits)
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError("no_device", f"device {config.device!r} requested but CUDA is not available")
        path = Path(model_dir)
        model = LlamaModel.from_pretrained(
            path, dtype=_DTYPES[config.dtype], device=config.device,
            gradient_checkpointing=config.gradient_checkpointing, max_model_len=config.max_model_len)
        return cls(model, load_tokenizer(path), config)

    # ---- adapters --------------------------------------------------------------------------------

    def load_adapter(self, adapter_id: str, source: str | Path | LoRAAdapter) -> int:
        """Register (or reload) an adapter from a PEFT directory; returns its new version."""
        _check_id(adapter_id, "adapter_id")
        try:
            version = self.adapters.load(adapter_id, source)
            self.jobs.drop_install(adapter_id)  # this load replaces weights a job left waiting for it
        except AdapterCapacityError as exc:
            raise EngineError("no_slot", str(exc)) from exc
        except (AdapterError, OSError) as exc:
            raise EngineError("bad_adapter", str(exc)) from exc
        self._gate.unavailable.pop(adapter_id, None)  # readable again
        self.adapters.fill_free_slots()  # resident now if a slot is free, not in its first step
        return version

    def load_adapter_bytes(self, adapter_id: str, data: bytes) -> int:
        try:
            adapter = LoRAAdapter.from_bytes(data, self.model.dims, self.config.max_lora_rank)
        except (AdapterError, ValueError) as exc:
            raise EngineError("bad_adapter", str(exc)) from exc
        return self.load_adapter(adapter_id, adapter)

    def replace_adapter(self, adapter_id: str, source: bytes | LoRAAdapter) -> bool:
        """Make ``source`` the adapter ``adapter_id`` (a new version): at once when no running sequence
        uses that id (True), else once the ones that use it have finished, new ones waiting meanwhile
        (False), so that no sequence mixes two versions and a busy adapter still gets its update."""
        _check_id(adapter_id, "adapter_id")
        try:
            if isinstance(source, LoRAAdapter):
                adapter = source
                self.adapters.check_holdable(adapter_id, adapter)
            else:
                adapter = LoRAAdapter.from_bytes(source, self.model.dims, self.config.max_lora_rank)
        except (AdapterError, ValueError) as exc:
            raise EngineError("bad_adapter", str(exc)) from exc
        self._gate.unavailable.pop(adapter_id, None)
        return self.jobs.install(adapter_id, adapter)

    def unload_adapter(self, adapter_id: str) -> None:
        _check_id(adapter_id, "adapter_id")
        if adapter_id not in self.adapters:
            raise EngineError("unknown_adapter", f"adapter {adapter_id!r} is not loaded")
        try:
            self.adapters.unload(adapter_id)
        except AdapterError as exc:
            raise EngineError("adapter_busy", str(exc)) from exc

    def has_adapter(self, adapter_id: str) -> bool:
        return _valid_id(adapter_id) and adapter_id in self.adapters

    def adapter_version(self, adapter_id: str) -> int:
        _check_id(adapter_id, "adapter_id")
        return self.adapters.version(adapter_id)

    def export_adapter(self, adapter_id: str) -> bytes:
        """The weights requests for ``adapter_id`` get, as bytes (never a job's weights in training:
        those are the job's, under a key of its own, until it succeeds)."""
        return self._adapter(adapter_id).to_bytes()

    def save_adapter(self, adapter_id: str, peft_dir: str | Path) -> None:
        """Write the adapter in the PEFT directory format (loadable by PEFT and vLLM)."""
        self._adapter(adapter_id).save(peft_dir)

    def _adapter(self, adapter_id: str) -> LoRAAdapter:
        _check_id(adapter_id, "adapter_id")
        if adapter_id not in self.adapters:
            raise EngineError("unknown_adapter", f"adapter {adapter_id!r} is not loaded")
        return self.adapters.get(adapter_id)

    def _adapter_version(self, adapter_id: str | None) -> int:
        return 0 if adapter_id is None else self.adapters.version(adapter_id)

    # ---- inference -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | None = None,
                    prompt_token_ids: Sequence[int] | None = None, adapter_id: str | None = None,
                    sampling: SamplingParams | None = None, priority: int = 0,
                    ttft_ms: float | None = None, tpot_ms: float | None = None, stream: bool = False,
                    arrived_at: float | None = None) -> None:
        """Queue one request; raises EngineError (with a stable code) for input it cannot serve.

        ``arrived_at``: the wall-clock time (``time.time()``) the request reached its first queue, e.g. a
        worker's intake, when that was before this call (commands wait for the step in flight). The wait
        counts toward its TTFT, so the scheduler plans its prefill against the slack it really has left,
        and it orders the request among others. None, or a time in the future, is now; a wait longer than
        :data:`MAX_ARRIVAL_WAIT_S` is capped there."""
        _check_id(request_id, "request_id")
        if adapter_id is not None:
            _check_id(adapter_id, "adapter_id")
        if self.requests.has(request_id):
            raise EngineError("duplicate_request", f"request {request_id!r} is already running")
        if adapter_id is not None and adapter_id not in self.adapters:
            job = self.jobs.training_job_of(adapter_id)
            if job is not None:
                raise EngineError("unknown_adapter", f"adapter {adapter_id!r} is being trained by job {job!r}: it "
                                  "can be used once the job succeeds")
            raise EngineError("unknown_adapter", f"adapter {adapter_id!r} is not loaded")
        if adapter_id is not None and self.config.max_adapter_slots <= self.config.num_train_slots \
                and self.adapters.slot_of(adapter_id) is None:  # it could never get a slot: it would wait forever
            raise EngineError("no_slot", f"this engine has no adapter slot for inference (max_adapter_slots "
                              f"{self.config.max_adapter_slots}, of which {self.config.num_train_slots} are for "
                              "training): give it more max_adapter_slots or fewer num_train_slots")
        if priority < 0:
            raise EngineError("invalid_request", "priority must be >= 0")
        sampling = sampling or SamplingParams()
        ids = self.requests.prompt_ids(prompt, prompt_token_ids, self.model.cfg.vocab_size, self.max_model_len)
        room = self.max_model_len - len(ids)  # >= 1: prompt_ids refuses a prompt that leaves none
        if self.blocks.blocks_needed(len(ids) + 1) > self.blocks.num_blocks:
            raise EngineError("prompt_too_long", "the prompt does not fit in the KV cache")
        sampling = self.requests.effective_sampling(sampling, room, self.model.cfg.vocab_size)
        try:
            seq = RequestState(request_id, ids, sampling, adapter_id, priority, ttft_ms, tpot_ms,
                               self._clock() - waited_s(arrived_at))
        except ValueError as exc:
            raise EngineError("invalid_request", str(exc)) from exc
        self.requests.add(seq, stream)
        self.scheduler.add_request(seq)

    def check_prompt_chars(self, num_chars: int) -> None:
        """Refuse (``prompt_too_long``) a text prompt or chat of ``num_chars`` characters that cannot fit
        the context, before any rendering or tokenizing."""
        self.requests.check_text_fits(num_chars, self.max_model_len)

    def abort(self, request_id: str) -> bool:
        """Stop a request; its RequestFinished (finish_reason "abort") comes with the next step."""
        metrics = self.scheduler.abort(request_id, self._clock())
        seq = self.requests.seq(request_id)
        if metrics is None or seq is None:
            return False
        self._backlog.append(self.requests.finished(seq, metrics))
        return True

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                 adapter_ids: Sequence[str | None] | None = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationOutput]:
        """Run ``prompts`` to completion (training jobs keep stepping meanwhile)."""
        adapter_ids = list(adapter_ids) if adapter_ids is not None else [None] * len(prompts)
        if len(adapter_ids) != len(prompts):
            raise EngineError("invalid_request", "adapter_ids must align with prompts")
        params = list(sampling) if isinstance(sampling, Sequence) else [sampling] * len(prompts)
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        for rid, prompt, adapter_id, sp in zip(ids, prompts, adapter_ids, params, strict=True):
            if isinstance(prompt, str):
                self.add_request(rid, prompt=prompt, adapter_id=adapter_id, sampling=sp)
            else:
                self.add_request(rid, prompt_token_ids=list(prompt), adapter_id=adapter_id, sampling=sp)
        done: dict[str, GenerationOutput] = {}
        wanted = set(ids)
        while len(done) < len(ids):
            for event in self._step():
                out = GenerationOutput.of(event) if getattr(event, "request_id", None) in wanted else None
                if out is not None:
                    done[out.request_id] = out
                elif getattr(event, "request_id", None) in wanted and isinstance(event, RequestFailed):
                    raise EngineError(event.code, event.message)
                elif getattr(event, "request_id", None) not in wanted:
                    self._backlog.append(event)
        return [done[i] for i in ids]

    # ---- training --------------------------------------------------------------------------------

    def add_training_job(self, adapter_id: str, data: Any, params: TrainingParams | Mapping[str, Any] | None = None,
                         lora: Mapping[str, Any] | None = None, base_adapter: str | None = None,
                         eval_data: Any = None, job_id: str | None = None, priority: int | None = None,
                         kind: str = "finetune", checkpoint: bytes | None = None, install: bool = True) -> str:
        """Start a fine-tuning (or "evaluate") job; returns its job id. ``checkpoint`` resumes a run.
        The job trains under a key of its own: requests keep the adapter ``adapter_id`` as it was (or
        unknown, if new). ``install``: when the job succeeds, its weights become ``adapter_id`` (as
        ``replace_adapter`` does); False leaves that to the caller (the JobFinished event carries
        them)."""
        job_id = job_id or f"job-{next(self._ids)}"
        _check_id(job_id, "job_id")
        _check_id(adapter_id, "adapter_id")
        if is_internal_key(base_adapter):  # an adapter id or a path, never a job's weights in training
            raise EngineError("invalid_request", "base_adapter must not contain NUL")
        return self.jobs.add(job_id, adapter_id, data, params, lora=lora, base_adapter=base_adapter,
                             eval_data=eval_data, priority=priority, kind=kind, checkpoint=checkpoint,
                             install=install)

    def prepare_data(self, data: Any, micro_batch_tokens: int | None = None,
                     stop: threading.Event | None = None) -> PreparedData:
        """Tokenize and check a job's data ahead, on any thread, while the engine steps (JobBook.prepare);
        setting ``stop`` ends it early."""
        return self.jobs.prepare(data, micro_batch_tokens, stop)

    def cancel_job(self, job_id: str) -> bool:
        event = self.jobs.cancel(job_id)
        if event is not None:
            self._backlog.append(event)
        return event is not None

    def pause_job(self, job_id: str) -> bool:
        return self.jobs.set_paused(job_id, True)

    def checkpoint_job(self, job_id: str) -> bool:
        """Ask for a ``JobCheckpoint`` of a training job as it stands, outside its ``checkpoint_every``
        (a job about to be stopped keeps its progress): it comes with the next step's events, or
        with the events of the step that ends the optimizer step in progress. False: the job is not
        training here or has taken no step yet."""
        event = self.jobs.checkpoint_now(job_id)
        if isinstance(event, JobCheckpoint):
            self._backlog.append(event)
            return True
        return event

    def resume_job(self, job_id: str) -> bool:
        return self.jobs.set_paused(job_id, False)

    def set_checkpoint_window(self, max_unstored: int) -> None:
        """For a caller that stores each ``JobCheckpoint`` at its own pace (a worker writing to a
        database): a training job with ``max_unstored`` checkpoints not yet said stored
        (``checkpoint_stored``) takes no step until one is, so a job that checkpoints faster than its
        checkpoints are stored waits instead of piling up their bytes. 0 (the default): no hold."""
        self.jobs.set_checkpoint_window(max_unstored)

    def checkpoint_stored(self, job_id: str) -> bool:
        """One of the job's checkpoints is stored (or given up); False if the job is not training."""
        return self.jobs.checkpoint_stored(job_id)

    def evaluate(self, adapter_id: str | None, data: Any, micro_batch_tokens: int | None = None) -> dict[str, float]:
        """Mean completion-token loss and token accuracy of an adapter (None = base) on ``data``."""
        if adapter_id is not None:
            _check_id(adapter_id, "adapter_id")
        job_id = self.jobs.add_eval(f"eval-{next(self._ids)}", adapter_id, data, micro_batch_tokens)
        while (result := self.jobs.eval_result(job_id)) is None:
            events = self._step()
            for e in events:
                if isinstance(e, JobFinished) and e.job_id == job_id and e.status == "failed":
                    raise EngineError("job_failed", e.error or "the evaluation failed")
            self._backlog.extend(events)
        self._backlog = [e for e in self._backlog if getattr(e, "job_id", None) != job_id]
        return result

    def run_until_idle(self, max_steps: int | None = None) -> list[EngineEvent]:
        """Step until no request and no job is left; returns every event."""
        events: list[EngineEvent] = []
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not self.has_work():
                break
            events += self.step()
        return events

    # ---- the step ----------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return (bool(self._backlog) or self.steps.in_flight or self._ready is not None
                or self.scheduler.has_unfinished_requests or self.jobs.has_work())

    def step(self) -> list[EngineEvent]:
        events, self._backlog = self._backlog, []
        return events + self._step()

    def _land(self) -> list[EngineEvent]:
        """Apply the oldest asynchronous step in flight (``async_step.py``), if any; its events."""
        return self.steps.land(self._clock)

    def _step(self) -> list[EngineEvent]:
        self.adapters.new_step()
        if self._ready is not None:  # scheduled ahead of the step applied by the last call: run it now
            batch, self._ready = self.steps.running_only(self._ready), None
            return [] if batch.is_empty else self._plain_step(batch)
        if self.steps.in_flight and not self.steps.may_schedule_ahead():
            # its events go out now: the step this call would run next may be a long training step
            return self._land()
        batch: ScheduledBatch = self.scheduler.schedule(self._clock())
        unreadable = self._fail_unreadable_adapters() if self._gate.unavailable else []
        if batch.is_empty:
            self.window.drop_chained()
            return unreadable + self._land() + self.jobs.collect_idle()
        self.requests.mark_scheduled(batch)
        if self.steps.takes(batch):
            self.window.drop_chained()  # before this step's draws: dropping a window undoes its draws
            if self.steps.launch(batch):
                self.num_steps += 1
                # the step before runs out on the device while the host applies it
                return unreadable + (self._land() if self.steps.need_landing() else [])
        if self.steps.in_flight:
            # scheduled ahead, but not an asynchronous step (a window, an eager step): the step in flight
            # is applied and its events go out now; the next call runs this one
            self._ready = batch
            return unreadable + self._land()
        return unreadable + self._plain_step(batch)

    def _plain_step(self, batch: ScheduledBatch) -> list[EngineEvent]:
        """A decode window, or one step whose tokens the host reads before it returns."""
        window = self.window.size(batch)
        if window > 1:
            try:
                events = self.window.run(batch, window, self._clock)
            except Exception as exc:  # noqa: BLE001 - the plain step below runs (and isolates) it
                warnings.warn(f"decode window of {window} steps failed, running one step: {exc!r}", stacklevel=2)
            else:
                self.num_steps += window
                return events
        self.window.drop_chained()  # a plain step: not the window queued on the device
        t0 = time.perf_counter()
        run, failed = self.isolation.run(batch)  # a part that fails is failed alone (isolation.py)
        step_time = time.perf_counter() - t0
        graphs = self.runner.graphs
        if self.scheduler.graphs.max_rows and (graphs is None or graphs.max_tokens <= graphs.max_batch):
            # prefill graphs were given up (a failed capture): the scheduler prices prefill steps as eager
            self.scheduler.fall_back_from_prefill_graphs(decode_graphs=graphs is not None)
        self.num_steps += 1
        result = StepResult(self._clock(), step_time, run.sampled, run.train_tokens, run.eval_tokens)
        step_events = self.scheduler.postprocess(batch, result)
        for seq in self.scheduler.running:
            if self.blocks.has_seq(seq.seq_id):
                self.blocks.mark_computed(seq.seq_id, seq.num_computed_tokens)
        events = failed + request_events(step_events, run.logprobs, self.requests, self.scheduler, self._clock)
        events += self.jobs.after_step(run)
        return events

    def _fail_unreadable_adapters(self) -> list[EngineEvent]:
        """Adapters that admission could not read again (their directory was deleted or changed since
        they were loaded): their waiting requests fail ``adapter_unavailable`` and the adapter is
        unloaded, so that it can be loaded again; nothing else is touched."""
        events: list[EngineEvent] = []
        now = self._clock()
        for adapter_id, why in self._gate.unavailable.items():
            for seq in [s for s in self.scheduler.waiting if s.adapter_id == adapter_id]:
                if self.scheduler.finish(seq.seq_id, "abort", now) is not None:
                    self.requests.drop(seq.seq_id)
                    events.append(RequestFailed(seq.seq_id, "adapter_unavailable",
                                                f"adapter {adapter_id!r} could not be read again: {why}"))
            if adapter_id in self.adapters:
                try:
                    self.adapters.unload(adapter_id)
                except AdapterError:  # still used by running sequences: those keep their slot's weights
                    continue
            warnings.warn(f"adapter {adapter_id!r} unloaded: it could not be read again ({why})", stacklevel=2)
        self._gate.unavailable = {k: v for k, v in self._gate.unavailable.items() if k in self.adapters}
        return events

    def _lookup(self, seq_id: str) -> RequestState | None:
        return self.scheduler.get(seq_id)

    def stats(self) -> dict[str, Any]:
        m = self.scheduler.metrics
        return {
            "num_steps": self.num_steps,
            "async_steps": self.steps.num_launched,  # queued while the step before ran
            "decode_windows": self.window.num_windows,
            "decode_windows_chained": self.window.num_chained,  # taken from the device as queued
            "decode_windows_dropped": self.window.num_dropped,  # queued, then not the next step
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_blocks_free": self.blocks.num_free_blocks,
            "kv_blocks_total": self.blocks.num_blocks,
            "adapters_loaded": len(self.adapters.adapter_ids),
            "slo_attainment": self.scheduler.slo.window_attainment,
            "jobs": self.jobs.stats(),
            "scheduler": dataclasses.asdict(m) if dataclasses.is_dataclass(m) else {},
            # the step-time model's current fit, seconds per step / token / row (what plans the steps)
            "step_cost": dataclasses.asdict(self.scheduler.step_model.cost),
            # what the last step's prices were scaled by (SchedulerConfig.plan_quantile; 1: the fit's)
            "step_margin": self.scheduler.margin,
        }


MAX_ARRIVAL_WAIT_S = 3600.0


def waited_s(arrived_at: float | None) -> float:
    """Seconds since ``arrived_at`` (wall clock), in [0, MAX_ARRIVAL_WAIT_S]; 0 for None."""
    if arrived_at is None:
        return 0.0
    if isinstance(arrived_at, bool) or not isinstance(arrived_at, (int, float)) or not math.isfinite(arrived_at):
        raise EngineError("invalid_request", "arrived_at must be a finite wall-clock time (time.time()) or None")
    return min(max(0.0, time.time() - float(arrived_at)), MAX_ARRIVAL_WAIT_S)


def _valid_id(value: object) -> bool:
    """A request, job or adapter id: a non-empty string of at most 256 characters, none of the
    engine's own keys."""
    return isinstance(value, str) and 0 < len(value) <= 256 and not is_internal_key(value)


def _check_id(value: object, name: str) -> None:
    if not _valid_id(value):
        raise EngineError("invalid_request", f"{name} must be a non-empty string of at most 256 characters, "
                          "without NUL")


def _freeze_heap() -> None:
    """Collect once, then move every object alive now (the model, the graphs, the warm-up's caches)
    out of the collector's reach: a full collection that walks them all (tens of ms and more for a
    large heap) would otherwise land in some served step."""
    gc.collect()
    gc.freeze()
