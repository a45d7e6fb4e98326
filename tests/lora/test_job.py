"""TrainingJob end to end on a tiny HF Llama driven through our op layer (see lora_harness)."""

from __future__ import annotations

import pytest
import torch
from lora_harness import Engine, dims_of, tiny_llama
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from loquetier.lora import checkpoint
from loquetier.lora.adapter import LoRAAdapter, peft_key
from loquetier.lora.config import AdapterError, LoRAConfig
from loquetier.lora.data import TrainSequence, tokenize_examples
from loquetier.lora.evaluate import EvaluationJob
from loquetier.lora.job import TrainingJob, train_key
from loquetier.lora.manager import AdapterManager
from loquetier.lora.params import TrainingParams
from loquetier.lora.pool import LoRASlotPool

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def setup(
    num_train_slots: int = 2, num_slots: int = 4, init_range: float = 0.02
) -> tuple[Engine, AdapterManager]:
    model = tiny_llama(seed=0, init_range=init_range)
    pool = LoRASlotPool(dims_of(model), num_slots=num_slots, max_rank=8, num_train_slots=num_train_slots)
    return Engine(model, pool), AdapterManager(pool)


def token_data(seed: int, n: int, length: int = 6) -> list[TrainSequence]:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 64, (length,), generator=gen).tolist() for _ in range(n)]
    return tokenize_examples([{"prompt_token_ids": r[:3], "completion_token_ids": r[3:]} for r in rows])


