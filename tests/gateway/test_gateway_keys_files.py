"""``loquetier keys`` against real PostgreSQL, and the training-file checks that guard uploads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

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
    made = cli(database_url, "keys", "create", name, "--rpm", "30")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("lq-") and len(key) == 46
    owner = await query(database_url, lambda s: keys_repo.find_key(s, key))
    assert owner is not None and owner.tenant_id == name and owner.max_requests_per_minute == 30
    assert await query(database_url, lambda s: keys_repo.find_key(s, key[:-1] + "x")) is None
    stored = await query(database_url, lambda s: keys_repo.list_keys(s, name))
    assert [r.key_sha256 for r in stored] == [keys_repo.hash_key(key)]  # the hash, never the key
    listed = cli(database_url, "keys", "list", "--tenant", name)
    assert owner.key_id in listed.stdout and key not in listed.stdout
    assert cli(database_url, "keys", "revoke", owner.key_id).returncode == 0
    assert await query(database_url, lambda s: keys_repo.find_key(s, key)) is None
    assert cli(database_url, "keys", "revoke", owner.key_id).returncode == 1
    bad = cli(database_url, "keys", "create", name, "--rpm", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_training_file_lines() -> None:
    good = [{"prompt": "a", "completion": "b"}, {"prompt_token_ids": [1, 2], "completion_token_ids": [3]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]}]
    data = ("\n".join(json.dumps(g) for g in good) + "\n\n").encode()
    assert parse_jsonl(data) == good
    bad = {
        b'{"prompt": "a"}': "line 1",
        b'{"prompt": "a", "completion": "b"}\n{"prompt": 1, "completion": "b"}': "line 2",
        b'{"prompt": "a", "completion": ""}': "non-empty",
        b'{"prompt_token_ids": [1], "completion_token_ids": [-1]}': "token ids",
        b'{"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]}': "assistant",
        b'{"messages": [{"role": "robot", "content": "u"}, {"role": "assistant", "content": "v"}]}': "role",
        b"[1, 2]": "JSON object",
        b"\xff\xfe": "UTF-8",
        b"{nope": "invalid JSON",
        b"\n \n": "no examples",
    }
    for raw, words in bad.items():
        with pytest.raises(TrainingFileError, match=words):
            parse_jsonl(raw)
    assert file_id_of("file:file-0a1b") == "file-0a1b"
    assert file_id_of("file:///tmp/data.jsonl") is None and file_id_of("/tmp/x.jsonl") is None
    assert file_id_of([{"prompt": "a"}]) is None
