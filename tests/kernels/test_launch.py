"""The cached launch path (kernels/launch.py) with a stand-in for a Triton kernel: the first launch of a
specialization goes through ``kernel[grid]``, later ones call the compiled kernel it returned, with
every parameter in signature order; a changed specialization goes through Triton again."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from loquetier.kernels import launch as launch_mod


class _Compiled:
    def __init__(self, log: list[Any], tag: int) -> None:
        self.log, self.tag = log, tag

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        return lambda *args: self.log.append(("compiled", self.tag, grid, args))


class _Kernel:
    """kernel[grid](*args, **meta) as Triton's JITFunction: launches, returns its compiled kernel."""

    def __init__(self) -> None:
        self.log: list[Any] = []
        self.builds = 0

        def fn(x_ptr, n, scale, BLOCK, UPCAST=False):  # noqa: N803, ANN001, ANN202
            return None

        self.fn = fn

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def run(*args: Any, **meta: Any) -> _Compiled:
            self.builds += 1
            self.log.append(("triton", grid, args, meta))
            return _Compiled(self.log, self.builds)

        return run


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_mod, "_FAST", True)
    launch_mod.clear()


def test_cached_launch_calls_the_compiled_kernel_with_every_parameter(fast: None) -> None:
    k, x = _Kernel(), torch.randn(64)
    launch_mod.launch(k, (4,), x, 37, 0.5, BLOCK=32, num_warps=4)
    launch_mod.launch(k, (5, 2), x, 53, 0.25, BLOCK=32, num_warps=4)  # same key: 37 and 53 alike
    assert k.builds == 1
    assert k.log[0] == ("triton", (4,), (x, 37, 0.5), {"BLOCK": 32, "num_warps": 4})
    assert k.log[1] == ("compiled", 1, (5, 2, 1), (x, 53, 0.25, 32, False))  # constexprs, defaults after


@pytest.mark.parametrize(
    ("first", "second"),
    [((37,), (16,)), ((37,), (1,)), ((37,), (2**31,)), ((37, "BLOCK64"), (37,))],
    ids=["multiple-of-16", "one", "64-bit", "constexpr"],
)
def test_a_new_specialization_goes_through_triton(fast: None, first: tuple[Any, ...], second: tuple[Any, ...]) -> None:
    k, x = _Kernel(), torch.randn(64)
    for n, *block in (first, second):
        launch_mod.launch(k, (1,), x, n, 1.0, BLOCK=64 if block else 32)
    assert k.builds == 2 and [e[0] for e in k.log] == ["triton", "triton"]


def test_alignment_and_dtype_are_part_of_the_key(fast: None) -> None:
    k, x = _Kernel(), torch.randn(64)
    launch_mod.launch(k, (1,), x, 3, 1.0, BLOCK=32)
    launch_mod.launch(k, (1,), x[1:], 3, 1.0, BLOCK=32)  # 4 bytes off: not 16-byte aligned
    launch_mod.launch(k, (1,), x.double(), 3, 1.0, BLOCK=32)
    launch_mod.launch(k, (1,), x[4:], 3, 1.0, BLOCK=32)  # 16 bytes off: aligned, cached
    assert [e[0] for e in k.log] == ["triton", "triton", "triton", "compiled"]


def test_a_parameter_without_a_value_is_never_cached(fast: None) -> None:
    k, x = _Kernel(), torch.randn(64)
    for _ in range(2):
        launch_mod.launch(k, (1,), x, 3, 1.0)  # BLOCK missing (Triton itself would refuse it)
    assert [e[0] for e in k.log] == ["triton", "triton"]


def test_interpreter_or_switch_off_always_goes_through_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_mod, "_FAST", False)
    k, x = _Kernel(), torch.randn(64)
    for _ in range(3):
        launch_mod.launch(k, (1,), x, 3, 1.0, BLOCK=32)
    assert k.builds == 3
