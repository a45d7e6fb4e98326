"""Log-probability answers: each token's text offset, and the tokens a stop string cut off."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from loquetier.gateway.answers import chat_logprobs, text_logprobs
from loquetier.gateway.tokens import TokenText
from loquetier.results import GenerateResult, Usage
from tests.tiny import CORPUS, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def byte_level(tokenizer_dir: Path) -> tuple[Any, TokenText]:
    """The tiny byte-level BPE tokenizer, and the gateway's view of it."""
    return make_tokenizer(), TokenText(tokenizer_dir)


def sentencepiece_style(path: Path) -> Tokenizer:
    """A tokenizer in the manner of Llama 2 and Mistral: "\u2581" for spaces, characters outside the
    vocabulary as ``<0xNN>`` byte tokens, and the text's first space stripped when decoding."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for ch in sorted(set("".join(CORPUS).replace(" ", "\u2581")) | {"\u2581"}):
        vocab.setdefault(ch, len(vocab))
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return tok


def _decode(tokenizer_dir: Path, ids: list[int]) -> str:
    return str(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).decode(ids, skip_special_tokens=True))


def _starts(tokenizer_dir: Path, ids: list[int], text: str) -> list[int]:
    """The reference offsets: token i starts where the text of the longest run of tokens before it
    that decodes to a prefix of ``text`` (no character left unfinished) ends."""
    clean = [len(t) if text.startswith(t := _decode(tokenizer_dir, ids[:k])) else -1 for k in range(len(ids))]
    return [max(clean[: i + 1]) for i in range(len(ids))]


def _result(ids: list[int], text: str, rng: random.Random) -> GenerateResult:
    return GenerateResult(request_id="r", token_ids=ids, text=text, finish_reason="stop",
                          usage=Usage(prompt_tokens=3, completion_tokens=len(ids)),
                          logprobs=[-rng.uniform(0.01, 5.0) for _ in ids])


@pytest.mark.parametrize("text", ["the quick brown fox jumps over the lazy dog",
                                  "café ☕ naïve 日本語 the sea 🏴‍☠️ arr", "é日🙂"])
def test_each_token_starts_where_the_text_before_it_ends(tokenizer_dir: Path, text: str) -> None:
    tokenizer = make_tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    tokens = TokenText(tokenizer_dir)
    spans = tokens.offsets(ids)
    assert spans is not None
    offsets, full = spans
    assert full == text == _decode(tokenizer_dir, ids)
    assert offsets == _starts(tokenizer_dir, ids, text)
    assert offsets[-1] == len(text)  # the EOS adds no text


def test_tokens_past_a_stop_string_leave_the_logprobs(tokenizer_dir: Path, byte_level: tuple[Any, TokenText]) -> None:
    rng = random.Random(7)
    tokenizer, tokens = byte_level
    generated = "a pirate says arr matey and sails the open sea"
    ids = tokenizer.encode(generated, add_special_tokens=False)
    for stop in (" matey", "y and s", "a", "sea", "ls the"):
        text = generated[: generated.index(stop)]  # what the worker answers: the text before the stop string
        result = _result(ids, text, rng)
        kept = [i for i in range(len(ids)) if len(_decode(tokenizer_dir, ids[:i])) < len(text)]
        lp = text_logprobs(result, tokens)
        assert lp is not None
        assert lp["token_logprobs"] == [result.logprobs[i] for i in kept]  # type: ignore[index]
        assert lp["tokens"] == tokens.pieces([ids[i] for i in kept])
        assert all(at < len(text) for at in lp["text_offset"])
        assert "".join(lp["tokens"]).startswith(text)  # the last token kept ends the text or runs into the stop
        chat = chat_logprobs(result, tokens)
        assert chat is not None
        assert [c["logprob"] for c in chat["content"]] == lp["token_logprobs"]


def test_a_text_without_a_stop_string_keeps_every_token(tokenizer_dir: Path, byte_level: tuple[Any, TokenText]) -> None:
    rng = random.Random(8)
    tokenizer, tokens = byte_level
    text = "fine tuning and inference share one step"
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    result = _result(ids, text, rng)
    lp = text_logprobs(result, tokens)
    assert lp is not None and lp["token_logprobs"] == result.logprobs
    assert lp["tokens"][-1] == "</s>" and lp["text_offset"][-1] == len(text)


def test_without_a_tokenizer_nothing_is_cut(tmp_path: Path) -> None:
    rng = random.Random(9)
    tokens = TokenText(tmp_path)  # no tokenizer.json there
    result = _result([11, 12, 13], "ab", rng)
    lp = text_logprobs(result, tokens)
    assert lp is not None
    assert lp["tokens"] == ["token_id:11", "token_id:12", "token_id:13"]
    assert lp["text_offset"] == [0, 11, 22] and lp["token_logprobs"] == result.logprobs


def test_chat_logprobs_give_each_tokens_own_bytes(tokenizer_dir: Path, byte_level: tuple[Any, TokenText]) -> None:
    rng = random.Random(10)
    tokenizer, tokens = byte_level
    text = "naïve 日本語 🙂 sea"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in piece for piece in tokens.pieces(ids))  # some tokens hold part of a character
    chat = chat_logprobs(_result(ids, text, rng), tokens)
    assert chat is not None
    assert b"".join(bytes(c["bytes"]) for c in chat["content"]) == text.encode()
    eos = chat_logprobs(_result([tokenizer.eos_token_id], "", rng), tokens)
    assert eos is not None and eos["content"][0]["bytes"] == list(b"</s>")


@pytest.mark.parametrize("text", ["naïve 日本 the sea", "é the 🙂"])
def test_sentencepiece_byte_tokens_keep_their_offsets_and_bytes(tmp_path: Path, text: str) -> None:
    rng = random.Random(11)
    tok = sentencepiece_style(tmp_path)
    ids = tok.encode(text).ids
    tokens = TokenText(tmp_path)
    assert any(t.startswith("<0x") for t in tok.encode(text).tokens)
    spans = tokens.offsets(ids)
    assert spans is not None and spans[1] == text
    assert spans[0] == _starts(tmp_path, ids, text)
    chat = chat_logprobs(_result(ids, text, rng), tokens)
    assert chat is not None
    assert b"".join(bytes(c["bytes"]) for c in chat["content"]) == (" " + text).encode()  # the first "\u2581" too
