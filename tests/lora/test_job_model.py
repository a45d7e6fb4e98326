"""TrainingJob through the real model core (LlamaModel + BatchBuilder): packed variable lengths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_harness import tiny_llama
from peft import PeftModel

from loquetier.lora.config import LoRAConfig
from loquetier.lora.data import tokenize_examples
from loquetier.lora.job import TrainingJob
from loquetier.lora.manager import AdapterManager
from loquetier.lora.params import TrainingParams
from loquetier.lora.pool import LoRASlotPool
from loquetier.models import BatchBuilder, LlamaModel, weighted_loss

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def engine(path: Path) -> tuple[LlamaModel, AdapterManager]:
    if not (path / "config.json").exists():
        tiny_llama(seed=0, init_range=0.3).save_pretrained(path)
    model = LlamaModel.from_pretrained(path)
    pool = LoRASlotPool(model.dims, num_slots=4, max_rank=8, num_train_slots=2)
    model.attach_lora_pool(pool)
    return model, AdapterManager(pool)


def data(seed: int, n: int):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p, c = (int(x) for x in torch.randint(1, 6, (2,), generator=gen))
        ids = torch.randint(3, 64, (p + c,), generator=gen).tolist()
        rows.append({"prompt_token_ids": ids[:p], "completion_token_ids": ids[p:]})
    return tokenize_examples(rows)


def drive(model: LlamaModel, jobs: list[TrainingJob]) -> None:
    """One packed forward/backward per step over every job's micro-batch (no lock-step needed)."""
    while not all(j.is_done for j in jobs):
        running = [(j, j.next_micro_batch()) for j in jobs if not j.is_done and j.num_ready_tokens()]
        b = BatchBuilder(block_size=16)
        for j, mb in running:
            for seq in mb.sequences:
                b.add_train(seq.token_ids, seq.labels, slot=j.slot, group=j.job_id)
        batch = b.build()
        out = model.forward(batch)
        denoms = torch.tensor([float(mb.num_target_tokens) for _, mb in running])
        weighted_loss(out.loss_sum, denoms).backward()
        for (j, mb), loss_sum in zip(running, out.loss_sum.tolist(), strict=True):
            j.on_micro_batch_done(loss_sum, mb.num_target_tokens)


def test_shared_steps_through_the_model_core_match_alone_and_export_to_peft(tmp_path: Path) -> None:
    base = tmp_path / "base"
    da, db = data(1, 9), data(2, 6)
    pa = TrainingParams(lr=1e-2, grad_accum=2, micro_batch_tokens=16, epochs=2, seed=3)
    pb = TrainingParams(optimizer="sgd", lr=0.2, micro_batch_tokens=24, max_steps=4, seed=4)
    la = LoRAConfig(rank=4, alpha=8, target_modules=MODULES)
    lb = LoRAConfig(rank=8, alpha=8, target_modules=("q_proj", "v_proj"), use_rslora=True)
    model, manager = engine(base)
    together = [
        TrainingJob("a", "A", manager, da, pa, lora=la),
        TrainingJob("b", "B", manager, db, pb, lora=lb),
    ]
    drive(model, together)
    for job, d, p, cfg in zip(together, (da, db), (pa, pb), (la, lb), strict=True):
        model1, manager1 = engine(base)
        alone = TrainingJob(job.job_id, job.adapter_id, manager1, d, p, lora=cfg)
        drive(model1, [alone])
        assert alone.step == job.step > 0
        assert job.metrics.losses == pytest.approx(alone.metrics.losses, rel=1e-5)
        for key, (a, b) in job.adapter().weights.items():
            torch.testing.assert_close(a, alone.adapter().weights[key][0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(b, alone.adapter().weights[key][1], atol=1e-6, rtol=1e-5)

    # export: HF PEFT on the HF model gives the engine's logits for the trained adapter
    trained = together[0].finish()
    manager.load("A", trained)
    trained.save(tmp_path / "A")
    manager.new_step()
    slot = manager.acquire_slot("A")
    ids = [1, 7, 9, 30, 12, 5]
    b = BatchBuilder(block_size=16)
    kv = model.make_kv_cache(num_blocks=4, block_size=16)
    b.add_prefill("s", ids, 0, [0], slot=slot)
    with torch.no_grad():
        ours = model.forward(b.build(), kv).logits[0]
    peft_model = PeftModel.from_pretrained(tiny_llama(seed=0, init_range=0.3), tmp_path / "A").eval()
    with torch.no_grad():
        want = peft_model(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
