"""LoRA tests: the torch reference SMLM backend unless TRITON_INTERPRET=1 asks for the Triton one."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from loquetier.kernels import force_backend


@pytest.fixture(autouse=True)
def _smlm_backend() -> Iterator[None]:
    if os.environ.get("TRITON_INTERPRET") != "1":
        force_backend("reference")
    yield
    force_backend(None)
