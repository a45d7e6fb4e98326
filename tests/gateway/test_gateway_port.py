"""`loquetier gateway` on a port another program holds: one clear line, before any server starts."""

from __future__ import annotations

import socket

import pytest

from loquetier.cli_errors import UserError
from loquetier.gateway.cli import _check_port_free


def test_a_taken_port_is_one_clear_error_and_a_free_one_passes() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}") as refused:
            _check_port_free("127.0.0.1", port)
        assert "--port" in str(refused.value.hint)
    _check_port_free("127.0.0.1", port)  # released: free again
