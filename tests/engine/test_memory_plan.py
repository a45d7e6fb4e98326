"""The KV cache sized from the GPU's memory (engine/memory.py): the arithmetic, the training-state
bytes it reserves against what a real job holds, the knobs, and on CUDA the whole plan under load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from loquetier import Engine, SamplingParams, TrainingParams
from loquetier.engine.config import EngineConfig
from loquetier.engine.errors import EngineError
from loquetier.engine.memory import TRAIN_STATE_BYTES_PER_PARAM, kv_block_bytes, lora_params, plan_kv_blocks
from loquetier.lora.adapter import LoRAAdapter
from loquetier.lora.config import LoRAConfig
from loquetier.lora.pool import TARGET_MODULES
from loquetier.settings import EngineSettings
from tests.tiny import make_tiny_model

GIB = 1 << 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("memory") / "llama", num_layers=2, hidden_size=64)


def test_lora_params_counts_every_weight_of_a_full_adapter(model_dir: Path) -> None:
    engine = Engine.from_pretrained(model_dir, num_kv_blocks=16)
    for rank in (3, 8):
        adapter = LoRAAdapter.new(LoRAConfig(rank=rank, alpha=rank, target_modules=tuple(TARGET_MODULES)),
                                  engine.model.dims, seed=rank)
        assert sum(a.numel() + b.numel() for a, b in adapter.weights.values()) == lora_params(engine.model.dims, rank)


def test_the_training_state_reserved_per_job_is_what_a_job_holds_after_a_step(model_dir: Path) -> None:
    """fp32 masters plus AdamW's two moments, at the job's rank on every target."""
    rank = 8
    engine = Engine.from_pretrained(model_dir, num_kv_blocks=64, block_size=8, max_num_batched_tokens=128,
                                    max_prefill_chunk=64, max_lora_rank=rank, max_adapter_slots=3, num_train_slots=1)
    gen = torch.Generator().manual_seed(7)
    data = [{"prompt_token_ids": torch.randint(3, 300, (4,), generator=gen).tolist(),
             "completion_token_ids": torch.randint(3, 300, (5,), generator=gen).tolist()} for _ in range(4)]
    job_id = engine.add_training_job("t", data, TrainingParams(optimizer="adamw", max_steps=3, micro_batch_tokens=18),
                                     lora=dict(rank=rank, alpha=rank, target_modules=list(TARGET_MODULES)))
    job = engine.jobs._train[job_id].job
    while job.step < 1:
        engine.step()
    held = sum(p.numel() * p.element_size() for p in job._params)
    for state in job.optimizer.state.values():
        held += sum(t.numel() * t.element_size() for k, t in state.items() if k != "step")
    assert held == lora_params(engine.model.dims, rank) * TRAIN_STATE_BYTES_PER_PARAM


def test_the_plan_gives_the_kv_cache_what_is_left() -> None:
    plan = plan_kv_blocks(total=80 * GIB, utilization=0.9, other=GIB // 2, resident=28 * GIB, step_peak=9 * GIB,
                          train_state=6 * GIB, block_bytes=2 << 20, min_blocks=512)
    left = int(0.9 * 80 * GIB) - GIB // 2 - 28 * GIB - 9 * GIB - 6 * GIB
    assert plan.num_blocks == left // (2 << 20) - 1  # one block more is the scratch block
    assert plan.kv_bytes <= left - (2 << 20) < plan.kv_bytes + 2 * (2 << 20)
    info = plan.as_dict()
    assert info["num_kv_blocks"] == plan.num_blocks and info["total_gib"] == 80.0
    assert info["kv_gib"] == pytest.approx(plan.kv_bytes / GIB, abs=1e-3)


def test_a_plan_without_room_for_one_long_sequence_says_what_to_change() -> None:
    with pytest.raises(EngineError, match="KV cache does not fit") as err:
        plan_kv_blocks(total=24 * GIB, utilization=0.9, other=GIB, resident=16 * GIB, step_peak=4 * GIB,
                       train_state=GIB, block_bytes=2 << 20, min_blocks=512)
    assert err.value.code == "no_memory"
    for knob in ("gpu_memory_utilization", "max_num_batched_tokens", "max_lora_rank", "num_kv_blocks"):
        assert knob in str(err.value)


def test_the_knobs_are_checked_where_they_are_set() -> None:
    assert EngineConfig().kv_memory_gb is None and EngineConfig().gpu_memory_utilization == 0.9
    for bad in (0.0, 1.2):
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            EngineConfig(gpu_memory_utilization=bad)
    with pytest.raises(ValueError, match="kv_memory_gb"):
        EngineConfig(kv_memory_gb=0.0)
    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        EngineSettings(gpu_memory_utilization=1.5)
    limits = EngineSettings(gpu_memory_utilization=0.8, kv_memory_gb=None).limits()
    assert limits["gpu_memory_utilization"] == 0.8 and "kv_memory_gb" not in limits
    assert EngineSettings(kv_memory_gb=2.5).limits()["kv_memory_gb"] == 2.5


def test_a_cpu_engine_without_a_size_takes_one_gib(model_dir: Path) -> None:
    engine = Engine.from_pretrained(model_dir, block_size=64)
    assert engine.memory_plan is None
    per_block = kv_block_bytes(engine.model, engine.config)
    assert per_block * engine.blocks.num_blocks <= GIB < per_block * (engine.blocks.num_blocks + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sizes the KV cache from a GPU's memory")
def test_an_engine_sized_from_the_gpu_runs_its_largest_steps_inside_its_share(model_dir: Path) -> None:
    """The plan's KV cache takes the card, yet a full training step beside full prefills still fits."""
    utilization = 0.5
    limits = dict(device="cuda", dtype="bfloat16", block_size=16, max_num_batched_tokens=1024,
                  max_lora_rank=16, max_adapter_slots=6, num_train_slots=2, gpu_memory_utilization=utilization,
                  cuda_graphs="off")
    engine = Engine.from_pretrained(model_dir, **limits)
    plan = engine.memory_plan
    assert plan is not None and plan.num_blocks == engine.blocks.num_blocks and plan.step_peak > 0
    assert plan.resident > 0 and plan.train_state == lora_params(engine.model.dims, 16) * TRAIN_STATE_BYTES_PER_PARAM
    total = torch.cuda.mem_get_info()[1]
    gen = torch.Generator().manual_seed(11)

    def ids(n: int) -> list[int]:
        return torch.randint(3, engine.model.cfg.vocab_size, (n,), generator=gen).tolist()

    torch.cuda.reset_peak_memory_stats()
    for k in range(2):  # both training slots, each a full micro-batch, with prompts beside them
        data = [{"prompt_token_ids": ids(8), "completion_token_ids": ids(120)} for _ in range(16)]
        engine.add_training_job(f"t{k}", data, TrainingParams(max_steps=2, micro_batch_tokens=1024, min_share=0.5),
                                lora=dict(rank=16, alpha=16, target_modules=list(TARGET_MODULES)))
    out = engine.generate([ids(200) for _ in range(12)], None, SamplingParams(max_tokens=4, temperature=0.0))
    engine.run_until_idle()
    assert all(len(o.token_ids) == 4 for o in out)
    # the caching allocator rounds what it reserves up (2 MiB pages, segments): 1 % of the card for that
    assert plan.other + torch.cuda.max_memory_reserved() <= (utilization + 0.01) * total


