"""``python -m tests.chaos.crashy worker ...``: the real worker, whose engine dies (``os._exit``,
like a segfault or an OOM kill) when a request's prompt is the chaos pill.

A stand-in for an input that crashes the engine beyond any Python error handling: the worker
cannot catch it, so only the attempts counted in PostgreSQL can end the loop. The patch is made
when this module is imported, so it holds in the worker's engine process too (``spawn`` imports
the main module there as ``__mp_main__``): there the process that dies is the engine's, and the
worker stops as if it had died itself.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

PILL_EXIT_CODE = 70


def _install() -> None:
    raw = os.environ.get("CHAOS_PILL")
    if not raw:
        return
    from loquetier.engine.engine import Engine

    pill = json.loads(raw)
    original = Engine.add_request

    def add_request(self: Any, request_id: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("prompt_token_ids") == pill:
            os._exit(PILL_EXIT_CODE)
        return original(self, request_id, *args, **kwargs)

    Engine.add_request = add_request  # type: ignore[method-assign]


_install()


def main() -> int:
    from loquetier import cli

    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
