"""RequestBook: per-request engine state beside the scheduler's RequestState (detokenizer, stream
flag, seeded generator, logprobs), and the conversion of scheduler results into events.

The book never drives the scheduler: ``read_tokens`` reports the requests whose stop string just
appeared, the step's postprocessing (``postprocess.request_events``) finishes them in the scheduler
and hands the outcome back to ``events``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from loquetier.engine.detokenizer import IncrementalDetokenizer
from loquetier.engine.errors import EngineError
from loquetier.engine.events import EngineEvent, RequestFinished, Timings, TokenEvent, Usage
from loquetier.engine.sampler import SamplingInputs
from loquetier.engine.scheduling.scheduler import StepEvents
from loquetier.engine.scheduling.slo import RequestMetrics
from loquetier.engine.sequence import RequestState, SamplingParams, ScheduledBatch


@dataclass(frozen=True)
class GenerationOutput:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None

    @classmethod
    def of(cls, event: object) -> GenerationOutput | None:
        if not isinstance(event, RequestFinished):
            return None
        return cls(event.request_id, event.token_ids, event.text, event.finish_reason, event.logprobs)


@dataclass(frozen=True)
class TokenRead:
    """One new token of a step, detokenized: the text it completes and whether a stop string
    appeared with it (the request is then to finish with ``"stop"``)."""

    seq_id: str
    token: int
    delta: str
    hit_stop: bool


@dataclass
class _Request:
    seq: RequestState
    stream: bool
    detok: IncrementalDetokenizer | None
    num_streamed: int = 0  # output tokens already sent in TokenEvents
    logprobs: list[float] = field(default_factory=list)
    first_scheduled: float | None = None


class RequestBook:
    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int], seed: int, device: torch.device) -> None:
        self.tokenizer, self.eos_token_ids, self.device = tokenizer, tuple(eos_token_ids), device
        self._widest: int | None = None  # the vocabulary's widest piece in characters, read once
        self._requests: dict[str, _Request] = {}
        # Seeds for requests without one (the sampler's noise is counter-based, per request).
        self.generator = torch.Generator().manual_seed(seed)

    def has(self, request_id: str) -> bool:
        return request_id in self._requests

    def seq(self, request_id: str) -> RequestState | None:
        r = self._requests.get(request_id)
        return None if r is None else r.seq

    def wants_logprobs(self, request_id: str) -> bool:
        return self._requests[request_id].seq.sampling.logprobs

    def prompt_ids(self, prompt: str | None, prompt_token_ids: Sequence[int] | None, vocab_size: int,
                   max_len: int | None = None) -> list[int]:
        """The prompt's token ids. With ``max_len`` (the context), a prompt that cannot fit is refused
        ``prompt_too_long`` before it is tokenized or its ids are checked (that work is on the engine
        thread, and a million characters took about a second)."""
        if (prompt is None) == (prompt_token_ids is None):
            raise EngineError("invalid_request", "give exactly one of prompt or prompt_token_ids")
        if prompt is not None:
            if self.tokenizer is None:
                raise EngineError("invalid_request", "this model has no tokenizer: send prompt_token_ids")
            if max_len is not None:
                self.check_text_fits(len(prompt), max_len)
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = list(prompt_token_ids or [])
        if max_len is not None and len(ids) >= max_len:
            raise EngineError("prompt_too_long", f"prompt of {len(ids)} tokens leaves no room in the "
                              f"context of {max_len} tokens")
        if not ids:
            raise EngineError("invalid_request", "empty prompt")
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
            raise EngineError("invalid_request", f"prompt token ids must be ints in [0, {vocab_size})")
        return ids

    def check_text_fits(self, num_chars: int, max_len: int) -> None:
        """Refuse ``prompt_too_long`` a text of ``num_chars`` characters that must take more than
        ``max_len`` tokens: no token of this vocabulary covers more characters than its longest piece."""
        widest = self._widest_piece()
        if widest and num_chars > max_len * widest:
            raise EngineError("prompt_too_long", f"a prompt of {num_chars} characters takes more than the context "
                              f"of {max_len} tokens (no token of this model covers more than {widest} characters)")

    def _widest_piece(self) -> int:
        """The most characters one token's piece can stand for (0: unknown, no bound)."""
        if self._widest is None:
            try:
                vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
                self._widest = max((len(piece) for piece in vocab), default=0)
            except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary view: no bound
                self._widest = 0
        return self._widest

    def effective_sampling(self, sampling: SamplingParams, room: int, vocab_size: int | None = None) -> SamplingParams:
        """Cap max_tokens to the context left; every EOS id of the model stops the request; a top_k
        that keeps the whole vocabulary is off (no sort, and no huge int reaches the sampler)."""
        changes: dict[str, Any] = {}
        if sampling.max_tokens > room:
            changes["max_tokens"] = room
        if vocab_size is not None and sampling.top_k >= vocab_size:
            changes["top_k"] = 0
        if not sampling.ignore_eos:
            extra = tuple(t for t in self.eos_token_ids if t not in sampling.stop_token_ids)
            if extra:
                changes["stop_token_ids"] = sampling.stop_token_ids + extra
        return dataclasses.replace(sampling, **changes) if changes else sampling

    def drop(self, request_id: str) -> None:
        """Forget a request that failed in a step (a RequestFailed, no RequestFinished, reports it)."""
        self._requests.pop(request_id, None)

    def add(self, seq: RequestState, stream: bool) -> None:
        sp = seq.sampling
        detok = IncrementalDetokenizer(self.tokenizer, sp.stop) if self.tokenizer is not None else None
        self._requests[seq.seq_id] = _Request(seq, stream, detok)

    def sampling_inputs(self, batch: ScheduledBatch) -> SamplingInputs:
        """Each prompt and decode row's sampling params and sampled-token count, for the runner."""
        rows = {}
        for seq in [c.seq for c in batch.prefill_chunks] + batch.decode_seqs:
            r = self._requests.get(seq.seq_id)
            if r is not None:
                rows[seq.seq_id] = (r.seq.sampling, r.seq.num_output_tokens + r.seq.num_pending)
        return SamplingInputs(rows, self.generator)

    def mark_scheduled(self, batch: ScheduledBatch) -> None:
        for seq in [c.seq for c in batch.prefill_chunks] + batch.decode_seqs:
            r = self._requests.get(seq.seq_id)
            if r is not None and r.first_scheduled is None:
                r.first_scheduled = batch.now

    def read_tokens(self, step: StepEvents, logprobs: dict[str, float]) -> list[TokenRead]:
        """Record the step's new tokens (logprobs, detokenized text) of requests that go on; which of
        them hit a stop string is for the step's postprocessing to settle."""
        reads: list[TokenRead] = []
        finished = {s.seq_id for s in step.finished}
        for seq_id, token in step.new_tokens:
            r = self._requests.get(seq_id)
            if r is None:
                continue
            if seq_id in logprobs and r.seq.sampling.logprobs:
                r.logprobs.append(logprobs[seq_id])
            if seq_id in finished:
                continue  # streamed with the final flush in events()
            delta = r.detok.update(r.seq.output_token_ids) if r.detok is not None else ""
            reads.append(TokenRead(seq_id, token, delta, r.detok is not None and r.detok.stopped))
        return reads

    def events(self, step: StepEvents, reads: Sequence[TokenRead],
               stopped: Mapping[str, RequestMetrics]) -> list[EngineEvent]:
        """Token events of ``reads`` and the results of the requests that finished: the step's
        finished ones, then ``stopped`` (finished by a stop string in postprocessing)."""
        out: list[EngineEvent] = []
        finished = {s.seq_id: (s, m) for s, m in zip(step.finished, step.request_metrics, strict=True)}
        for read in reads:
            r = self._requests.get(read.seq_id)
            if r is None:
                continue
            if r.stream:  # every token id is streamed, with the text it completes (possibly none yet)
                out.append(TokenEvent(read.seq_id, [read.token], read.delta))
                r.num_streamed += 1
            if read.seq_id in stopped:
                finished[read.seq_id] = (r.seq, stopped[read.seq_id])
        for seq, metrics in finished.values():
            r = self._requests.get(seq.seq_id)
            if r is not None and r.stream:
                rest = list(seq.output_token_ids[r.num_streamed :])
                tail = r.detok.finish(seq.output_token_ids) if r.detok is not None else ""
                if rest or tail:
                    out.append(TokenEvent(seq.seq_id, rest, tail))
            out.append(self.finished(seq, metrics))
        return out

    def finished(self, seq: RequestState, metrics: RequestMetrics) -> RequestFinished:
        r = self._requests.pop(seq.seq_id)
        tokens = list(seq.output_token_ids)
        if r.detok is not None:
            r.detok.finish(tokens)
            text = r.detok.text
        else:
            text = ""
        queued = ((r.first_scheduled if r.first_scheduled is not None else (seq.finish_time or 0.0))
                  - seq.arrival_time)
        ttft, tpot = seq.ttft_s, seq.mean_tpot_s
        return RequestFinished(
            request_id=seq.seq_id, token_ids=tokens, text=text, finish_reason=seq.finish_reason or "abort",
            usage=Usage(seq.num_prompt_tokens, len(tokens)),
            timings=Timings(max(0.0, queued) * 1e3, None if ttft is None else ttft * 1e3,
                            None if tpot is None else tpot * 1e3),
            logprobs=list(r.logprobs) if seq.sampling.logprobs else None,
            slo_met=getattr(metrics, "met_slo", None), adapter_id=seq.adapter_id)
