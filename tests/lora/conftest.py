"""LoRA tests run on the torch reference SMLM backend; tests/kernels/test_smlm.py covers the Triton kernels
(through the interpreter on CPU), so the job tests need not pay the interpreter's cost."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loquetier.kernels import force_backend


@pytest.fixture(autouse=True)
def _smlm_backend() -> Iterator[None]:
    force_backend("reference")
    yield
    force_backend(None)
