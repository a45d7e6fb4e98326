"""Test harness: a tiny random HF Llama whose LoRA-targeted linears run through our op layer.

Every targeted ``nn.Linear`` becomes ``lora_linear(x_train, x_rest, W, b, [(pool module, 0)], meta)``
with the rows' slots taken from ``Rows`` — the same contract the decoder uses. It lets the adapter,
manager and job code be tested against HF PEFT without depending on the decoder's progress.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from loquetier.kernels import SMLMMeta, lora_linear
from loquetier.lora.data import IGNORE_INDEX, TrainSequence
from loquetier.lora.pool import TARGET_MODULES, LoRASlotPool, ModelDims


def tiny_llama(seed: int = 0, vocab: int = 64, init_range: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=init_range,
    )
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def dims_of(model: LlamaForCausalLM) -> ModelDims:
    c = model.config
    return ModelDims(
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    )


@dataclass
class Rows:
    """Slot of every row of the next forward (None: ``default_slot`` everywhere) and the train count."""

    slots: list[int] | None = None
    num_train: int = 0
    default_slot: int = -1
    metas: dict[int, SMLMMeta] = field(default_factory=dict)


class _Wrapped(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, pool: LoRASlotPool, key: tuple[int, str], rows: Rows) -> None:
        super().__init__()
        self.base, self.pool, self.key, self.rows = base, pool, key, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [T, in]
        n = flat.shape[0]
        slots = self.rows.slots if self.rows.slots is not None else [self.rows.default_slot] * n
        meta = SMLMMeta.build(slots, self.rows.num_train)
        k = self.rows.num_train
        y_train, y_rest = lora_linear(
            flat[:k], flat[k:], self.base.weight, self.base.bias, [(self.pool.get(*self.key), 0)], meta
        )
        return torch.cat([y_train, y_rest]).reshape(*x.shape[:-1], -1)


class Engine:
    """HF Llama + our slot pool. ``train_step`` runs one fused forward/backward over many sequences."""

    def __init__(self, model: LlamaForCausalLM, pool: LoRASlotPool) -> None:
        self.model, self.pool, self.rows = model, pool, Rows()
        for layer, block in enumerate(model.model.layers):
            for name in TARGET_MODULES:
                parent = (
                    block.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else block.mlp
                )
                setattr(parent, name, _Wrapped(getattr(parent, name), pool, (layer, name), self.rows))
        model.model.embed_tokens.register_forward_hook(
            lambda m, i, o: o.requires_grad_(torch.is_grad_enabled())
        )

    def train_step(self, items: Sequence[tuple[TrainSequence, int, float]]) -> list[float]:
        """items: (sequence, slot, loss denominator), all of one length. Backprops
        sum_i loss_sum_i / denom_i; returns each sequence's loss_sum."""
        length = items[0][0].num_tokens
        assert all(s.num_tokens == length for s, _, _ in items), "harness batches equal lengths only"
        ids = torch.tensor([s.token_ids for s, _, _ in items])
        labels = torch.tensor([s.shifted_labels for s, _, _ in items])
        self.rows.slots = [slot for _, slot, _ in items for _ in range(length)]
        self.rows.num_train = len(self.rows.slots)
        try:
            logits = self.model(input_ids=ids).logits.float()  # [B, T, V]
        finally:
            self.rows.slots, self.rows.num_train = None, 0
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        sums = nll.sum(dim=1)  # [B]
        denoms = torch.tensor([d for _, _, d in items], dtype=torch.float32)
        (sums / denoms).sum().backward()
        return sums.tolist()

    @torch.no_grad()
    def logits(self, ids: Sequence[int], slot: int) -> torch.Tensor:
        self.rows.default_slot = slot
        return self.model(input_ids=torch.tensor([list(ids)])).logits[0]

    @torch.no_grad()
    def eval_sums(self, seq: TrainSequence, slot: int) -> tuple[float, int, int]:
        logits = self.logits(seq.token_ids, slot).float()
        labels = torch.tensor(seq.shifted_labels)
        valid = labels != IGNORE_INDEX
        nll = F.cross_entropy(logits[valid], labels[valid], reduction="sum")
        correct = (logits[valid].argmax(-1) == labels[valid]).sum()
        return float(nll), int(valid.sum()), int(correct)

    @torch.no_grad()
    def greedy(self, prompt: Sequence[int], slot: int, max_new: int, eos: int) -> list[int]:
        ids = list(prompt)
        for _ in range(max_new):
            token = int(self.logits(ids, slot)[-1].argmax())
            ids.append(token)
            if token == eos:
                break
        return ids[len(prompt) :]
