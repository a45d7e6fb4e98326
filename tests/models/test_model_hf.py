"""Our decoder vs transformers on the same tiny random weights (fp32, 1e-4 relative): prefill, decode,
mixed batches, chunked prefill, preemption by recompute, prefix-cache hits, RoPE scaling, tied embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_checkpoints import (
    assert_close,
    hf_logits,
    make_hf_model,
    rand_tokens,
    reference_smlm,  # noqa: F401
)

from loquetier.engine.kv_cache import BlockManager
from loquetier.models import BatchBuilder, CheckpointError, LlamaModel, UnsupportedModelError

BS = 4


class Driver:
    """A minimal engine loop: block manager + builder + model, tracking every sequence's tokens."""

    def __init__(self, model: LlamaModel, num_blocks: int = 64, prefix_caching: bool = True) -> None:
        self.model, self.kv = model, model.make_kv_cache(num_blocks, BS)
        self.bm = BlockManager(num_blocks, BS, enable_prefix_caching=prefix_caching)
        self.tokens: dict[str, list[int]] = {}

    def admit(self, seq_id: str, tokens: list[int]) -> int:
        self.tokens[seq_id] = list(tokens)
        return self.bm.allocate(seq_id, tokens)

    def step(
        self, prefills: list[tuple[str, int, int]], decodes: list[tuple[str, int]]
    ) -> dict[str, torch.Tensor]:
        """prefills: (seq, start, end) chunks; decodes: (seq, token) appended then fed."""
        b = BatchBuilder(BS)
        for seq, start, end in prefills:
            needs = end == len(self.tokens[seq])
            b.add_prefill(seq, self.tokens[seq][start:end], start, self.bm.block_table(seq), -1, needs)
        for seq, tok in decodes:
            self.tokens[seq].append(tok)
            self.bm.append(seq, [tok])
            pos = len(self.tokens[seq]) - 1
            b.add_decode(seq, tok, pos, self.bm.block_table(seq))
        batch = b.build()
        out = self.model.forward(batch, self.kv)
        for seq, _, end in prefills:
            self.bm.mark_computed(seq, end)
        for seq, _ in decodes:
            self.bm.mark_computed(seq, len(self.tokens[seq]))
        return dict(zip(batch.logits_seq_ids, out.logits, strict=True)) if out.logits is not None else {}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, path)
    return hf, LlamaModel.from_pretrained(path, attn_impl="reference")


def test_plain_prompt_then_decode(pair) -> None:
    hf, model = pair
    gen = torch.Generator().manual_seed(1)
    prompt, more = rand_tokens(gen, 9), rand_tokens(gen, 3)
    d = Driver(model)
    d.admit("a", prompt)
    assert_close(d.step([("a", 0, 9)], [])["a"], hf_logits(hf, prompt)[-1])
    for tok in more:
        got = d.step([], [("a", tok)])["a"]
        assert_close(got, hf_logits(hf, d.tokens["a"])[-1])


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_mixed_prefill_and_decode_batch(pair, impl: str) -> None:
    hf, model = pair
    model.attn_impl = impl
    gen = torch.Generator().manual_seed(2)
    d = Driver(model)
    d.admit("a", rand_tokens(gen, 7))
    d.admit("b", rand_tokens(gen, 12))
    d.admit("c", rand_tokens(gen, 5))
    got = d.step([("a", 0, 7), ("b", 0, 6)], [])
    assert set(got) == {"a"}  # b's chunk does not complete its prompt: no logits
    assert_close(got["a"], hf_logits(hf, d.tokens["a"])[-1])
    got = d.step([("b", 6, 12), ("c", 0, 5)], [("a", 3)])
    got.update(d.step([], [("a", 9), ("b", 4), ("c", 1)]))
    for seq in "abc":
        assert_close(got[seq], hf_logits(hf, d.tokens[seq])[-1])
    model.attn_impl = "reference"


