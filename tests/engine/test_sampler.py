"""Sampler: greedy, seeded reproducibility independent of batch composition, top-k/top-p support,
temperature distribution, logprobs, stop helpers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loquetier.engine.sampler import SamplingTensors, find_stop_string, is_stop_token, sample

V = 50


@dataclass(frozen=True)
class P:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


def _logits(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax_and_logprobs_match_log_softmax() -> None:
    logits = _logits(6)
    st = SamplingTensors.build([P(temperature=0.0)] * 6, [0] * 6)
    out = sample(logits, st, want_logprobs=True)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    ref = torch.log_softmax(logits, -1).gather(1, out.token_ids[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs, ref)
    mixed = SamplingTensors.build([P(0.0), P(1.0, seed=3), P(0.0)], [0, 0, 0])
    out = sample(logits[:3], mixed, want_logprobs=True)
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()
    torch.testing.assert_close(
        out.logprobs, torch.log_softmax(logits[:3], -1).gather(1, out.token_ids[:, None])[:, 0]
    )


def test_temperatures_too_small_to_divide_by_are_greedy() -> None:
    """Logits divided by 1e-39 overflow fp32 (every row all infs, whose argmax is id 0): temperatures
    below 1e-5 are greedy, seeded or not, and 1e-5 itself still samples, here also the argmax."""
    logits = _logits(8, seed=7) + 30.0  # positive logits: a tiny temperature makes them +inf
    want = logits.argmax(-1)
    assert not torch.equal(want, torch.zeros_like(want))
    for temp in (1e-45, 1e-39, 1e-30, 9.99e-6):
        for seed in (None, 11):
            st = SamplingTensors.build([P(temperature=temp, seed=seed)] * 8, [3] * 8)
            assert st.all_greedy, temp
            assert torch.equal(sample(logits, st).token_ids, want), (temp, seed)
    st = SamplingTensors.build([P(temperature=1e-5, seed=5)] * 8, [0] * 8)
    assert not st.all_greedy
    assert torch.equal(sample(logits, st).token_ids, want)


def test_seeded_rows_reproducible_regardless_of_batch() -> None:
    row = _logits(1, seed=1)
    mine = P(temperature=0.9, top_p=0.95, seed=1234)
    alone = [int(sample(row, SamplingTensors.build([mine], [s])).token_ids[0]) for s in range(20)]
    others = _logits(5, seed=2)
    gen = torch.Generator().manual_seed(0)
    for pos in range(3):
        batch = torch.cat([others[:pos], row, others[pos:]])
        params = [P(temperature=1.3, top_k=5)] * pos + [mine] + [P()] * (5 - pos)
        toks = [
            int(
                sample(
                    batch, SamplingTensors.build(params, [s + 7] * pos + [s] + [0] * (5 - pos), generator=gen)
                ).token_ids[pos]
            )
            for s in range(20)
        ]
        assert toks == alone
    assert len(set(alone)) > 1  # steps advance the stream
    other_seed = [
        int(sample(row, SamplingTensors.build([P(0.9, 0, 0.95, 99)], [s])).token_ids[0]) for s in range(20)
    ]
    assert other_seed != alone


def _draws(logits: torch.Tensor, p: P, n: int = 4000) -> torch.Tensor:
    st = SamplingTensors.build([p] * n, list(range(n)))
    return sample(logits.expand(n, -1), st).token_ids


def test_top_k_and_top_p_restrict_support() -> None:
    logits = _logits(1, seed=4)[0]
    order = logits.argsort(descending=True)
    toks = _draws(logits, P(temperature=2.0, top_k=3, seed=5))
    assert set(toks.tolist()) == set(order[:3].tolist())
    probs = torch.softmax(logits, -1)[order]
    nucleus = int((probs.cumsum(0) - probs < 0.8).sum())
    toks = _draws(logits, P(temperature=1.0, top_p=0.8, seed=6))
    assert set(toks.tolist()) == set(order[:nucleus].tolist())
    toks = _draws(logits, P(temperature=1.0, top_k=2, top_p=0.01, seed=7))
    assert set(toks.tolist()) == {int(order[0])}


def test_temperature_sampling_matches_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4)])
    for temp in (0.5, 1.0, 2.0):
        toks = _draws(logits, P(temperature=temp, seed=8), n=20000)
        freq = torch.bincount(toks, minlength=V).float() / toks.numel()
        expected = torch.softmax(logits[0] / temp, -1)
        assert (freq - expected).abs().max() < 0.015, (temp, freq[:4], expected[:4])


def test_unseeded_rows_use_the_engine_generator() -> None:
    logits = _logits(1, seed=9).expand(2, -1)
    a = SamplingTensors.build([P(), P()], [0, 0], generator=torch.Generator().manual_seed(1))
    b = SamplingTensors.build([P(), P()], [0, 0], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.seed, b.seed) and a.seed[0] != a.seed[1]
    assert torch.equal(sample(logits, a).token_ids, sample(logits, b).token_ids)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    SamplingTensors.build([P(temperature=0.0)] * 3, [0, 4, 9], generator=g)
    assert torch.equal(g.get_state(), state)  # greedy rows draw no seed


def test_stop_helpers() -> None:
    assert (
        is_stop_token(7, [7]) and is_stop_token(2, [], [2]) and not is_stop_token(2, [], [2], ignore_eos=True)
    )
    assert find_stop_string("hello wor", ["world"], 3) is None
    assert find_stop_string("hello world!", ["world", "lo w"], 3) == 6
    assert find_stop_string("hello world!", ["lo w", "xyz"], 12) == 3
