"""LoRA through the decoder vs HF PEFT on the same weights: per-row logits in one mixed batch, and
gradients of every training adapter's A and B on a mixed [train | eval | prefill | decode] batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_checkpoints import (
    KINDS,
    assert_close,
    make_hf_model,
    rand_tokens,
    reference_smlm,  # noqa: F401
)
from peft import LoraConfig, get_peft_model

from loquetier.engine.kv_cache import BlockManager
from loquetier.lora.pool import LoRASlotPool
from loquetier.models import BatchBuilder, LlamaModel, weighted_loss

BS = 4
# name: (slot, rank, alpha, target modules); slots 0-1 are training slots
ADAPTERS = {
    "x": (0, 4, 8, ["q_proj", "v_proj", "down_proj"]),
    "y": (1, 2, 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "z": (2, 8, 16, ["k_proj", "o_proj", "gate_proj", "up_proj"]),
}


def _build(kind: str, path: Path, gradient_checkpointing: bool = False):
    make_hf_model(kind, path)
    peft = None
    for name, (_, r, alpha, targets) in ADAPTERS.items():
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
        if peft is None:
            base = KINDS[kind][1].from_pretrained(path).eval()
            peft = get_peft_model(base, cfg, adapter_name=name)
        else:
            peft.add_adapter(name, cfg)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for pname, p in peft.named_parameters():
            if "lora_" in pname:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model = LlamaModel.from_pretrained(
        path, attn_impl="reference", gradient_checkpointing=gradient_checkpointing
    )
    pool = LoRASlotPool(model.dims, num_slots=3, max_rank=8, num_train_slots=2)
    layers = peft.base_model.model.model.layers
    for name, (slot, r, alpha, targets) in ADAPTERS.items():
        weights = {}
        for i, layer in enumerate(layers):
            for t in targets:
                mod = getattr(
                    layer.self_attn if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp, t
                )
                weights[(i, t)] = (mod.lora_A[name].weight.detach(), mod.lora_B[name].weight.detach())
        pool.write_slot(slot, weights, scale=alpha / r)
    model.attach_lora_pool(pool)
    return peft, model, pool


def _peft_logits(peft, adapter: str | None, tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([tokens])
    with torch.no_grad():
        if adapter is None:
            with peft.disable_adapter():
                return peft(ids).logits[0]
        peft.set_adapter(adapter)
        return peft(ids).logits[0]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_mixed_adapter_logits_match_peft(tmp_path: Path, kind: str) -> None:
    peft, model, _ = _build(kind, tmp_path)
    gen = torch.Generator().manual_seed(12)
    bm, kv = BlockManager(64, BS), model.make_kv_cache(64, BS)
    seqs = {"s0": ("x", 7), "s1": ("y", 5), "s2": ("z", 9), "s3": (None, 6), "s4": ("x", 4), "s5": ("z", 3)}
    tokens = {s: rand_tokens(gen, n) for s, (_, n) in seqs.items()}
    slot = {s: -1 if a is None else ADAPTERS[a][0] for s, (a, _) in seqs.items()}
    b = BatchBuilder(BS)
    for s in ["s0", "s1", "s2", "s3"]:  # step 1: prefill four prompts
        bm.allocate(s, tokens[s], adapter_id=seqs[s][0])
        b.add_prefill(s, tokens[s], 0, bm.block_table(s), slot[s], True)
    out = model.forward(b.build(), kv)
    for s, row in zip(["s0", "s1", "s2", "s3"], out.logits, strict=True):
        assert_close(row, _peft_logits(peft, seqs[s][0], tokens[s])[-1])
    b = BatchBuilder(BS)  # step 2: two more prefills (one adapter twice) + four decodes
    for s in ["s4", "s5"]:
        bm.allocate(s, tokens[s], adapter_id=seqs[s][0])
        b.add_prefill(s, tokens[s], 0, bm.block_table(s), slot[s], True)
    for s in ["s0", "s1", "s2", "s3"]:
        tokens[s].append(int(tokens[s][0]))
        bm.append(s, tokens[s][-1:])
        b.add_decode(s, tokens[s][-1], len(tokens[s]) - 1, bm.block_table(s), slot[s])
    batch = b.build()
    out = model.forward(batch, kv)
    for s, row in zip(batch.logits_seq_ids, out.logits, strict=True):
        assert_close(row, _peft_logits(peft, seqs[s][0], tokens[s])[-1])


def _peft_loss_and_grads(peft, adapter: str, seqs: list[list[int]]):
    """Sum of token CE over ``seqs`` (all tokens are completion tokens), its count, and A/B grads."""
    peft.set_adapter(adapter)
    peft.zero_grad()
    total, count = torch.zeros(()), 0
    for toks in seqs:
        logits = peft(torch.tensor([toks])).logits[0, :-1]
        total = total + F.cross_entropy(logits, torch.tensor(toks[1:]), reduction="sum")
        count += len(toks) - 1
    (total / count).backward()
    grads = {
        n: p.grad.clone()
        for n, p in peft.named_parameters()
        if "lora_" in n and f".{adapter}." in n and p.grad is not None
    }
    return total.detach(), count, grads


@pytest.mark.parametrize(("kind", "checkpointing", "fused_rows"),
                         [("llama", False, False), ("qwen2", False, False), ("llama", True, False),
                          ("llama", True, True), ("qwen2", False, True)])
def test_training_grads_match_peft_and_skip_inference_rows(
    tmp_path: Path, kind: str, checkpointing: bool, fused_rows: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fused_rows``: the inference rows through the fused elementwise kernels (the interpreter on
    CPU), each layer's MLP output carried into the next norm: one ``add_rms_norm`` pass per norm
    after the first, none of them on the empty inference rows of a checkpointed training call."""
    norms: list[tuple[str, int]] = []
    if fused_rows:
        pytest.importorskip("triton")
        from loquetier.kernels import fused

        if not fused.INTERPRET:  # the model here is on the CPU
            pytest.skip("needs TRITON_INTERPRET=1 set before the kernels are imported")
        for name in ("rms_norm", "add_rms_norm"):
            def counted(h, *args, _fn=getattr(fused, name), _name=name):  # type: ignore[no-untyped-def]
                norms.append((_name, h.shape[0]))
                return _fn(h, *args)
            monkeypatch.setattr(fused, name, counted)
        monkeypatch.setattr(fused, "_forced", True)  # fused.force(True), undone after the test
    peft, model, pool = _build(kind, tmp_path, checkpointing)
    gen = torch.Generator().manual_seed(13)
    train = [("x", rand_tokens(gen, 4)), ("y", rand_tokens(gen, 3)), ("x", rand_tokens(gen, 4))]  # 11 rows
    evals = [("z", rand_tokens(gen, 6))]
    bm, kv = BlockManager(64, BS), model.make_kv_cache(64, BS)
    b = BatchBuilder(BS)
    for name, toks in train:
        b.add_train(toks, None, ADAPTERS[name][0], group=name)
    for name, toks in evals:
        b.add_eval(toks, None, ADAPTERS[name][0], group="eval-" + name)
    for s, name, n in [("p0", "y", 9), ("p1", None, 8), ("p2", "z", 6)]:  # 23 prefill rows
        toks = rand_tokens(gen, n)
        bm.allocate(s, toks)
        b.add_prefill(s, toks, 0, bm.block_table(s), -1 if name is None else ADAPTERS[name][0], True)
    batch = b.build()
    assert (batch.num_train, batch.num_rest) == (11, 29)
    saved: list[tuple[int, ...]] = []
    params = {p.data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.forward(batch, kv)
    loss = weighted_loss(out.loss_sum, out.token_count.float())
    loss.backward()
    # what autograd saved covers the 11 training rows only: no tensor has a rest (29) or total (40) row dim
    assert any(11 in shape for shape in saved)
    assert not [shape for shape in saved if 29 in shape or 40 in shape]
    assert sum(shape[0] for shape in saved if len(shape) == 2 and shape[1] == 64) % 11 == 0
    keys = list(batch.group_keys)
    for name in ["x", "y"]:
        ref_sum, ref_count, grads = _peft_loss_and_grads(peft, name, [t for n, t in train if n == name])
        g = keys.index(name)
        assert int(out.token_count[g]) == ref_count
        assert_close(out.loss_sum[g].detach(), ref_sum)
        slot, r = ADAPTERS[name][0], ADAPTERS[name][1]
        assert grads
        for pname, grad in grads.items():
            layer = int(pname.split(".layers.")[1].split(".")[0])
            module = pname.split(".lora_")[0].rsplit(".", 1)[1]
            lora = pool.get(layer, module)
            ours = lora.grad_a[slot, :r] if ".lora_A." in pname else lora.grad_b[slot, :r].T
            assert_close(ours, grad, rtol=2e-4)
    with torch.no_grad():  # eval group: loss only
        peft.set_adapter("z")
        toks = evals[0][1]
        ref = F.cross_entropy(
            peft(torch.tensor([toks])).logits[0, :-1], torch.tensor(toks[1:]), reduction="sum"
        )
    assert_close(out.loss_sum[keys.index("eval-z")].detach(), ref)
    if fused_rows:  # the 29 inference rows: one plain norm (layer 0's input), then each norm adds
        layers = model.cfg.num_layers
        assert [n for n in norms if n[1]] == [("rms_norm", 29)] + [("add_rms_norm", 29)] * (2 * layers)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-decode", "two-launches"])
def test_triton_decode_step_matches_peft_with_the_fused_switch(
    tmp_path: Path, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefill steps and a mixed prefill + decode step on the Triton SMLM backend (the interpreter on
    CPU), with the one-launch decode path (``LOQUETIER_SMLM_FUSED_DECODE``) on and off: the same
    logits as PEFT either way, and the same as each other."""
    pytest.importorskip("triton")
    from loquetier.kernels import force_backend, set_fused_decode, smlm

    if not torch.cuda.is_available() and not smlm.INTERPRET:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 set before the kernels are imported")
    peft, model, _ = _build("llama", tmp_path)
    kernels: set[str] = set()
    launch = smlm.launch

    def recording(kernel, grid, *args, **meta):  # noqa: ANN001, ANN002, ANN003, ANN202
        kernels.add(kernel.fn.__name__)
        return launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(smlm, "launch", recording)
    gen = torch.Generator().manual_seed(13)
    bm, kv = BlockManager(64, BS), model.make_kv_cache(64, BS)
    seqs = {"s0": ("x", 5), "s1": ("y", 3), "s2": ("z", 4), "s3": (None, 2), "s4": ("y", 3)}
    tokens = {s: rand_tokens(gen, n) for s, (_, n) in seqs.items()}
    slot = {s: -1 if a is None else ADAPTERS[a][0] for s, (a, _) in seqs.items()}
    force_backend("triton")
    set_fused_decode(fused)
    try:
        b = BatchBuilder(BS)
        for s in ["s0", "s1", "s2", "s3"]:
            bm.allocate(s, tokens[s], adapter_id=seqs[s][0])
            b.add_prefill(s, tokens[s], 0, bm.block_table(s), slot[s], True)
        batch = b.build()
        assert batch.meta.max_seg_len <= smlm.TUNING.fused_max_rows  # the fused path applies
        out = model.forward(batch, kv)
        for s, row in zip(["s0", "s1", "s2", "s3"], out.logits, strict=True):
            assert_close(row, _peft_logits(peft, seqs[s][0], tokens[s])[-1])
        b = BatchBuilder(BS)
        bm.allocate("s4", tokens["s4"], adapter_id="y")
        b.add_prefill("s4", tokens["s4"], 0, bm.block_table("s4"), slot["s4"], True)
        for s in ["s0", "s1", "s2", "s3"]:
            tokens[s].append(int(tokens[s][0]))
            bm.append(s, tokens[s][-1:])
            b.add_decode(s, tokens[s][-1], len(tokens[s]) - 1, bm.block_table(s), slot[s])
        batch = b.build()
        out = model.forward(batch, kv)
        for s, row in zip(batch.logits_seq_ids, out.logits, strict=True):
            assert_close(row, _peft_logits(peft, seqs[s][0], tokens[s])[-1])
    finally:
        force_backend("reference")  # the module's fixture put the reference backend on
        set_fused_decode(None)
    assert ("shrink_expand_kernel" in kernels) is fused
    assert ("shrink_parts_kernel" in kernels) is not fused
