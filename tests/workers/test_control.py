"""Control commands through the broker, each answered by a control_ack: pause/resume/cancel a
job, unload/load an adapter, load paths only under the adapter roots, unknown targets,
adapter ids owned by their maker, and drain only with the operator token."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from loquetier.db import repo
from loquetier.engine.events import JobFinished
from tests.fakes import FakeEngine
from tests.workers.conftest import client_for, running_worker
from tests.workers.test_worker_e2e import query

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

TOKEN = "op-" + os.urandom(8).hex()


async def until(fn: Any, timeout: float = 20) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = await fn()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise TimeoutError


def long_job(adapter_id: str) -> dict[str, Any]:
    """A training record that runs until it is stopped (10^7 steps of the fake engine)."""
    return {"adapter_id": adapter_id, "data": [{"prompt": "a", "completion": "b"}],
            "params": {"max_steps": 10**7, "checkpoint_every": 1000}}


async def job_status(database_url: str, job_id: str) -> str:
    row = await query(database_url, lambda s: repo.get_job(s, job_id))
    return row.status if row else ""


def peft_dir(path: Path, config: bytes = b'{"r": 4}', weights: bytes = b"\x00" * 64) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_bytes(config)
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


async def test_pause_resume_cancel_unload_load_and_drain(topics: Any, database_url: str) -> None:
    settings = await topics(operator_token=TOKEN)
    engine = FakeEngine()
    job = long_job("ctl-a")

    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        job_id = await client.submit_training(job)
        await until(lambda: _true(job_id in worker.jobs.running))
        ack = await client.control("pause", job_id, wait=True)
        assert ack.ok and ack.code is None and ack.action == "pause" and ack.worker_id == worker.worker_id
        assert await job_status(database_url, job_id) == "paused"
        await until(lambda: _true(job_id not in engine.jobs))
        again = await client.control("pause", job_id, wait=True)
        assert not again.ok and again.code == "invalid_state"
        assert (await client.control("resume", job_id, wait=True)).ok
        await until(lambda: _true(job_id in engine.jobs and not engine.jobs[job_id].paused))
        assert (await client.control("cancel", job_id, wait=True)).ok
        done = [r async for r in client.results([job_id]) if r.type == "job_done"][-1]
        assert done.status == "cancelled" and await job_status(database_url, job_id) == "cancelled"
        assert job_id not in engine.jobs
        row = await query(database_url, lambda s: repo.get_job(s, job_id))
        assert row.attempts == 1  # the pause gave its claim back: only the resumed claim counts

        small = await client.submit_training(job | {"params": {"max_steps": 3}})
        assert [r async for r in client.results([small])][-1].status == "succeeded"
        assert (await client.control("unload", "ctl-a", wait=True)).ok
        await until(lambda: _true(not engine.has_adapter("ctl-a")))
        rid = await client.submit_generate(prompt_token_ids=[1], max_tokens=1, adapter_id="ctl-a")
        assert (await client.wait_result(rid, 20)).code == "unknown_adapter"
        reload = await client.control("load", "ctl-a", source=f"job:{small}", wait=True)
        assert not reload.ok and reload.code == "unknown_adapter"  # archived versions are not served again

        for action in ("unload", "cancel", "pause", "resume"):
            ack = await client.control(action, f"no-such-{action}", wait=True)
            assert not ack.ok, action
            assert ack.code == {"unload": "unknown_adapter", "cancel": "unknown_target"}.get(action, "unknown_job")

        refused = await client.control("drain", worker.worker_id, worker_id=worker.worker_id, wait=True)
        assert not refused.ok and refused.code == "forbidden" and not worker._stop.is_set()
        wrong = await client.control("drain", "*", token=TOKEN + "x", wait=True)
        assert not wrong.ok and wrong.code == "forbidden" and not worker._stop.is_set()
        drained = await client.control("drain", worker.worker_id, worker_id=worker.worker_id, token=TOKEN, wait=True)
        assert drained.ok and TOKEN not in drained.message
        await asyncio.wait_for(worker._stop.wait(), 20)


async def test_a_paused_job_keeps_its_progress_and_resumes_from_where_it_stopped(
        topics: Any, database_url: str) -> None:
    """A job that checkpoints only at its end (``checkpoint_every`` past its steps, as the gateway's
    jobs do) is checkpointed as it stands when paused: the ack names the step, the checkpoint row is
    there, the job's row shows that step, and the resumed run starts from it, not from step 0."""
    settings = await topics()
    engine = FakeEngine()
    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        job_id = await client.submit_training(long_job("pause-keeps"))
        await until(lambda: _true(job_id in engine.jobs and engine.jobs[job_id].step >= 3))
        ack = await client.control("pause", job_id, wait=True)
        assert ack.ok and "paused at step" in ack.message, ack.message
        step = int(ack.message.split("paused at step ")[1].split(":")[0])
        assert step >= 3
        latest = await query(database_url, lambda s: repo.latest_checkpoint(s, job_id))
        assert latest is not None and latest.step == step
        row = await query(database_url, lambda s: repo.get_job(s, job_id))
        assert row.step == step  # the row shows the step it resumes from, not the last report's
        assert await job_status(database_url, job_id) == "paused" and job_id not in worker.jobs.running
        assert (await client.control("resume", job_id, wait=True)).ok
        await until(lambda: _true(job_id in engine.jobs))
        assert engine.jobs[job_id].step >= step  # resumed from the checkpoint, not from the start
        assert (await client.control("cancel", job_id, wait=True)).ok


