"""Unit checks of the decoder's parts: chunked CE vs full CE (values, counts, grads), attention
implementations against each other (GQA, windows, paged layouts), batch layout, config parsing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loquetier.kernels.meta import SMLMMeta
from loquetier.models import BatchBuilder, ModelConfig, chunked_cross_entropy, weighted_loss
from loquetier.models.attention import (
    _prefill_part,
    attend_ref,
    paged_attention,
    paged_packed,
    varlen_attention,
    write_kv,
)


def test_chunked_cross_entropy_matches_full() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, generator=gen, requires_grad=True)
    w = torch.randn(40, 16, generator=gen)
    labels = torch.randint(0, 40, (23,), generator=gen)
    labels[[0, 5, 6]] = -100
    groups = torch.tensor([0] * 10 + [2] * 13)
    loss_sum, count, correct = chunked_cross_entropy(
        h, w, labels, groups, 3, chunk_bytes=4 * 40 * 4
    )  # 4 rows
    logits = h @ w.T
    nll = F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    ref = torch.zeros(3).index_add(0, groups, nll)
    torch.testing.assert_close(loss_sum, ref)
    valid = labels != -100
    assert count.tolist() == [int(valid[:10].sum()), 0, int(valid[10:].sum())]
    hits = (logits.argmax(-1) == labels) & valid
    assert correct.tolist() == [int(hits[:10].sum()), 0, int(hits[10:].sum())]
    denom = torch.tensor([7.0, 0.0, 3.0])
    (g_ours,) = torch.autograd.grad(weighted_loss(loss_sum, denom), h)
    (g_ref,) = torch.autograd.grad(ref[0] / 7 + ref[2] / 3, h)
    torch.testing.assert_close(g_ours, g_ref)


def _qkv(n: int, hq: int = 4, hkv: int = 2, d: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, d, generator=gen) for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("window", [None, 3])
def test_varlen_sdpa_matches_reference(window: int | None) -> None:
    b = BatchBuilder(4).add_train([1] * 5).add_train([1] * 1).add_train([1] * 7).build()
    q, k, v = _qkv(13)
    ref = varlen_attention(q, k, v, b.train, 0.3, window=window, impl="reference")
    got = varlen_attention(q, k, v, b.train, 0.3, window=window, impl="sdpa")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    pos = torch.arange(7)  # one sequence by hand
    torch.testing.assert_close(ref[6:], attend_ref(q[6:], k[6:], v[6:], pos, pos, 0.3, window))


@pytest.mark.parametrize("window", [None, 5])
def test_paged_sdpa_matches_reference_and_contiguous(window: int | None) -> None:
    bs, nb = 4, 12
    kc, vc = torch.zeros(nb, bs, 2, 8), torch.zeros(nb, bs, 2, 8)
    # seq a: 6 cached + 5-token chunk over blocks [7, 2, 9]; seq b: decode at position 9 over [0, 11, 4]
    ka, va = _qkv(11, seed=1)[1:]
    kb, vb = _qkv(10, seed=2)[1:]
    slots_a = [[7, 2, 9][p // bs] * bs + p % bs for p in range(11)]
    slots_b = [[0, 11, 4][p // bs] * bs + p % bs for p in range(10)]
    write_kv(kc, vc, ka[:6], va[:6], torch.tensor(slots_a[:6]))
    write_kv(kc, vc, kb[:9], vb[:9], torch.tensor(slots_b[:9]))
    batch = BatchBuilder(bs).add_prefill("a", [1] * 5, 6, [7, 2, 9]).add_decode("b", 1, 9, [0, 11, 4]).build()
    write_kv(kc, vc, torch.cat([ka[6:], kb[9:]]), torch.cat([va[6:], vb[9:]]), batch.paged.slot_mapping)
    q = _qkv(6, seed=3)[0]
    ref = paged_attention(q, kc, vc, batch.paged, 0.25, window=window, impl="reference")
    got = paged_attention(q, kc, vc, batch.paged, 0.25, window=window, impl="sdpa")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    pos_a, pos_b = torch.arange(11), torch.arange(10)
    torch.testing.assert_close(ref[:5], attend_ref(q[:5], ka, va, pos_a[6:], pos_a, 0.25, window))
    torch.testing.assert_close(ref[5:], attend_ref(q[5:], kb, vb, pos_b[9:], pos_b, 0.25, window))


@pytest.mark.parametrize("window", [None, 5])
def test_packed_prefill_keys_match_the_paged_reference(window: int | None) -> None:
    """The packed-key path (FlashAttention's input on GPUs) reads exactly each chunk's context, in
    order, out of scattered pages; decode rows after the chunks are left out of the packing."""
    bs, nb = 4, 16
    gen = torch.Generator().manual_seed(7)
    kc, vc = torch.randn(nb, bs, 2, 8, generator=gen), torch.randn(nb, bs, 2, 8, generator=gen)
    b = BatchBuilder(bs)
    b.add_prefill("a", [1] * 5, 6, [7, 2, 9])  # keys 0..10 over three pages
    b.add_prefill("b", [1] * 3, 0, [12])  # a first chunk: keys 0..2
    b.add_prefill("c", [1] * 2, 13, [3, 14, 5, 1])  # a late chunk: keys 0..14
    b.add_decode("d", 1, 9, [0, 11, 4])
    batch = b.build()
    assert batch.paged.prefill_cu_keys is not None and batch.paged.prefill_cu_keys.tolist() == [0, 11, 14, 29]
    expect = [t[p // bs] * bs + p % bs for t, n in (([7, 2, 9], 11), ([12], 3), ([3, 14, 5, 1], 15))
              for p in range(n)]
    assert batch.paged.prefill_key_slots is not None and batch.paged.prefill_key_slots.tolist() == expect
    q = torch.randn(11, 4, 8, generator=gen)
    ref = paged_attention(q, kc, vc, batch.paged, 0.3, window=window, impl="reference")
    pre = _prefill_part(batch.paged, 3)
    for impl in ("reference", "sdpa"):
        got = paged_packed(q[:10], kc, vc, pre, 0.3, window, impl=impl)
        torch.testing.assert_close(got, ref[:10], rtol=1e-5, atol=1e-5)
    only_decode = BatchBuilder(bs).add_decode("d", 1, 9, [0, 11, 4]).build()
    assert only_decode.paged.prefill_key_slots is None  # nothing packed without prefill chunks


def test_batch_layout_and_labels() -> None:
    b = BatchBuilder(4)
    b.add_decode("d", 9, 4, [3, 1], slot=2)
    b.add_prefill("p", [5, 6, 7], 0, [0], slot=1, needs_logits=True)
    b.add_eval([1, 2, 3], [-100, 2, 3], slot=0, group="ev")
    b.add_train([4, 5, 6, 7], [-100, -100, 6, 7], slot=0, group="tr")
    batch = b.build()
    assert batch.input_ids.tolist() == [4, 5, 6, 7, 1, 2, 3, 5, 6, 7, 9]
    assert batch.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 4]
    assert batch.labels.tolist() == [-100, 6, 7, -100, 2, 3, -100]
    assert batch.group_keys == ("tr", "ev") and batch.loss_groups.tolist() == [0] * 4 + [1] * 3
    assert batch.logits_indices.tolist() == [5, 6] and batch.logits_seq_ids == ("p", "d")
    assert batch.paged.slot_mapping.tolist() == [0, 1, 2, 4]
    assert batch.meta.num_train_tokens == 4 and batch.meta.host_segments[0] == (0, 4, 0)
    paged = batch.paged
    assert paged.q_cu_seqlens.tolist() == [0, 3, 4] and paged.context_lens.tolist() == [3, 5]
    assert paged.block_tables.tolist() == [[0, 0], [3, 1]] and paged.prefill_cu_keys.tolist() == [0, 3]
    assert paged.prefill_key_slots.tolist() == [0, 1, 2]
    assert batch.train.cu_seqlens.tolist() == [0, 4] and batch.eval.cu_seqlens.tolist() == [0, 3]
    int32 = (paged.q_cu_seqlens, paged.context_lens, paged.block_tables, paged.prefill_cu_keys,
             batch.train.cu_seqlens, batch.eval.cu_seqlens)
    int64 = (batch.input_ids, batch.positions, batch.labels, batch.loss_groups, batch.logits_indices,
             paged.slot_mapping, paged.prefill_key_slots)
    assert all(t.dtype == torch.int32 for t in int32) and all(t.dtype == torch.int64 for t in int64)
    # views of one buffer per dtype, each on a 16-byte boundary (Triton specializes pointers on it)
    assert all(t.data_ptr() % 16 == 0 and t.is_contiguous() for t in int32 + int64)
    assert len({t.untyped_storage().data_ptr() for t in int32}) == 1
    # the SMLM metadata rides in the same int32 buffer, and equals the metadata built on its own
    meta, alone = batch.meta, SMLMMeta.build([0] * 4 + [0] * 3 + [1] * 3 + [2], 4)
    tables = ("token_slots", "seg_starts", "seg_lens", "seg_slots", "blocks", "grad_blocks")
    for name in tables:
        got, want = getattr(meta, name), getattr(alone, name)
        assert got.dtype == torch.int32 and got.data_ptr() % 16 == 0 and got.tolist() == want.tolist()
        assert got.untyped_storage().data_ptr() == paged.context_lens.untyped_storage().data_ptr()
    assert meta.host_segments == alone.host_segments == ((0, 4, 0), (4, 3, 0), (7, 3, 1), (10, 1, 2))
    assert (meta.num_blocks, meta.num_train_blocks, meta.num_grad_blocks, meta.max_seg_len) == (4, 1, 1, 4)
    with pytest.raises(ValueError, match="cannot hold"):
        BatchBuilder(4).add_decode("x", 1, 8, [0, 1])


def test_config_parsing() -> None:
    base = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "torch_dtype": "bfloat16",
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "rope_theta": 500.0,
    }
    cfg = ModelConfig.from_dict(base)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.dtype, cfg.rope_type, cfg.rope_theta) == (
        2,
        4,
        torch.bfloat16,
        "linear",
        500.0,
    )
    qwen = ModelConfig.from_dict(
        {
            **base,
            "architectures": ["Qwen2ForCausalLM"],
            "use_sliding_window": True,
            "sliding_window": 4,
            "max_window_layers": 1,
        }
    )
    assert qwen.qkv_bias and qwen.sliding_windows == (None, 4)
    with pytest.raises(ValueError, match="rope type"):
        ModelConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_auto_attention_keeps_fp32_off_flash_attention() -> None:
    """FlashAttention takes fp16/bf16 only: an fp32 model on CUDA attends its prompt rows through
    SDPA, and asking for flash in fp32 is a clear error rather than a kernel failure mid-step."""
    from loquetier.models.attention import _varlen_attn, resolve_impl

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_impl("auto", cuda, torch.float32) == "sdpa"
    assert resolve_impl("auto", cpu, torch.float32) == "reference"
    assert resolve_impl("auto", cuda, torch.bfloat16) == ("flash" if _varlen_attn()[0] is not None else "sdpa")
    with pytest.raises(ValueError, match="fp16/bf16"):
        resolve_impl("flash", cuda, torch.float32)
    with pytest.raises(ValueError, match="unknown attention impl"):
        resolve_impl("fast", cuda, torch.float32)