def start_adapter(dims, rank: int = 4, seed: int = 0) -> LoRAAdapter:
    adapter = LoRAAdapter.new(LoRAConfig(rank=rank, alpha=8, target_modules=MODULES), dims, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for _, b in adapter.weights.values():
        b.copy_(torch.randn(b.shape, generator=gen) * 0.1)  # non-zero B: A gets gradients too
    return adapter


def drive(engine: Engine, jobs: list[TrainingJob], until_step: int | None = None) -> None:
    """Shared steps: every job with work puts its next micro-batch into the same forward/backward."""
    while any(not j.is_done and (until_step is None or j.step < until_step) for j in jobs):
        running = [
            (j, j.next_micro_batch())
            for j in jobs
            if not j.is_done and (until_step is None or j.step < until_step) and j.num_ready_tokens()
        ]
        items = [(s, j.slot, mb.num_target_tokens) for j, mb in running for s in mb.sequences]
        sums = engine.train_step(items)
        for j, mb in running:
            j.on_micro_batch_done(sum(sums[: len(mb.sequences)]), mb.num_target_tokens)
            sums = sums[len(mb.sequences) :]


def run_eval(engine: Engine, job: EvaluationJob, slot: int) -> None:
    while (mb := job.next_micro_batch()) is not None:
        parts = [engine.eval_sums(s, slot) for s in mb.sequences]
        job.on_micro_batch_done(*(sum(p[i] for p in parts) for i in range(3)))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_step_matches_peft_and_torch(optimizer: str) -> None:
    engine, manager = setup()
    init = start_adapter(manager.pool.dims)
    [seq] = token_data(1, 1, length=9)
    params = TrainingParams(optimizer=optimizer, lr=0.05, weight_decay=0.1, max_grad_norm=0.5, max_steps=1)
    job = TrainingJob("j", "a", manager, [seq], params, init=init.clone())
    drive(engine, [job])
    ours = job.adapter()

    peft_model = get_peft_model(
        tiny_llama(seed=0),
        LoraConfig(r=4, lora_alpha=8, target_modules=list(MODULES), init_lora_weights=False),
    )
    state = {
        peft_key(layer, m, w): t for (layer, m), pair in init.weights.items() for w, t in zip("AB", pair)
    }
    set_peft_model_state_dict(peft_model, state)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW)(trainable, lr=0.05, weight_decay=0.1)
    loss = peft_model(input_ids=torch.tensor([seq.token_ids]), labels=torch.tensor([seq.labels])).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 0.5)
    opt.step()
    named = dict(peft_model.named_parameters())
    for (layer, module), (a, b) in ours.weights.items():
        prefix = (
            f"base_model.model.model.layers.{layer}.{'self_attn' if module[0] in 'qkvo' else 'mlp'}.{module}"
        )
        torch.testing.assert_close(a, named[f"{prefix}.lora_A.default.weight"].detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(b, named[f"{prefix}.lora_B.default.weight"].detach(), atol=1e-5, rtol=0)
    assert job.metrics.losses == pytest.approx([loss.item()], rel=1e-5)
    assert not torch.equal(ours.weights[(0, "q_proj")][0], init.weights[(0, "q_proj")][0])


def test_jobs_in_shared_steps_match_each_alone() -> None:
    data_a, data_b = token_data(2, 7), token_data(3, 5)
    pa = TrainingParams(lr=1e-2, grad_accum=2, micro_batch_tokens=12, epochs=2, seed=5, lr_schedule="cosine")
    pb = TrainingParams(optimizer="sgd", lr=0.1, micro_batch_tokens=18, max_steps=5, seed=6, warmup_steps=2)
    lora = LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    lora_b = LoRAConfig(rank=2, alpha=4, target_modules=MODULES)

    engine, manager = setup()
    together = [
        TrainingJob("a", "A", manager, data_a, pa, lora=lora),
        TrainingJob("b", "B", manager, data_b, pb, lora=lora_b),
    ]
    drive(engine, together)
    alone = []
    for job_id, adapter_id, data, params, cfg in (
        ("a", "A", data_a, pa, lora),
        ("b", "B", data_b, pb, lora_b),
    ):
        engine1, manager1 = setup()
        job = TrainingJob(job_id, adapter_id, manager1, data, params, lora=cfg)
        drive(engine1, [job])
        alone.append(job)
    for shared, single in zip(together, alone, strict=True):
        assert shared.step == single.step > 0
        assert shared.metrics.losses == pytest.approx(single.metrics.losses, rel=1e-5)
        for key, (a, b) in shared.adapter().weights.items():
            torch.testing.assert_close(a, single.adapter().weights[key][0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(b, single.adapter().weights[key][1], atol=1e-6, rtol=1e-5)


def test_checkpoint_restore_continues_the_same_run() -> None:
    data = token_data(4, 9)
    params = TrainingParams(
        lr=2e-2,
        grad_accum=2,
        micro_batch_tokens=12,
        epochs=3,
        seed=9,
        lr_schedule="cosine",
        warmup_steps=1,
        max_grad_norm=0.3,
        checkpoint_every=3,
    )
    lora = LoRAConfig(rank=4, alpha=16, target_modules=MODULES)
    engine, manager = setup()
    full = TrainingJob("j", "A", manager, data, params, lora=lora)
    drive(engine, [full], until_step=3)
    assert full.should_checkpoint
    blob = checkpoint.dump(full)
    assert not full.should_checkpoint and isinstance(blob, bytes)
    drive(engine, [full])
    assert full.is_done and full.should_checkpoint

    engine2, manager2 = setup()  # a fresh engine: nothing carried over but the bytes
    resumed = checkpoint.restore(blob, manager2, data)
    assert resumed.step == 3 and resumed.metrics.losses == full.metrics.losses[:3]
    drive(engine2, [resumed])
    assert resumed.step == full.step
    assert resumed.metrics.losses == pytest.approx(full.metrics.losses, rel=1e-6)
    for key, (a, b) in full.adapter().weights.items():
        torch.testing.assert_close(resumed.adapter().weights[key][0], a, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(resumed.adapter().weights[key][1], b, atol=1e-7, rtol=1e-6)
    with pytest.raises(AdapterError, match="data differs"):
        checkpoint.restore(blob, setup()[1], token_data(5, 9))


def test_tiny_model_learns_a_mapping_and_leaves_others_alone() -> None:
    engine, manager = setup(num_train_slots=1, num_slots=3, init_range=0.3)  # logits able to be confident
    pairs = [([1, 10 + i], [30 + (7 * i) % 20, 50 + (3 * i) % 10, 2]) for i in range(8)]
    data = tokenize_examples([{"prompt_token_ids": p, "completion_token_ids": c} for p, c in pairs])
    other = start_adapter(manager.pool.dims, seed=3)
    manager.load("other", other)
    other_slot = manager.acquire_slot("other")
    probe = [1, 12, 40, 41]
    base_before, other_before = engine.logits(probe, -1), engine.logits(probe, other_slot)

    params = TrainingParams(
        lr=1e-2, micro_batch_tokens=40, epochs=40, seed=1, eval_every=20, lr_schedule="linear", warmup_steps=5
    )
    job = TrainingJob(
        "learn",
        "L",
        manager,
        data,
        params,
        lora=LoRAConfig(rank=8, alpha=16, target_modules=MODULES),
        eval_data=data,
    )
    first = EvaluationJob("before", "L", data)
    run_eval(engine, first, job.slot)
    while not job.is_done:
        drive(engine, [job], until_step=job.step + 1)
        if job.should_eval:
            run_eval(engine, job.start_eval(), job.slot)
    assert [s for s, _ in job.metrics.evals] == [20, 40] and job.should_checkpoint
    final = job.metrics.evals[-1][1]
    assert final.loss < first.result.loss / 20 and final.accuracy == 1.0
    for prompt, completion in pairs:
        assert engine.greedy(prompt, job.slot, max_new=5, eos=2) == completion

    trained = job.finish()  # the job's own key is gone; the caller installs the weights under their id
    assert train_key(job.job_id) not in manager and "L" not in manager
    manager.load("L", trained)
    assert manager.slot_of("L") is None and not manager.is_pinned("L")
    manager.new_step()
    slot = manager.acquire_slot("L")  # served from an inference slot, same answers
    assert slot != job.slot and engine.greedy(pairs[0][0], slot, max_new=5, eos=2) == pairs[0][1]
    torch.testing.assert_close(engine.logits(probe, -1), base_before, atol=0, rtol=0)
    torch.testing.assert_close(engine.logits(probe, other_slot), other_before, atol=0, rtol=0)
    assert manager.get("L") is trained


def test_job_rejects_dropout_and_a_second_trainer() -> None:
    engine, manager = setup(num_train_slots=2)
    data = token_data(1, 2)
    with pytest.raises(AdapterError, match="dropout"):
        TrainingJob("j", "a", manager, data, TrainingParams(), lora=LoRAConfig(dropout=0.1))
    job = TrainingJob("j", "a", manager, data, TrainingParams(), lora=LoRAConfig())
    assert "a" not in manager and train_key("j") in manager  # trained under the job's key, not by name
    with pytest.raises(AdapterError, match="being trained"):
        TrainingJob("j", "a", manager, data, TrainingParams(), lora=LoRAConfig())
    job.abandon()
    assert train_key("j") not in manager and manager.pool.num_train_slots == 2


def test_optimizer_step_is_torchs_clipping_and_fused_adamw() -> None:
    """The job's own multi-tensor calls (lists built once) give torch's clip_grad_norm_ + AdamW(fused)
    bit for bit, over steps that clip and steps that do not, and leave the state torch would."""
    engine, manager = setup()
    params = TrainingParams(optimizer="adamw", lr=0.01, weight_decay=0.1, max_grad_norm=0.5, lr_schedule="constant")
    job = TrainingJob("j", "a", manager, token_data(1, 4), params, init=start_adapter(manager.pool.dims))
    ref = [p.detach().clone().requires_grad_() for p in job._params]
    ref_opt = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1, fused=True)
    gen = torch.Generator().manual_seed(5)
    for scale in (0.001, 10.0, 0.001):  # the second step's gradients are clipped
        for mine, r in zip(job._grads, ref, strict=True):
            r.grad = torch.randn(r.shape, generator=gen) * scale
            mine.copy_(r.grad)
        torch.nn.utils.clip_grad_norm_(ref, 0.5)
        ref_opt.step()
        job._accum.append((1.0, 1))
        job._account(job._update(len(job._accum)))  # what on_micro_batch_done does at a window's end
        assert all(torch.equal(p, r) for p, r in zip(job._params, ref, strict=True))
    ours, theirs = job.optimizer.state_dict()["state"], ref_opt.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for i in ours:
        assert all(torch.equal(ours[i][k], theirs[i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # the slot's pool weights follow the masters
    lora = manager.pool.get(0, "q_proj")
    torch.testing.assert_close(lora.a[job.slot, :4].float(), job.masters[(0, "q_proj")][0].detach())


def test_a_queued_update_is_the_update_and_a_non_finite_loss_skips_it() -> None:
    """``queue_update`` (the engine's, before it reads a step's losses) makes the same optimizer step
    as ``on_micro_batch_done`` alone; with a non-finite loss on the device it changes no weight and
    no optimizer state, and the gradients are zeroed."""
    engine, manager = setup()
    params = TrainingParams(optimizer="adamw", lr=0.01, weight_decay=0.1, max_grad_norm=0.5, grad_accum=2,
                            micro_batch_tokens=12)  # two sequences a micro-batch: 8 of them
    init = start_adapter(manager.pool.dims)
    queued = TrainingJob("q", "a", manager, token_data(1, 16), params, init=init.clone())
    plain = TrainingJob("p", "b", manager, token_data(1, 16), params, init=init.clone())
    gen = torch.Generator().manual_seed(7)
    for micro_batch in range(4):
        grads = [torch.randn(g.shape, generator=gen) for g in queued._grads]
        for job in (queued, plain):
            job.next_micro_batch()
            for mine, g in zip(job._grads, grads, strict=True):
                mine.add_(g)
        # only the second micro-batch of each window closes it
        assert queued.queue_update(torch.tensor(2.5)) is (micro_batch % 2 == 1)
        queued.on_micro_batch_done(2.5, 10)
        plain.on_micro_batch_done(2.5, 10)
        assert all(torch.equal(a, b) for a, b in zip(queued._params, plain._params, strict=True))
    assert queued.step == plain.step == 2 and queued.metrics.lrs == plain.metrics.lrs
    before = [p.detach().clone() for p in queued._params]
    state = {k: v.clone() for k, v in queued.optimizer.state[queued._params[0]].items()}
    for micro_batch in range(2):
        queued.next_micro_batch()
        for g in queued._grads:
            g.add_(torch.randn(g.shape, generator=gen))
        if micro_batch == 0:
            queued.on_micro_batch_done(2.5, 10)
        else:
            assert queued.queue_update(torch.tensor(float("nan")))
    assert all(torch.equal(a, b) for a, b in zip(queued._params, before, strict=True))
    assert all(torch.equal(v, queued.optimizer.state[queued._params[0]][k]) for k, v in state.items())
    assert all(not g.any() for g in queued._grads)
