"""Token records batched per request (issue 21): the worker's pump joins a request's new tokens of
every step it takes at once into one record, in order, before the request's outcome."""

from __future__ import annotations

from loquetier.engine.events import JobCheckpoint, JobFinished, JobProgress, RequestFailed, TokenEvent
from loquetier.workers.inference import coalesce_tokens
from loquetier.workers.jobs import coalesce_progress


def test_tokens_of_several_steps_become_one_event_per_request() -> None:
    events = [TokenEvent("a", [1], "x"), TokenEvent("b", [7], "p"), TokenEvent("a", [2, 3], "yz"),
              TokenEvent("b", [8], "q")]
    assert coalesce_tokens(events) == [TokenEvent("a", [1, 2, 3], "xyz"), TokenEvent("b", [7, 8], "pq")]


def test_an_outcome_stays_after_its_tokens_and_closes_them() -> None:
    done = RequestFailed("a", "aborted", "gone")
    events = [TokenEvent("a", [1], "x"), TokenEvent("a", [2], "y"), done, TokenEvent("a", [3], "z")]
    out = coalesce_tokens(events)
    assert out == [TokenEvent("a", [1, 2], "xy"), done, TokenEvent("a", [3], "z")]
    assert coalesce_tokens([]) == []


def test_a_jobs_progress_of_several_steps_becomes_its_last_and_stays_before_its_other_events() -> None:
    def progress(job: str, step: int) -> JobProgress:
        return JobProgress(job, step, 10, 0, 1.0 / step, 1e-3, 64 * step, 100.0 + step)

    saved, done = JobCheckpoint("j1", 2, b"ck"), JobFinished("j1", "a1", "succeeded")
    token = TokenEvent("r", [5], "x")
    events = [progress("j1", 1), progress("j1", 2), token, progress("j2", 1), saved, progress("j1", 3),
              progress("j2", 2), progress("j1", 4), done]
    assert coalesce_progress(events) == [progress("j1", 2), token, progress("j2", 2), saved, progress("j1", 4), done]
    assert coalesce_progress([progress("j1", 1)]) == [progress("j1", 1)] and coalesce_progress([]) == []
