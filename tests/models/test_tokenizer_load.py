"""Tokenizers load with the clean-up transformers skips for BPE turned off: same text, no warning."""

from __future__ import annotations

import json
from pathlib import Path

from loquetier.models.tokenizer_load import load_tokenizer, tokenizer_options
from tests.tiny import make_tiny_model


def test_a_bpe_tokenizer_decodes_as_before_without_the_clean_up(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model_dir = make_tiny_model(tmp_path / "llama")
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["clean_up_tokenization_spaces"] = True  # what SmolLM2's config asks for
    config_path.write_text(json.dumps(config))
    ours, plain = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(str(model_dir))
    assert ours.clean_up_tokenization_spaces is False
    for text in ("the fox , it 's here . is n't it ?", "a ' b ' c", "0 1 2 ! do n't"):
        ids = plain.encode(text)
        assert ours.decode(ids) == plain.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == plain.decode(ids, skip_special_tokens=True)


def test_other_tokenizers_load_with_their_own_settings(tmp_path: Path) -> None:
    assert tokenizer_options(tmp_path) == {}  # no tokenizer.json
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    assert tokenizer_options(tmp_path) == {}
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert tokenizer_options(tmp_path) == {}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    assert tokenizer_options(tmp_path) == {"clean_up_tokenization_spaces": False}
    assert load_tokenizer(tmp_path / "missing") is None
