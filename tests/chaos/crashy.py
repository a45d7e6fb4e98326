"""``python -m tests.chaos.crashy worker ...``: the real worker, whose engine process dies
(``os._exit``, like a segfault or an OOM kill) when a request's prompt is the chaos pill.

A stand-in for an input that crashes the process beyond any Python error handling: the
worker cannot catch it, so only the attempts counted in PostgreSQL can end the loop.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def main() -> int:
    from loquetier import cli
    from loquetier.engine.engine import Engine

    pill = json.loads(os.environ["CHAOS_PILL"])
    original = Engine.add_request

    def add_request(self: Any, request_id: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("prompt_token_ids") == pill:
            os._exit(70)
        return original(self, request_id, *args, **kwargs)

    Engine.add_request = add_request  # type: ignore[method-assign]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