async def test_a_resume_waits_for_the_paused_run_to_end_and_its_late_events_change_nothing(
        topics: Any, database_url: str) -> None:
    """A pause, then a resume while the engine has not yet reported the paused run's end (its
    JobFinished("cancelled") comes with a later step): the new run starts only once that event has
    come, the event does not end the job, and the job runs on in one run until it is cancelled."""
    settings = await topics()
    engine = FakeEngine()
    job = long_job("flip-a")

    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        job_id = await client.submit_training(job)
        await until(lambda: _true(job_id in worker.jobs.running and job_id in engine.jobs))
        for _ in range(3):
            engine.hold_cancelled = True  # the paused run's end is reported late
            assert (await client.control("pause", job_id, wait=True)).ok
            assert (await client.control("resume", job_id, wait=True)).ok
            await asyncio.sleep(1.0)  # the resume's claim had time to start a run
            assert job_id not in engine.jobs, "a new run started before the engine ended the paused one"
            engine.hold_cancelled = False
            await worker.client.stats()  # a command: the engine's loop looks for work again
            await until(lambda: _true(job_id in worker.jobs.running and job_id in engine.jobs))
            await asyncio.sleep(0.5)  # the late event has been handled
            assert await job_status(database_url, job_id) == "running" and job_id in worker.jobs.running
        assert (await client.control("cancel", job_id, wait=True)).ok
        done = [r async for r in client.results([job_id]) if r.type == "job_done"]
        assert [d.status for d in done] == ["cancelled"] and await job_status(database_url, job_id) == "cancelled"
        assert job_id not in engine.jobs and job_id not in worker.jobs.running


async def test_finetunes_of_one_adapter_run_one_after_another(topics: Any, database_url: str) -> None:
    """Finetunes of an adapter wait, queued, while the first trains it; after the first is cancelled
    they run one at a time: the one that runs first makes the adapter, the other (no ``overwrite``)
    is refused as it starts (no wasted training); with ``overwrite`` a job trains the next version."""
    settings = await topics()
    engine = FakeEngine()
    long = long_job("serial-a")

    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        first = await client.submit_training(long)
        await until(lambda: _true(first in engine.jobs))
        second = await client.submit_training(long | {"params": {"max_steps": 3}})
        third = await client.submit_training(long | {"params": {"max_steps": 3}})  # accepted: no version yet
        await asyncio.sleep(1.5)  # polls and claims go by
        assert [await job_status(database_url, second), await job_status(database_url, third)] == ["queued", "queued"]
        assert second not in engine.jobs and third not in engine.jobs
        assert (await client.control("cancel", first, wait=True)).ok
        # the two run one after the other, in the order intake stored them (their records may sit on
        # different partitions): the first to run makes the adapter, the other is refused as it starts
        done = {j: [r async for r in client.results([j]) if r.type == "job_done"][-1] for j in (second, third)}
        made, refused = sorted(done.values(), key=lambda d: d.status != "succeeded")
        assert made.status == "succeeded" and made.adapter_version == 1
        assert refused.status == "failed" and "adapter_exists" in (refused.error or "") and refused.step == 0
        fourth = await client.submit_training(long | {"overwrite": True, "params": {"max_steps": 3}})
        done = [r async for r in client.results([fourth]) if r.type == "job_done"][-1]
        assert done.status == "succeeded" and done.adapter_version == 2
        assert worker.jobs.running == {}