def test_chunked_prefill_in_three_chunks(pair) -> None:
    hf, model = pair
    prompt = rand_tokens(torch.Generator().manual_seed(3), 11)
    d = Driver(model)
    d.admit("a", prompt)
    assert d.step([("a", 0, 3)], []) == {}
    assert d.step([("a", 3, 8)], []) == {}
    assert_close(d.step([("a", 8, 11)], [])["a"], hf_logits(hf, prompt)[-1])


def test_decode_after_preemption_and_recompute(pair) -> None:
    hf, model = pair
    gen = torch.Generator().manual_seed(4)
    d = Driver(model, num_blocks=8, prefix_caching=False)
    d.admit("a", rand_tokens(gen, 6))
    d.step([("a", 0, 6)], [])
    d.step([], [("a", 5)])
    d.bm.preempt("a")
    d.admit("b", rand_tokens(gen, 20))  # reuses (overwrites) a's blocks
    d.step([("b", 0, 20)], [])
    d.bm.free("b")
    assert d.admit("a", d.tokens["a"]) == 0
    assert_close(d.step([("a", 0, 7)], [])["a"], hf_logits(hf, d.tokens["a"])[-1])
    assert_close(d.step([], [("a", 11)])["a"], hf_logits(hf, d.tokens["a"])[-1])


def test_prefix_cache_hits(pair) -> None:
    hf, model = pair
    gen = torch.Generator().manual_seed(5)
    shared = rand_tokens(gen, 12)
    d = Driver(model)
    d.admit("a", shared + rand_tokens(gen, 1))
    d.step([("a", 0, 13)], [])
    b_prompt = shared + rand_tokens(gen, 3)
    assert d.admit("b", b_prompt) == 12
    assert set(d.bm.block_table("b")[:3]) == set(d.bm.block_table("a")[:3])
    assert_close(d.step([("b", 12, 15)], [])["b"], hf_logits(hf, b_prompt)[-1])
    d.bm.free("a")
    d.bm.free("b")
    c_prompt = shared[:8] + rand_tokens(gen, 2)  # hits survive the free: 2 blocks
    assert d.admit("c", c_prompt) == 8
    assert_close(d.step([("c", 8, 10)], [])["c"], hf_logits(hf, c_prompt)[-1])


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            },
        ),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("llama", {"tie_word_embeddings": True}),
        ("mistral", {"sliding_window": 5}),
    ],
)
def test_variants(tmp_path: Path, kind: str, overrides: dict) -> None:
    hf = make_hf_model(kind, tmp_path, **overrides)
    model = LlamaModel.from_pretrained(tmp_path, attn_impl="reference")
    if overrides.get("tie_word_embeddings"):
        assert model.lm_head is None
    prompt = rand_tokens(torch.Generator().manual_seed(6), 14)
    d = Driver(model)
    d.admit("a", prompt)
    assert_close(d.step([("a", 0, 14)], [])["a"], hf_logits(hf, prompt)[-1])
    assert_close(d.step([], [("a", 7)])["a"], hf_logits(hf, d.tokens["a"])[-1])


def test_loader_errors(tmp_path: Path) -> None:
    make_hf_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LlamaModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read"):
        LlamaModel.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        LlamaModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        LlamaModel.from_pretrained(tmp_path / "nope")


def test_sharded_checkpoint_and_dtype_override(tmp_path: Path) -> None:
    hf = make_hf_model("qwen2", tmp_path / "src")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = LlamaModel.from_pretrained(tmp_path / "sharded", attn_impl="reference")
    prompt = rand_tokens(torch.Generator().manual_seed(7), 6)
    d = Driver(model)
    d.admit("a", prompt)
    assert_close(d.step([("a", 0, 6)], [])["a"], hf_logits(hf, prompt)[-1])
    half = LlamaModel.from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16)
    assert half.embed_tokens.dtype == torch.bfloat16
