"""Tiny random HF checkpoints of three families (Llama, Qwen2, Mistral), built locally, and the helpers
that compare our model with them; the `reference_smlm` fixture puts a test module on the torch SMLM backend
(import it into the test module). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from loquetier.kernels import force_backend


@pytest.fixture(autouse=True, scope="module")
def reference_smlm() -> Iterator[None]:
    """The torch reference SMLM backend for these modules (import this fixture into a test module)."""
    force_backend("reference")
    yield
    force_backend(None)


TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.15,
    "rms_norm_eps": 1e-6,
}
KINDS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def make_hf_model(kind: str, path: Path, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A tiny random model of ``kind``, saved with save_pretrained to ``path`` (fp32, eval mode)."""
    config_cls, model_cls = KINDS[kind]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():  # norms and biases are 1 / 0 at init: randomise so loading them is tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def hf_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """[len, V] logits of one sequence from the HF model."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    """Relative tolerance, scaled by the reference's magnitude."""
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


def rand_tokens(gen: torch.Generator, n: int, vocab: int = 128) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()