@pytest.mark.parametrize(("slots", "train"), [(3, 1), (1, 1), (2, 0)])
def test_the_probe_runs_a_full_training_step_and_full_prefills(model_dir: Path, slots: int, train: int) -> None:
    """What the GPU probe runs, here on the CPU: its KV cache holds the steps, the job trains its one
    step over every token of a step, and the prompts fill another; with every slot a training slot
    the prompts run on the base model, and with none there is no job."""
    from loquetier.engine.memory import PROBE_JOB, probe_blocks, run_largest_steps

    limits = dict(block_size=8, max_num_batched_tokens=192, max_prefill_chunk=64, max_lora_rank=8,
                  max_adapter_slots=slots, num_train_slots=train, max_model_len=80)
    probe = Engine.from_pretrained(model_dir, num_kv_blocks=probe_blocks(EngineConfig.from_kwargs(**limits), 80),
                                   **limits)
    trained: list[int] = []
    prompted: list[int] = []
    step = probe.runner.run

    def run(batch, pieces, sampling, **kwargs):  # noqa: ANN001, ANN003, ANN202
        trained.append(sum(pieces.train_tokens.values()))
        prompted.append(sum(c.length for c in batch.prefill_chunks))
        return step(batch, pieces, sampling, **kwargs)

    probe.runner.run = run  # type: ignore[method-assign]
    run_largest_steps(probe, probe.config, probe.max_model_len)
    assert (PROBE_JOB in probe.adapters) == (train > 0)  # installed: the job succeeded
    assert max(trained) == (192 if train else 0), trained
    assert max(prompted) == 192, prompted  # three prompts of one chunk each, in one step
