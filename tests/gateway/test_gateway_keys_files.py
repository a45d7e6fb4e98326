"""``loquetier keys`` against real PostgreSQL, and the training-file checks that guard uploads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from loquetier.db import keys_repo
from loquetier.training_files import TrainingFileError, file_id_of, parse_jsonl
from tests.workers.test_worker_e2e import query

ROOT = Path(__file__).resolve().parents[2]


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOQUETIER_DATABASE__URL": database_url}
    return subprocess.run([sys.executable, "-m", "loquetier.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120, check=False)


@pytest.mark.postgres
async def test_keys_create_list_revoke(database_url: str) -> None:
    name = f"ci-{uuid.uuid4().hex[:6]}"
    made = cli(database_url, "keys", "create", name, "--rpm", "30", "--tpm", "40000")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("lq-") and len(key) == 46
    owner = await query(database_url, lambda s: keys_repo.find_key(s, key))
    assert owner is not None and owner.tenant_id == name and owner.max_requests_per_minute == 30
    assert owner.max_tokens_per_minute == 40000
    assert await query(database_url, lambda s: keys_repo.find_key(s, key[:-1] + "x")) is None
    stored = await query(database_url, lambda s: keys_repo.list_keys(s, name))
    assert [r.key_sha256 for r in stored] == [keys_repo.hash_key(key)]  # the hash, never the key
    listed = cli(database_url, "keys", "list", "--tenant", name)
    assert owner.key_id in listed.stdout and key not in listed.stdout and "40000" in listed.stdout
    assert cli(database_url, "keys", "revoke", owner.key_id).returncode == 0
    assert await query(database_url, lambda s: keys_repo.find_key(s, key)) is None
    assert cli(database_url, "keys", "revoke", owner.key_id).returncode == 1
    for flag, value in (("--rpm", "0"), ("--tpm", "-5"), ("--tpm", str(2**31))):
        bad = cli(database_url, "keys", "create", name, flag, value)
        assert bad.returncode == 2 and flag in bad.stderr and "Traceback" not in bad.stderr


def test_training_file_lines() -> None:
    good = [{"prompt": "a", "completion": "b"}, {"prompt_token_ids": [1, 2], "completion_token_ids": [3]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]}]
    data = ("\n".join(json.dumps(g) for g in good) + "\n\n").encode()
    assert parse_jsonl(data) == good
    assert parse_jsonl(b"\xef\xbb\xbf" + data) == good  # a byte order mark before line 1
    # separators that str.splitlines also cuts at are text inside a JSON string; CRLF files read the same
    odd = [{"prompt": f"first{c}second", "completion": "ok"} for c in ("\u2028", "\u2029", "\x85", "\x1c")]
    raw = "\r\n".join(json.dumps(o, ensure_ascii=False) for o in odd).encode()
    assert parse_jsonl(raw) == odd
    broken = raw.split(b"\r\n")
    broken[2] = broken[2][:-1]  # the third line loses its closing brace: the count of lines stays right
    with pytest.raises(TrainingFileError, match="line 3: invalid JSON"):
        parse_jsonl(b"\r\n".join(broken))
    bad = {
        b'{"prompt": "a"}': "line 1",
        b'{"prompt": "a", "completion": "b"}\n{"prompt": 1, "completion": "b"}': "line 2",
        b'{"prompt": "a", "completion": ""}': "non-empty",
        b'{"prompt_token_ids": [1], "completion_token_ids": [-1]}': "token ids",
        b'{"prompt_token_ids": [], "completion_token_ids": [4]}': "needs a token before it",
        b'{"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]}': "assistant",
        b'{"messages": [{"role": "robot", "content": "u"}, {"role": "assistant", "content": "v"}]}': "role",
        b"[1, 2]": "JSON object",
        b"\xff\xfe": "UTF-8",
        b"{nope": "invalid JSON",
        b"\n \n": "no examples",
        b'{"prompt_token_ids": [1], "completion_token_ids": [' + b"7" * 5000 + b"]}": "line 1: a number with more",
    }
    for raw, words in bad.items():
        with pytest.raises(TrainingFileError, match=words) as refused:
            parse_jsonl(raw)
        assert "sys." not in str(refused.value)  # no interpreter internals in an answer
    assert file_id_of("file:file-0a1b") == "file-0a1b"
    assert file_id_of("file:///tmp/data.jsonl") is None and file_id_of("/tmp/x.jsonl") is None
    assert file_id_of([{"prompt": "a"}]) is None


@pytest.mark.kafka
@pytest.mark.postgres
async def test_a_tenant_keeps_within_its_quotas(gateway_setup: Any, database_url: str) -> None:
    """Files (count and bytes), unfinished jobs: past a limit the call is a 403 ``quota_exceeded`` that
    says what to free, nothing is stored, and freeing room lets the next call through."""
    import openai

    from tests.gateway.conftest import MODEL, client, new_key, running_gateway

    settings = await gateway_setup(max_files_per_tenant=2, max_file_bytes_per_tenant=4000, max_jobs_per_tenant=1)
    api_key, other_key = [await new_key(database_url, f"q-{uuid.uuid4().hex[:6]}") for _ in range(2)]
    line = json.dumps({"prompt": os.urandom(8).hex(), "completion": " " + os.urandom(4).hex()}) + "\n"
    small = line.encode() * 3
    async with running_gateway(settings) as url:
        api, other = client(url, api_key), client(url, other_key)
        first = await api.files.create(file=("a.jsonl", small), purpose="fine-tune")
        await api.files.create(file=("b.jsonl", small), purpose="fine-tune")
        with pytest.raises(openai.PermissionDeniedError) as over:
            await api.files.create(file=("c.jsonl", small), purpose="fine-tune")
        assert over.value.body["code"] == "quota_exceeded" and "delete" in over.value.body["message"]
        assert len([f async for f in api.files.list()]) == 2
        await other.files.create(file=("c.jsonl", small), purpose="fine-tune")  # another tenant's own quota
        import asyncio

        racing = await asyncio.gather(*[other.files.create(file=(f"r{i}.jsonl", small), purpose="fine-tune")
                                        for i in range(5)], return_exceptions=True)
        assert sum(not isinstance(r, Exception) for r in racing) == 1  # counted one after another: 2 in all
        assert all(isinstance(r, openai.PermissionDeniedError) for r in racing if isinstance(r, Exception))
        await api.files.delete(first.id)
        with pytest.raises(openai.PermissionDeniedError):  # room for a file, not for its bytes
            await api.files.create(file=("big.jsonl", line.encode() * (4000 // len(line))), purpose="fine-tune")
        kept = await api.files.create(file=("c.jsonl", small), purpose="fine-tune")
        params = {"loquetier": {"params": {"max_steps": 10_000}}}
        job = await api.fine_tuning.jobs.create(model=MODEL, training_file=kept.id, extra_body=params)
        with pytest.raises(openai.PermissionDeniedError) as busy:
            await api.fine_tuning.jobs.create(model=MODEL, training_file=kept.id, extra_body=params)
        assert busy.value.body["code"] == "quota_exceeded"
        assert [j.id async for j in api.fine_tuning.jobs.list()] == [job.id]
        await api.fine_tuning.jobs.cancel(job.id)
        again = await api.fine_tuning.jobs.create(model=MODEL, training_file=kept.id, extra_body=params)
        await api.fine_tuning.jobs.cancel(again.id)
        await api.close()
        await other.close()