async def test_a_result_that_comes_after_its_job_moved_on_is_dropped(topics: Any, database_url: str) -> None:
    """The engine's success arrives after the job's row was cancelled elsewhere (and before this
    worker's heartbeat noticed): no adapter version is registered or served, the row stays cancelled."""
    settings = await topics()
    engine = FakeEngine()
    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        job_id = await client.submit_training(long_job("late-a"))
        await until(lambda: _true(job_id in worker.jobs.running))
        rj = worker.jobs.running[job_id]
        await query(database_url, lambda s: repo.finish_job(s, job_id, status="cancelled"))
        await worker.jobs._finish(JobFinished(job_id, "late-a", "succeeded", {"loss": 0.5}, b"trained"), rj)
        assert await query(database_url, lambda s: repo.get_adapter(s, "late-a")) is None
        assert not engine.has_adapter("late-a") and job_id not in worker.jobs.running
        assert await job_status(database_url, job_id) == "cancelled"


async def test_an_unload_refused_while_a_job_trains_the_adapter_changes_nothing(topics: Any, database_url: str) -> None:
    """An unload of an adapter that an unfinished job trains is refused (``adapter_busy``, naming the
    job) before anything is archived: the adapter stays registered and served, here and after a
    restart; once the job is cancelled the unload archives it."""
    settings = await topics()
    engine = FakeEngine()
    job = {"adapter_id": "busy-a", "data": [{"prompt": "a", "completion": "b"}], "params": {"max_steps": 3}}

    async def ready() -> dict[str, int]:
        return await query(database_url, lambda s: repo.ready_versions(s, ["busy-a"]))

    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        first = await client.submit_training(job)
        assert [r async for r in client.results([first])][-1].status == "succeeded"
        assert await ready() == {"busy-a": 1}
        again = await client.submit_training(job | {"overwrite": True,
                                                    "params": {"max_steps": 10**7, "checkpoint_every": 1000}})
        await until(lambda: _true(again in worker.jobs.running))
        ack = await client.control("unload", "busy-a", wait=True)
        assert not ack.ok and ack.code == "adapter_busy" and again in ack.message
        assert await ready() == {"busy-a": 1}  # nothing archived
        rid = await client.submit_generate(prompt_token_ids=[1], max_tokens=1, adapter_id="busy-a")
        served = await client.wait_result(rid, 20)
        assert served.type == "result", served
        assert (await client.control("cancel", again, wait=True)).ok
        assert (await client.control("unload", "busy-a", wait=True)).ok
        assert await ready() == {}
        await until(lambda: _true(not engine.has_adapter("busy-a")))


async def test_drain_is_forbidden_without_a_configured_token(topics: Any) -> None:
    settings = await topics()
    async with running_worker(FakeEngine(), settings) as worker, client_for(settings) as client:
        ack = await client.control("drain", "*", token="anything", wait=True)
        assert not ack.ok and ack.code == "forbidden" and "LOQUETIER_WORKER__OPERATOR_TOKEN" in ack.message
        assert not worker._stop.is_set()


