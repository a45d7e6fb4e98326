"""Tiny, deterministic Llama-family checkpoints with a real (byte-level BPE) tokenizer, built locally.

Nothing is downloaded: the tokenizer is trained on a few sentences, the weights are seeded random.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "Loquetier serves many LoRA adapters on one shared base model",
    "what is the capital of France? Paris is the capital of France.",
    "a pirate says arr matey and sails the open sea",
    "fine tuning and inference share one step on the GPU",
    "0 1 2 3 4 5 6 7 8 9 ten eleven twelve",
]


# A small chat template in the ChatML manner: "<s>role\ncontent</s>\n" per turn, "<s>assistant\n"
# opens the answer, and the answer's "</s>" (the EOS) closes it.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def make_tokenizer(vocab_size: int = 320, *, chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_model(path: str | Path, arch: str = "llama", *, seed: int = 0, num_layers: int = 2,
                    hidden_size: int = 64, with_tokenizer: bool = True, tie_word_embeddings: bool = False,
                    chat_template: str | None = CHAT_TEMPLATE, **overrides: object) -> Path:
    """Save a tiny random ``arch`` ("llama" | "qwen2" | "mistral") checkpoint (+ tokenizer) to ``path``."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    path = Path(path)
    tokenizer = make_tokenizer(chat_template=chat_template) if with_tokenizer else None
    vocab = len(tokenizer) if tokenizer is not None else 128
    common = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=tie_word_embeddings)
    common.update(overrides)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    config_cls, model_cls = classes[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common)).eval()
    with torch.no_grad():  # larger-than-default weights so logits are decisive, not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
