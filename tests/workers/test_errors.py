"""What an error result may say: a user-facing error's own code and message, never SQL or a stack."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.exc import DBAPIError

from loquetier.codec import RecordError
from loquetier.engine.errors import EngineError
from loquetier.workers.errors import INTERNAL, ControlError, public_error

LOG = logging.getLogger("test-errors")


def test_user_facing_errors_keep_their_code_and_message() -> None:
    for exc in (EngineError("unknown_adapter", "adapter 'x' is not loaded"),
                RecordError("too_large", "record key is 2000 bytes, the limit is 1024"),
                ControlError("not_found", "job:j did not produce adapter 'a'")):
        assert public_error(exc, "this record", LOG) == (exc.code, exc.message)


def test_a_database_error_answers_internal_and_goes_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    statement = "INSERT INTO training_jobs (job_id, spec) VALUES ($1::VARCHAR, $2::JSONB)"
    exc = DBAPIError(statement, {"job_id": "j-1"}, ValueError("Infinity is not valid JSON"))
    assert exc.code == "dbapi"  # what the worker once put on the wire, with the statement as message
    with caplog.at_level(logging.ERROR, logger="test-errors"):
        code, message = public_error(exc, "this record", LOG, job_id="j-1")
    assert code == INTERNAL and "INSERT" not in message and "JSON" not in message
    assert "this record" in message
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[1] is exc]
    assert len(logged) == 1 and logged[0].job_id == "j-1"  # type: ignore[attr-defined]