async def test_load_paths_only_under_the_adapter_roots(topics: Any, tmp_path: Path) -> None:
    root, outside = tmp_path / "adapters", tmp_path / "elsewhere"
    good = peft_dir(root / "good")
    secret = peft_dir(outside / "secret")
    (root / "link-out").symlink_to(secret, target_is_directory=True)
    peft_dir(root / "sneaky")
    (root / "sneaky" / "adapter_config.json").unlink()
    (root / "sneaky" / "adapter_config.json").symlink_to(secret / "adapter_config.json")
    huge = peft_dir(root / "huge")
    (outside / "big.json").write_bytes(b" " * (2 * 1024 * 1024))
    (huge / "adapter_config.json").unlink()
    (huge / "adapter_config.json").symlink_to(outside / "big.json")
    (root / "inner-big.json").write_bytes(b" " * (2 * 1024 * 1024))
    bloated = peft_dir(root / "bloated")
    (bloated / "adapter_config.json").unlink()
    (bloated / "adapter_config.json").symlink_to(root / "inner-big.json")
    settings = await topics(adapter_dir=root, adapter_roots=[])
    engine = FakeEngine()
    async with running_worker(engine, settings), client_for(settings) as client:
        ok = await client.control("load", "by-path", path=str(good), wait=True)
        assert ok.ok and ok.adapter_version == 1 and engine.has_adapter("by-path")
        relative = await client.control("load", "by-relative-path", path="good", wait=True)
        assert relative.ok and relative.adapter_version == 1
        refusals = {}
        for name, path in {"absolute": str(secret), "traversal": str(root / ".." / "elsewhere" / "secret"),
                           "symlinked dir": str(root / "link-out"), "symlinked file": str(root / "sneaky"),
                           "missing outside": str(outside / "nothing-here"), "etc": "/etc",
                           "relative traversal": "../elsewhere/secret", "huge linked out": str(huge),
                           "nul byte": str(good) + "\x00/x"}.items():
            ack = await client.control("load", f"x-{len(refusals)}", path=path, wait=True)
            refusals[name] = (ack.ok, ack.code, ack.message)
        assert {ok for ok, _, _ in refusals.values()} == {False}
        assert {code for _, code, _ in refusals.values()} == {"forbidden_path"}
        assert len({message for _, _, message in refusals.values()}) == 1  # nothing told about what exists
        too_big = await client.control("load", "bloated", path=str(bloated), wait=True)
        assert not too_big.ok and too_big.code == "too_large"
    assert sorted(engine.adapters) == ["by-path", "by-relative-path"]


