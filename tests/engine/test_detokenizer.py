"""Incremental detokenization against decoding the whole output, for a byte-level BPE tokenizer and a
SentencePiece-style one (metaspace, byte fallback), on text with multi-byte characters split across
tokens and on random token streams; stop strings as a whole-text search would find them."""

from __future__ import annotations

import json
import random

import pytest
from tiny import make_tokenizer
from transformers import PreTrainedTokenizerFast

from loquetier.engine.detokenizer import IncrementalDetokenizer

TEXTS = ["the quick brown fox jumps", "héllo wörld, naïve café", "中文 tokens 🙂 and emoji 🚀!",
         "  two  spaces\nand a newline", "Paris is the capital of France."]


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: "▁" for spaces, BPE pieces, <0xNN> byte fallback, decoder that fuses
    bytes and strips the leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    # a small alphabet: accented letters, CJK and emoji fall back to <0xNN> byte tokens
    trainer = trainers.BpeTrainer(vocab_size=120, limit_alphabet=30, special_tokens=specials, show_progress=False)
    base.train_from_iterator(TEXTS * 3, trainer)
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = base.pre_tokenizer
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte-level": make_tokenizer, "metaspace": metaspace_tokenizer}


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[str, bool]:  # noqa: ANN001
    d = IncrementalDetokenizer(tokenizer, stop)
    out = "".join(d.update(ids[: i + 1]) for i in range(len(ids)))
    return out + d.finish(ids), d.stopped


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request: pytest.FixtureRequest):  # noqa: ANN201
    return TOKENIZERS[request.param]()


def test_text_streams_to_what_decoding_the_whole_output_gives(tokenizer) -> None:  # noqa: ANN001
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) > 3
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert stream(tokenizer, ids) == (whole, False), text
        if "🙂" in text:  # an emoji goes out only once its last byte is in
            d = IncrementalDetokenizer(tokenizer)
            seen = [d.update(ids[: i + 1]) for i in range(len(ids))]
            assert all("\ufffd" not in s for s in seen)


def test_random_token_streams_match_whole_decoding(tokenizer) -> None:  # noqa: ANN001
    # Byte-fallback tokens are left out: decoding the whole output turns a valid byte token next to
    # an invalid byte sequence into a replacement char too, which no stream can know in advance.
    rng = random.Random(7)
    pieces = [i for t, i in tokenizer.get_vocab().items() if not (t.startswith("<0x") and len(t) == 6)]
    for _ in range(60):
        ids = [rng.choice(pieces) for _ in range(rng.randrange(1, 40))]
        assert stream(tokenizer, ids)[0] == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_stop_strings_cut_where_the_whole_text_first_has_one(tokenizer) -> None:  # noqa: ANN001
    text = "Paris is the capital of France. the quick brown fox"
    ids = tokenizer.encode(text, add_special_tokens=False)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    for stop in (("capital",), ("quick", "France."), ("zzz",), ("fox",), ("s i",)):
        cut = min((whole.find(s) for s in stop if s in whole), default=-1)
        expected = (whole[:cut], True) if cut != -1 else (whole, False)
        assert stream(tokenizer, ids, stop) == expected, stop
    # while a stop string may still complete, its length minus one of the tail is held back
    d = IncrementalDetokenizer(tokenizer, ("capital of Spain",))
    for i in range(len(ids)):
        d.update(ids[: i + 1])
        so_far = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        assert len(d.text) <= max(0, len(so_far) - len("capital of Spain") + 1)
    assert d.text + d.finish(ids) == whole


def test_cost_per_token_does_not_grow_with_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = make_tokenizer()
    calls: list[int] = []
    decode = IncrementalDetokenizer._decode

    def counting(self, ids):  # noqa: ANN001, ANN202
        calls.append(len(ids))
        return decode(self, ids)

    monkeypatch.setattr(IncrementalDetokenizer, "_decode", counting)
    ids = tokenizer.encode(" ".join(TEXTS * 8), add_special_tokens=False)
    assert len(ids) > 300
    assert stream(tokenizer, ids)[0] == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(calls) <= 8  # windows, never the whole output
    calls.clear()  # a long run of skipped special tokens (no visible text) inside the output
    eos = tokenizer.eos_token_id
    cut = next(n for n in range(50, 100) if not tokenizer.decode(ids[:n]).endswith("\ufffd"))  # between chars
    ids = ids[:cut] + [eos] * 200 + ids[cut:100]
    assert stream(tokenizer, ids)[0] == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(calls) <= 32  # a window: at most 16 tokens read last time as context, 16 waiting


def test_a_tokenizer_that_cleans_up_spaces_decodes_through_its_wrapper() -> None:
    tokenizer = make_tokenizer()
    assert IncrementalDetokenizer(tokenizer)._backend is not None
    tokenizer.clean_up_tokenization_spaces = True
    d = IncrementalDetokenizer(tokenizer)
    assert d._backend is None
    ids = tokenizer.encode(TEXTS[-1], add_special_tokens=False)
    assert stream(tokenizer, ids)[0] == tokenizer.decode(ids, skip_special_tokens=True)
