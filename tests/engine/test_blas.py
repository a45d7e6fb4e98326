"""The engine's BLAS choice (``EngineConfig.blas``): checked at construction, applied on CUDA only."""

from __future__ import annotations

import pytest
import torch

from loquetier.engine.config import EngineConfig
from loquetier.engine.engine import apply_blas
from loquetier.engine.errors import EngineError


def test_an_unknown_library_is_refused() -> None:
    with pytest.raises(ValueError, match="blas must be one of"):
        EngineConfig(blas="mkl")
    assert EngineConfig().blas == "cublas"


def test_the_choice_reaches_torch_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[str] = []
    state = {"now": "_BlasBackend.Cublas"}

    def preferred(backend: str | None = None) -> str:
        if backend is not None:
            chosen.append(backend)
            state["now"] = f"_BlasBackend.{backend.capitalize()}"
        return state["now"]

    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", preferred)
    cuda = torch.device("cuda")
    assert apply_blas("cublaslt", torch.device("cpu")) is None and chosen == []
    assert apply_blas("cublaslt", cuda) == "cublaslt" and chosen == ["cublaslt"]
    assert apply_blas("torch", cuda) == "cublaslt" and chosen == ["cublaslt"]  # torch's choice is left alone
    assert apply_blas("cublas", cuda) == "cublas" and chosen[-1] == "cublas"


def test_a_library_torch_lacks_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def preferred(backend: str | None = None) -> str:
        if backend == "cublaslt":
            raise RuntimeError("Cannot set preferred backend to cuBLASLt")
        return "_BlasBackend.Cublas"

    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", preferred)
    with pytest.raises(EngineError, match="blas='cublaslt'"):
        apply_blas("cublaslt", torch.device("cuda"))