async def test_a_command_delivered_again_is_answered_again_not_applied_again(topics: Any, database_url: str,
                                                                           tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A command with its own command_id, sent again (as a redelivery after a worker stopped before
    committing its offset), gets the first ack back and changes nothing: one adapter version for one
    load, ok for an unload already done. Another command under a used id is refused, applied not."""
    from sqlalchemy import func, select

    from loquetier.db.models import AdapterRow

    root = tmp_path / "adapters"
    peft_dir(root / "good")
    settings = await topics(adapter_dir=root, adapter_roots=[])
    engine = FakeEngine()
    adapter, cid = f"once-{os.urandom(3).hex()}", f"cmd-{os.urandom(4).hex()}"
    async def control(action: str, command_id: str, **fields: Any) -> Any:  # a client per send: it reads
        async with client_for(settings) as client:  # only the acks that come after it started
            return await client.control(action, adapter, command_id=command_id, wait=True, **fields)

    async with running_worker(engine, settings):
        first = await control("load", cid, path="good")
        again = await control("load", cid, path="good")
        assert first.ok and again.ok and again.adapter_version == first.adapter_version == 1
        assert again.message == first.message and again.worker_id == first.worker_id
        other = await control("load", cid + "-2", path="good")
        assert other.ok and other.adapter_version == 2  # another command: another version
        clash = await control("unload", cid)
        assert not clash.ok and clash.code == "duplicate_command_id" and engine.has_adapter(adapter)
        unloaded = await control("unload", cid + "-u")
        assert unloaded.ok and not engine.has_adapter(adapter)
        # applied a second time, this unload would find nothing to unload (unknown_adapter)
        replayed = await control("unload", cid + "-u")
        assert replayed.ok and replayed.message == unloaded.message

        async def unreadable(*args: Any) -> None:
            raise RuntimeError("relation control_acks does not exist")  # not a retried connection error

        monkeypatch.setattr(repo, "kept_command_ack", unreadable)  # kept acks unreadable: applied, acked
        assert (await control("load", cid + "-3", path="good")).adapter_version == 3
    count = select(func.count()).select_from(AdapterRow).where(AdapterRow.adapter_id == adapter)
    assert await query(database_url, lambda s: s.scalar(count)) == 3


async def test_a_served_adapter_id_is_not_trained_over_without_overwrite(topics: Any, database_url: str,
                                                                          tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    peft_dir(root / "pirate")
    settings = await topics(adapter_dir=root)
    engine = FakeEngine()
    job = {"adapter_id": "pirate", "data": [{"prompt": "a", "completion": "b"}], "params": {"max_steps": 2}}
    async with running_worker(engine, settings), client_for(settings) as client:
        assert (await client.control("load", "pirate", path=str(root / "pirate"), wait=True)).ok
        refused = await client.submit_training(job)
        error = await client.wait_result(refused, 20)
        assert error.type == "error" and error.code == "adapter_exists"
        assert await query(database_url, lambda s: repo.get_job(s, refused)) is None
        replaced = await client.submit_training(job | {"overwrite": True})
        done = [r async for r in client.results([replaced])][-1]
        assert done.type == "job_done" and done.status == "succeeded" and done.adapter_version == 2
        again = await client.submit_training(job | {"params": {"max_steps": 3}})  # a third job: the id is owned again
        assert (await client.wait_result(again, 20)).code == "adapter_exists"


async def _true(value: bool) -> bool:
    return value


async def test_a_known_job_id_with_other_content_is_refused_and_the_job_runs_on(topics: Any,
                                                                              database_url: str) -> None:
    """A training record reusing a job_id: the same job again (a redelivery, a client's retry, another
    priority) changes nothing and says nothing; other content (data, adapter, parameters) is answered
    ``duplicate_job_id`` and the known job runs on as it was sent."""
    import uuid

    from loquetier.messages import TrainingJobRecord

    settings = await topics()
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    first = {"job_id": job_id, "adapter_id": f"dup-{job_id[-8:]}", "data": [{"prompt": "a", "completion": "b"}],
             "params": {"max_steps": 3}}
    async with running_worker(FakeEngine(), settings), client_for(settings) as client:
        await client.submit_training(first)
        stored = await query(database_url, lambda s: repo.get_job(s, job_id))
        for _ in range(100):  # the row is written when the worker has taken the record
            if stored is not None:
                break
            await asyncio.sleep(0.1)
            stored = await query(database_url, lambda s: repo.get_job(s, job_id))
        assert stored is not None
        others = ({"data": [{"prompt": "x", "completion": "y"}]}, {"adapter_id": "somebody-else"},
                  {"params": {"max_steps": 7}})
        for other in others:
            await client.submit_training(first | other)
        await client.submit_training(TrainingJobRecord.model_validate(first | {"priority": 5}, strict=False))
        await client.submit_training(first)
        # one more of other content: the worker takes a key's records in order, so when its error has
        # come the two copies before it have been taken, and they must have said nothing
        await client.submit_training(first | {"params": {"max_steps": 9}})
        results: list[Any] = []

        async def read() -> None:  # an error is final for results(): follow until the job's end and 4 errors
            async for r in client.results([job_id], follow=True):
                results.append(r)
                if any(x.type == "job_done" for x in results) and sum(x.type == "error" for x in results) >= 4:
                    return

        await asyncio.wait_for(read(), 60)
    errors = [r for r in results if r.type == "error"]
    assert [e.code for e in errors] == ["duplicate_job_id"] * 4
    assert [r.status for r in results if r.type == "job_done"] == ["succeeded"]
    row = await query(database_url, lambda s: repo.get_job(s, job_id))
    assert row.adapter_id == first["adapter_id"] and row.spec["params"]["max_steps"] == 3
    assert row.spec["data"] == first["data"]


def test_a_job_as_the_gateway_stores_and_publishes_it_is_the_same_job() -> None:
    """The gateway writes the job's row, then publishes the record: the worker's copy, read back from
    the wire, is the stored job again (no duplicate_job_id for the gateway's own jobs), with random
    floats, a path as data and every optional part set."""
    import random

    from loquetier.codec import encode
    from loquetier.messages import TrainingJobRecord, decode_record
    from loquetier.workers import convert
    from loquetier.workers.intake import same_job

    rng = random.Random()
    fields = {"job_id": f"ftjob-{rng.getrandbits(64):x}", "adapter_id": "ft-x", "base_adapter": None,
              "data": "file-abc.jsonl", "eval_data": "file-def.jsonl",
              "params": {"lr": rng.uniform(1e-6, 1e-2), "epochs": rng.randint(1, 9), "seed": rng.getrandbits(40)},
              "priority": rng.randint(-5, 5), "lora": {"rank": 8, "alpha": rng.uniform(1, 64)}}
    job = TrainingJobRecord.model_validate(fields, strict=False)
    stored = job.model_dump(mode="json", by_alias=True)
    assert same_job(stored, convert.job_spec(decode_record("training", encode(job))))
    other = job.model_copy(update={"adapter_id": "ft-y"})
    assert not same_job(stored, convert.job_spec(decode_record("training", encode(other))))


async def test_a_slow_command_holds_up_only_the_commands_to_its_target(topics: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """While a load hangs (a multi-GiB adapter being read), requests still stream and finish and
    commands to other targets are applied; the commands to its adapter read meanwhile wait their turn
    in order, the control topic is paused once 64 wait, and every one is applied and acknowledged
    after the load."""
    from loquetier.workers.control import Control

    entered, gate = asyncio.Event(), asyncio.Event()
    applied: list[tuple[str, bool]] = []
    original_load, original_apply = Control._load, Control.apply

    async def slow_load(self: Control, cmd: Any) -> Any:
        entered.set()
        await asyncio.wait_for(gate.wait(), 60)
        return await original_load(self, cmd)

    async def apply(self: Control, cmd: Any, command_id: str) -> Any:
        applied.append((command_id, gate.is_set()))
        return await original_apply(self, cmd, command_id)

    monkeypatch.setattr(Control, "_load", slow_load)
    monkeypatch.setattr(Control, "apply", apply)
    settings = await topics()
    control_topic = settings.kafka.control_topic
    async with running_worker(FakeEngine(), settings) as worker, client_for(settings) as client:
        load = await client.control("load", "slow-adapter", source="db")
        await asyncio.wait_for(entered.wait(), 30)
        rid = await client.submit_generate(prompt_token_ids=[5, 6, 7], max_tokens=4, stream=True)
        result = await client.wait_result(rid, timeout=20)
        assert result.type == "result" and result.token_ids == [6, 7, 8, 6]
        for i in range(5):  # other targets: answered while the load hangs
            ack = await client.control("resume", f"other-{i}", wait=True)
            assert not ack.ok and ack.code == "unknown_job" and not gate.is_set()
        later = [await client.control("unload", "slow-adapter") for _ in range(150)]
        await until(lambda: _true(worker.consumer._paused[control_topic]))
        assert 64 <= worker.intake.num_waiting["control"] < 150 and not gate.is_set()
        again = await client.submit_generate(prompt_token_ids=[9, 10], max_tokens=2)
        assert (await client.wait_result(again, timeout=20)).type == "result"
        assert [c for c, _ in applied][:1] == [load] and len(applied) == 6  # the load and the 5 others
        acks = client.results([load, *later])
        gate.set()
        got = {}
        async for ack in acks:
            got[ack.command_id] = ack
            if len(got) == 1 + len(later):
                break
        await until(lambda: _true(not worker.consumer._paused[control_topic]
                                  and not worker.intake.num_waiting["control"]))
    assert got[load].code == "unknown_adapter"  # no such adapter in the database: the load ran to its end
    assert {got[c].code for c in later} == {"unknown_adapter"}
    same = [(c, after) for c, after in applied if c in set(later)]
    assert [c for c, _ in same] == later and all(after for _, after in same)  # in order, after the load


def _fake_intake(apply: Any, done: list[int], is_current: Any = None) -> Any:
    """An Intake whose commands go to ``apply`` (no broker, no database), each record's offset into
    ``done`` once handled."""
    from types import SimpleNamespace

    from loquetier.codec import Limits
    from loquetier.workers.intake import Intake

    async def publish(*_: Any, **__: Any) -> bool:
        return True

    publisher = SimpleNamespace(publish=publish, reply_prefix="loquetier.reply.")
    return Intake(SimpleNamespace(), publisher, SimpleNamespace(), SimpleNamespace(),  # type: ignore[arg-type]
                  SimpleNamespace(apply=apply), limits=Limits(), done=lambda part, offset, epoch: done.append(offset),
                  **({"is_current": is_current} if is_current else {}))


def _command_record(offset: int, cmd: Any) -> Any:
    from types import SimpleNamespace

    from loquetier.messages import encode_record

    return SimpleNamespace(topic="ctl", partition=0, offset=offset, key=b"k", value=encode_record(cmd),
                           timestamp=0, headers=())


async def test_commands_to_different_targets_are_applied_side_by_side() -> None:
    """Cancels of many requests (a client that calls and leaves, over and over) do not wait for one
    another: each target's commands keep their order, different targets run together."""
    from loquetier.messages import ControlAck, ControlCommand

    started: list[str] = []
    gate = asyncio.Event()

    async def apply(cmd: Any, command_id: str) -> Any:
        started.append(command_id)
        await gate.wait()
        return ControlAck(command_id=command_id, action=cmd.action, target_id=cmd.target_id, ok=True, message="ok")

    done: list[int] = []
    intake = _fake_intake(apply, done)
    targets = [f"req-{i}" for i in range(10)] + ["req-0", "req-1"]  # two targets twice
    for offset, target in enumerate(targets):
        cmd = ControlCommand(action="cancel", target_id=target, command_id=f"c{offset}")
        await intake.handle("control", _command_record(offset, cmd), 0)
    await until(lambda: _true(len(started) == 10))
    await asyncio.sleep(0.1)
    assert sorted(started) == sorted(f"c{i}" for i in range(10))  # c10, c11 wait for c0, c1
    gate.set()
    await intake.finish_lanes()
    assert started[10:] == ["c10", "c11"] and sorted(done) == list(range(12))


async def test_a_slow_training_record_holds_up_neither_requests_nor_commands(
        topics: Any, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training records have a lane of their own too: while one's insert hangs (MiBs of inline examples
    being checked and stored), requests are served and commands applied; then the job is accepted."""
    from loquetier.workers.intake import Intake

    entered, gate = asyncio.Event(), asyncio.Event()
    original = Intake._insert_job

    async def slow_insert(self: Intake, job: Any) -> None:
        entered.set()
        await asyncio.wait_for(gate.wait(), 60)
        await original(self, job)

    monkeypatch.setattr(Intake, "_insert_job", slow_insert)
    settings = await topics()
    job = {"adapter_id": "lane-a", "data": [{"prompt": "a", "completion": "b"}], "params": {"max_steps": 2}}
    async with running_worker(FakeEngine(), settings) as worker, client_for(settings) as client:
        job_id = await client.submit_training(job)
        await asyncio.wait_for(entered.wait(), 30)
        rid = await client.submit_generate(prompt_token_ids=[5, 6, 7], max_tokens=4)
        assert (await client.wait_result(rid, timeout=20)).type == "result"
        ack = await client.control("resume", "no-such-job", wait=True)
        assert ack.code == "unknown_job"
        assert worker.intake.num_waiting["training"] == 1 and not gate.is_set()
        gate.set()
        done = [r async for r in client.results([job_id])][-1]
    assert done.type == "job_done" and done.status == "succeeded"
    assert (await query(database_url, lambda s: repo.get_job(s, job_id))).status == "succeeded"


async def test_a_record_whose_partition_moved_before_its_turn_is_left_alone() -> None:
    """A command read before a rebalance and not applied by the time its partition went to another
    worker is not applied here (the new owner reads it again): no second application."""
    from loquetier.messages import ControlAck, ControlCommand

    applied: list[str] = []
    owned = {"yes": True}
    done: list[int] = []
    gate = asyncio.Event()

    async def apply(cmd: Any, command_id: str) -> Any:
        applied.append(command_id)
        await gate.wait()
        return ControlAck(command_id=command_id, action=cmd.action, target_id=cmd.target_id, ok=True, message="ok")

    intake = _fake_intake(apply, done, is_current=lambda part, epoch: owned["yes"])

    def record(offset: int) -> Any:
        cmd = ControlCommand(action="resume", target_id="job-1", command_id=f"c{offset}")  # one lane, in order
        return _command_record(offset, cmd)

    for offset in range(3):
        await intake.handle("control", record(offset), 0)
    while not applied:
        await asyncio.sleep(0.01)
    owned["yes"] = False  # revoked while the first command runs
    gate.set()
    await intake.finish_lanes()
    assert applied == ["c0"] and done == [0] and intake.num_waiting["control"] == 0


async def test_a_cancel_that_comes_before_its_request_drops_it_unrun(topics: Any, database_url: str) -> None:
    """A client that gives up before the worker reads its request (a backlog, a paused partition):
    the cancel is remembered, and the request is answered ``cancelled`` without reaching the engine."""
    settings = await topics()
    engine = FakeEngine()
    async with running_worker(engine, settings), client_for(settings) as client:
        rid = f"early-{os.urandom(4).hex()}"
        ack = await client.control("cancel", rid, wait=True)
        assert not ack.ok and ack.code == "unknown_target" and "cancelled then" in ack.message
        await client.submit_generate(prompt_token_ids=[5, 6, 7], max_tokens=50, request_id=rid)
        result = await client.wait_result(rid, 20)
        assert result.type == "result" and result.finish_reason == "cancelled" and result.token_ids == []
        assert result.usage.prompt_tokens == 3 and result.usage.completion_tokens == 0
        assert rid not in engine.submitted_ids
        row = await query(database_url, lambda s: repo.get_request(s, rid))
        assert row is not None and row.status == "cancelled"
        other = await client.submit_generate(prompt_token_ids=[5, 6, 7], max_tokens=4)  # others still run
        assert (await client.wait_result(other, 20)).finish_reason == "length"


async def test_a_chat_cancelled_before_it_is_read_reports_its_rendered_prompt(
        topics: Any, database_url: str, make_engine: Any) -> None:
    """A chat request answered ``cancelled`` unrun still reports its prompt's size: the chat as the
    model's template renders it, as a run would have counted it."""
    from loquetier.chat import chat_prompt_ids

    settings = await topics()
    engine = make_engine()
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers."}]
    expected = len(chat_prompt_ids(engine.tokenizer, turns))
    async with running_worker(engine, settings), client_for(settings) as client:
        rid = f"early-chat-{os.urandom(4).hex()}"
        ack = await client.control("cancel", rid, wait=True)
        assert not ack.ok and ack.code == "unknown_target" and "10 minutes" in ack.message
        await client.submit_generate(messages=turns, max_tokens=50, request_id=rid)
        result = await client.wait_result(rid, 30)
        assert result.type == "result" and result.finish_reason == "cancelled" and result.token_ids == []
        assert expected > 4 and result.usage.prompt_tokens == expected
        row = await query(database_url, lambda s: repo.get_request(s, rid))
        assert row is not None and row.status == "cancelled" and row.prompt_tokens == expected


async def test_a_cancel_during_the_hand_over_to_the_engine_stops_the_request(
        topics: Any, database_url: str, make_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cancel comes after the worker took the request and before the engine holds it: the
    request is stopped as it reaches the engine, not computed to its end."""
    from loquetier.workers.inference import Inference

    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow_chat_ids(self: Inference, req: Any) -> list[int]:
        entered.set()
        await gate.wait()
        return [5, 6, 7, 8]

    monkeypatch.setattr(Inference, "_chat_ids", slow_chat_ids)
    settings = await topics()
    async with running_worker(make_engine(), settings), client_for(settings) as client:
        rid = await client.submit_generate(messages=[{"role": "user", "content": "hi"}], max_tokens=200,
                                           temperature=0.0)
        await asyncio.wait_for(entered.wait(), 20)
        ack = await client.control("cancel", rid, wait=True)
        assert ack.ok and "as it reaches the engine" in ack.message
        gate.set()
        result = await client.wait_result(rid, 30)
        assert result.type == "result" and result.finish_reason == "cancelled"
        assert result.usage.completion_tokens < 200
        row = await query(database_url, lambda s: repo.get_request(s, rid))
        assert row is not None and row.status == "cancelled"
