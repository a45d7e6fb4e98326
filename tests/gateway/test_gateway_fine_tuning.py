"""Fine-tuning through the API: an uploaded file -> a job -> a served ``fine_tuned_model``; tenants apart."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from typing import Any

import openai
import pytest

from loquetier.db import repo
from loquetier.engine.sequence import SamplingParams
from tests.gateway.conftest import MODEL, client, new_key, running_gateway
from tests.workers.conftest import running_worker
from tests.workers.test_worker_e2e import query

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

WORDS = ["red", "blue", "green", "fox", "dog", "cat", "sun", "moon", "tree", "road"]
OPTIONS = {"lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           "params": {"lr": 5e-3, "max_steps": 6, "micro_batch_tokens": 96, "checkpoint_every": 3, "seed": 3}}


def training_file(rng: random.Random, num: int = 8) -> bytes:
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=3)), "completion": " " + " ".join(rng.choices(WORDS, k=2))}
            for _ in range(num)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


async def wait_job(api: Any, job_id: str, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await api.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.3)
    raise TimeoutError(job_id)


async def test_upload_fine_tune_serve_and_tenant_isolation(
    gateway_setup: Any, database_url: str, make_engine: Any
) -> None:
    rng = random.Random(uuid.uuid4().int)
    settings = await gateway_setup()
    mine, theirs = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    api_key, other_key = await new_key(database_url, mine), await new_key(database_url, theirs)
    data = training_file(rng)
    async with running_worker(make_engine(), settings), running_gateway(settings) as url:
        api, other = client(url, api_key), client(url, other_key)
        uploaded = await api.files.create(file=("train.jsonl", data), purpose="fine-tune")
        assert uploaded.bytes == len(data) and uploaded.purpose == "fine-tune" and uploaded.filename == "train.jsonl"
        assert (await api.files.retrieve(uploaded.id)).id == uploaded.id
        assert (await api.files.content(uploaded.id)).content == data
        # the hyperparameters where the SDK now sends them
        job = await api.fine_tuning.jobs.create(
            model=MODEL, training_file=uploaded.id, suffix="colors", extra_body={"loquetier": OPTIONS},
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}})
        assert job.status == "queued" and job.training_file == uploaded.id and job.fine_tuned_model is None
        assert job.hyperparameters.n_epochs == 2 and job.user_provided_suffix == "colors"
        with pytest.raises(openai.BadRequestError) as in_use:
            await api.files.delete(uploaded.id)
        assert in_use.value.body["code"] == "file_in_use"
        done = await wait_job(api, job.id)
        assert done.status == "succeeded", done.error
        adapter_id = done.fine_tuned_model
        assert adapter_id is not None and adapter_id.startswith("ft-colors-") and done.trained_tokens > 0
        events = await api.fine_tuning.jobs.list_events(job.id)
        messages = [e.message for e in events.data]
        assert messages[0].startswith("The job has succeeded") and messages[-1].startswith("Created")
        ckpts = await api.fine_tuning.jobs.checkpoints.list(job.id)
        final_step = done.model_extra["loquetier"]["step"]
        assert 0 < final_step <= 6 and {3, final_step} <= {c.step_number for c in ckpts.data}
        last_metrics = next(e for e in events.data if e.type == "metrics")
        assert last_metrics.data["step"] == final_step and last_metrics.data["train_loss"] > 0
        assert "Checkpoint saved at step 3" in messages
        listed = await api.fine_tuning.jobs.list(limit=10)
        assert [j.id for j in listed.data] == [job.id]
        assert adapter_id in [m.id for m in (await api.models.list()).data]

        # servable at once, with the trained weights
        prompt = " ".join(rng.choices(WORDS, k=3))
        served = await api.completions.create(model=adapter_id, prompt=prompt, max_tokens=5, temperature=0)
        row = await query(database_url, lambda s: repo.get_adapter(s, adapter_id))
        assert row.tenant_id == mine and row.job_id == job.id
        reference = make_engine()
        reference.load_adapter_bytes(adapter_id, row.data)
        expected = reference.generate([prompt], adapter_ids=[adapter_id],
                                      sampling=SamplingParams(max_tokens=5, temperature=0.0))[0]
        assert served.choices[0].text == expected.text

        # the other tenant sees none of it
        assert adapter_id not in [m.id for m in (await other.models.list()).data]
        assert (await other.fine_tuning.jobs.list()).data == []
        for call in (lambda: other.completions.create(model=adapter_id, prompt=prompt, max_tokens=2),
                     lambda: other.fine_tuning.jobs.retrieve(job.id),
                     lambda: other.fine_tuning.jobs.cancel(job.id),
                     lambda: other.fine_tuning.jobs.list_events(job.id),
                     lambda: other.files.retrieve(uploaded.id),
                     lambda: other.files.delete(uploaded.id),
                     lambda: other.models.retrieve(adapter_id),
                     lambda: other.fine_tuning.jobs.create(model=adapter_id, training_file=uploaded.id)):
            with pytest.raises(openai.NotFoundError):
                await call()

        # an operator's adapter is shared
        shared = f"shared-{uuid.uuid4().hex[:6]}"
        await query(database_url, lambda s: repo.register_adapter(
            s, adapter_id=shared, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"], source_kind="upload",
            data=row.data))
        assert shared in [m.id for m in (await other.models.list()).data]
        other_served = await other.completions.create(model=shared, prompt=prompt, max_tokens=5, temperature=0)
        assert other_served.choices[0].text == expected.text

        # continue training from the fine-tuned model, then cancel
        long = dict(OPTIONS, params={**OPTIONS["params"], "max_steps": 5000})
        follow = await api.fine_tuning.jobs.create(model=adapter_id, training_file=uploaded.id,
                                                   extra_body={"loquetier": long})
        assert follow.model == adapter_id
        with pytest.raises(openai.BadRequestError) as busy:
            await api.models.delete(adapter_id)  # a job starts from it
        assert busy.value.body["code"] == "model_in_use"
        assert (await api.fine_tuning.jobs.pause(follow.id)).status == "paused"
        assert (await query(database_url, lambda s: repo.get_job(s, follow.id))).status == "paused"
        with pytest.raises(openai.BadRequestError):
            await api.fine_tuning.jobs.pause(job.id)  # succeeded: nothing to pause
        assert (await api.fine_tuning.jobs.resume(follow.id)).status == "queued"
        with pytest.raises(openai.BadRequestError):
            await api.fine_tuning.jobs.resume(follow.id)  # not paused
        cancelled = await api.fine_tuning.jobs.cancel(follow.id)
        assert cancelled.status == "cancelled"
        assert (await wait_job(api, follow.id)).status == "cancelled"
        story = [e async for e in api.fine_tuning.jobs.list_events(follow.id, limit=2)]  # pages of two, newest first
        told = [e.message for e in reversed(story)]
        paused_at = next(i for i, m in enumerate(told) if m.startswith("Paused"))
        assert told[0].startswith("Created") and told[-1] == "The job was cancelled"
        assert told.index("Resumed; queued for the next worker") > paused_at
        assert len({e.id for e in story}) == len(story)
        with pytest.raises(openai.BadRequestError) as bad_after:
            await api.fine_tuning.jobs.list_events(follow.id, after="not-an-event")
        assert bad_after.value.body["param"] == "after"
        with pytest.raises(openai.BadRequestError):
            await api.fine_tuning.jobs.cancel(job.id)  # already succeeded
        page = await api.fine_tuning.jobs.list(limit=1)
        assert [j.id for j in page.data] == [follow.id] and page.has_more
        rest = await api.fine_tuning.jobs.list(limit=5, after=follow.id)
        assert [j.id for j in rest.data] == [job.id] and not rest.has_more
        # files page through, newest first unless asked otherwise
        more = [await api.files.create(file=(f"more-{i}.jsonl", data), purpose="fine-tune") for i in range(2)]
        everything = [more[1].id, more[0].id, uploaded.id]
        first = await api.files.list(extra_query={"limit": 2})
        assert [f.id for f in first.data] == everything[:2] and first.has_more
        second = await api.files.list(extra_query={"limit": 2, "after": first.data[-1].id})
        assert [f.id for f in second.data] == everything[2:] and not second.has_more
        assert [f.id async for f in api.files.list(order="asc", extra_query={"limit": 1})] == everything[::-1]
        assert [f.id async for f in other.files.list()] == []

        # deleting a fine-tuned model: the owner's only, never the base or a shared one
        denied = openai.PermissionDeniedError
        for who, model, error, says in ((other, adapter_id, openai.NotFoundError, "does not exist"),
                                        (api, shared, denied, "a shared adapter"),
                                        (api, MODEL, denied, "the base model")):
            with pytest.raises(error) as refused:
                await who.models.delete(model)
            assert says in refused.value.body["message"]
        deleted = await api.models.delete(adapter_id)
        assert deleted.id == adapter_id and deleted.deleted
        assert adapter_id not in [m.id for m in (await api.models.list()).data]
        with pytest.raises(openai.NotFoundError):
            await api.completions.create(model=adapter_id, prompt=prompt, max_tokens=2)
        assert (await api.files.delete(uploaded.id)).deleted
        with pytest.raises(openai.NotFoundError):
            await api.files.retrieve(uploaded.id)
        await api.close()
        await other.close()


async def test_a_job_naming_a_missing_file_fails_with_the_reason(topics: Any, make_engine: Any) -> None:
    from tests.workers.conftest import client_for

    settings = await topics()
    missing = f"file-{uuid.uuid4().hex[:24]}"
    async with running_worker(make_engine(), settings), client_for(settings) as kafka:
        job_id = await kafka.submit_training({"adapter_id": f"a-{missing}", "data": f"file:{missing}"})
        done = [r async for r in kafka.results([job_id])][-1]
    assert done.type == "job_done" and done.status == "failed"
    assert done.error.startswith("invalid_data: ") and missing in done.error


async def test_a_file_deleted_while_a_job_is_created_on_it_refuses_one_of_the_two(
    gateway_setup: Any, database_url: str
) -> None:
    """The delete's check of the file's jobs and the job's check of its file ran in transactions of
    their own: both calls could pass, leaving a queued job on a deleted file that failed later."""
    rng = random.Random(uuid.uuid4().int)
    settings = await gateway_setup()
    key = await new_key(database_url, f"race-{uuid.uuid4().hex[:6]}")
    async with running_gateway(settings) as url:
        api = client(url, key)

        async def race() -> tuple[Any, Any]:
            uploaded = await api.files.create(file=("train.jsonl", training_file(rng)), purpose="fine-tune")
            made, deleted = await asyncio.gather(
                api.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id, extra_body={"loquetier": OPTIONS}),
                api.files.delete(uploaded.id), return_exceptions=True)
            return made, deleted

        outcomes = [await race() for _ in range(6)]
        for made, deleted in outcomes:
            if isinstance(made, BaseException):  # the delete came first: the job names a missing file
                assert isinstance(made, openai.NotFoundError) and made.body["code"] == "file_not_found", made
                assert not isinstance(deleted, BaseException) and deleted.deleted, deleted
            else:  # the job came first: the file is in use
                assert isinstance(deleted, openai.BadRequestError) and deleted.body["code"] == "file_in_use", deleted
                assert made.status == "queued"
                await api.fine_tuning.jobs.cancel(made.id)
        await api.close()
