"""The op layer: what model code calls. Base GEMM + SMLM over one packed batch.

The hidden state travels as two tensors: the training rows (``x_train``, requires grad) and
every other row (``x_rest``, no grad). One base GEMM and one SMLM launch per target module
serve both; autograd sees only the training rows, so backward never touches inference rows.

A decode-sized forward that keeps no ``v`` for backward (no training rows) takes
``smlm.forward_split``: two launches per target module (or fused module), no memset, no atomics, the
same bits every run; others (prefill chunks, training rows) run shrink into ``v``, then expand.

Decode-sized steps can take one SMLM launch per target module instead of two (``smlm.shrink_expand``:
shrink and expand fused, no ``v`` buffer) wherever the backend says it applies from host sizes only
(``smlm.fused_applies``), and only where no ``v`` is kept for backward. The switch:
``LOQUETIER_SMLM_FUSED_DECODE=0/1`` in the environment (default 0: on the H200 it is 1.6-2.6x
slower than the two launches, docs/benchmarks/smlm_fused.md), or ``set_fused_decode`` at run time;
both paths compute the same sums (see ``reference.shrink_expand_ref``). A CUDA graph keeps the path
that was on when it was captured.

In CUDA graphs (``overlap_scope``: their warm-ups and captures) each module's shrinks run on a side
stream, beside the base GEMM that reads the same input; the expands add into the GEMM's output once
both are done. The latency-bound SMLM launches then hide behind the GEMM's weight reads (on the
H200, 0.43-0.58 ms off a batch-64 decode step with 32 adapters in two runs,
docs/benchmarks/offline.md). Eager steps keep one stream: two stream switches per module would cost
more host time than they hide.
``LOQUETIER_LORA_OVERLAP=0/1`` (default 1) or ``set_lora_overlap``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import reference
from .meta import SMLMMeta
from .weights import ModuleLoRA

LoRAPart = tuple[ModuleLoRA, int]  # (module storage, column offset in a fused output)
FUSED_DECODE_ENV = "LOQUETIER_SMLM_FUSED_DECODE"


def _fused_from_env() -> bool:
    return os.environ.get(FUSED_DECODE_ENV, "0").strip().lower() in ("1", "true", "on", "yes")


_fused_decode = _fused_from_env()


class _Backend:
    def __init__(self, shrink: Callable[..., torch.Tensor], expand: Callable[..., None],  # noqa: PLR0917
                 backward: Callable[..., torch.Tensor], name: str,
                 parts: tuple[Callable[..., bool], Callable[..., torch.Tensor], Callable[..., None]] | None = None,
                 variant_metas: Callable[[int, torch.device], list[SMLMMeta]] | None = None,
                 fused: tuple[Callable[..., bool], Callable[..., None]] | None = None,
                 forward_split: tuple[Callable[..., bool], Callable[..., Callable[[torch.Tensor], None]]] | None = None,
                 ) -> None:
        self.shrink, self.expand, self.backward, self.name = shrink, expand, backward, name
        # (parts_fit, shrink_parts, expand_parts): the parts of a fused module in one launch each
        self.parts = parts
        # layouts whose launches build every compiled variant (None: the backend compiles nothing)
        self.variant_metas = variant_metas
        # (fused_applies, shrink_expand): shrink + expand of a module (all its parts) in one launch
        self.fused = fused
        # (split_applies, split_shrink): shrink + expand of a module (all its parts) when no v is
        # kept, decode-sized: K splits stored apart, added by expand in a fixed order (no memset, no
        # atomics); split_shrink launches the shrink and returns the expand, finish(y)
        self.forward_split = forward_split


_REFERENCE = _Backend(reference.shrink_ref, reference.expand_ref, reference.backward_ref, "reference")
_forced: str | None = None


def _triton_backend() -> _Backend | None:
    try:
        from . import smlm
    except ImportError:
        return None
    return _Backend(smlm.shrink, smlm.expand, smlm.backward, "triton",
                    parts=(smlm.parts_fit, smlm.shrink_parts, smlm.expand_parts),
                    variant_metas=smlm.variant_metas, fused=(smlm.fused_applies, smlm.shrink_expand),
                    forward_split=(smlm.split_applies, smlm.split_shrink))


def backend_for(device: torch.device) -> _Backend:
    """Triton on CUDA, and on CPU under TRITON_INTERPRET=1; the torch reference otherwise."""
    choice = _forced
    if choice is None:
        use_triton = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        choice = "triton" if use_triton else "reference"
    if choice == "triton":
        triton_backend = _triton_backend()
        if triton_backend is not None:
            return triton_backend
    return _REFERENCE


def force_backend(name: str | None) -> None:
    """Pin the SMLM backend ("triton" | "reference"), or None for the automatic choice."""
    global _forced
    if name not in (None, "triton", "reference"):
        raise ValueError(f"unknown SMLM backend {name!r}")
    _forced = name


def set_fused_decode(on: bool | None) -> None:
    """Switch the one-launch decode path (``smlm.shrink_expand``) on or off for later forwards; None:
    back to the environment's setting (``LOQUETIER_SMLM_FUSED_DECODE``, default off)."""
    global _fused_decode
    _fused_decode = _fused_from_env() if on is None else bool(on)


def fused_decode_enabled() -> bool:
    """Whether the one-launch decode path is switched on (it still runs only where it applies)."""
    return _fused_decode


def set_deterministic(on: bool | None) -> None:
    """Forward SMLM shrinks of prefill chunks and training rows sum their K splits in a fixed
    order (True: the same bits run after run) or add them with atomics (False, the default); None:
    back to ``LOQUETIER_SMLM_DETERMINISTIC``. Decode-sized inference-only forwards are always in a
    fixed order (``smlm.forward_split``). See ``smlm`` (Triton backend; the torch reference has no splits)."""
    from . import smlm

    smlm.set_deterministic(on)


def graph_tiling() -> tuple[int, bool]:
    """For CUDA graphs of inference steps: (the SMLM row tile of prefill-sized buckets, whether the
    launches walk only the row blocks a step can lay out), from the Triton kernels' tuning
    (``Tuning.graph_prefill_rows``, ``graph_bounded_blocks``); (16, True) without Triton."""
    try:
        from . import smlm
    except ImportError:  # no Triton: the torch reference, which walks host segments
        return 16, True
    rows = smlm.TUNING.graph_prefill_rows
    if rows not in (16, 32, 64):
        raise ValueError(f"graph_prefill_rows must be 16, 32 or 64, got {rows}")
    return rows, bool(smlm.TUNING.graph_bounded_blocks)


def deterministic_enabled() -> bool:
    from . import smlm

    return smlm.deterministic_enabled()


OVERLAP_ENV = "LOQUETIER_LORA_OVERLAP"
_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def _overlap_from_env() -> bool:
    value = os.environ.get(OVERLAP_ENV, "1").strip().lower() or "1"
    if value not in _ON + _OFF:
        raise ValueError(f"{OVERLAP_ENV} must be 1 or 0 (on or off), got {value!r}")
    return value in _ON


_overlap = _overlap_from_env()
_overlap_depth = 0  # > 0 inside overlap_scope
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def set_lora_overlap(on: bool | None) -> None:
    """Whether a CUDA forward inside ``overlap_scope`` (the CUDA graphs' captures) launches each
    module's LoRA shrinks on a side stream, beside the base GEMM (they read only the layer input;
    the expands add into the GEMM's output after it, on the main stream). None: back to
    ``LOQUETIER_LORA_OVERLAP`` (default on). The sums are the same bits either way; a graph keeps
    the setting it was captured with."""
    global _overlap
    _overlap = _overlap_from_env() if on is None else bool(on)


def lora_overlap() -> bool:
    """Whether forwards inside ``overlap_scope`` run the LoRA shrinks beside the base GEMMs."""
    return _overlap


@contextlib.contextmanager
def overlap_scope() -> Iterator[None]:
    """CUDA forwards inside overlap their LoRA work with the base GEMMs (``set_lora_overlap``). The
    CUDA graphs' warm-ups and captures run in it: a replayed graph has the streams' fork and join
    for free, where an eager step would pay two stream switches per module on the host."""
    global _overlap_depth
    _overlap_depth += 1
    try:
        yield
    finally:
        _overlap_depth -= 1


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    key = torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device())
    stream = _side_streams.get(key)
    if stream is None:
        stream = _side_streams[key] = torch.cuda.Stream(key)
    return stream


def variant_metas(slot: int, device: torch.device) -> list[SMLMMeta]:
    """Batch layouts on one adapter slot whose launches cover every compiled variant of the forward
    SMLM kernels on ``device`` (see ``smlm.variant_metas``); none for the torch reference."""
    metas = backend_for(device).variant_metas
    return [] if metas is None else metas(slot, device)


@torch.no_grad()
def warm_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # noqa: PLR0917
                     loras: Sequence[LoRAPart], meta: SMLMMeta) -> None:
    """Run both forward paths of ``lora_linear`` once over ``meta``'s rows of ``x`` (results dropped):
    the one of inference-only steps (no ``v`` kept) and the one of steps with training rows (``v``
    kept for backward), so that every launch either compiles is built before a served step."""
    backend = backend_for(x.device)
    for keep_v in (False, True):
        _forward(x, weight, bias, loras, meta, backend, keep_v)


def _lora_terms(x: torch.Tensor, loras: Sequence[LoRAPart], meta: SMLMMeta, backend: _Backend,
                keep_v: bool) -> tuple[Callable[[torch.Tensor], None], list[torch.Tensor]]:
    """Launch the LoRA work that reads only ``x`` (the shrinks) now; return ``finish``, which adds the
    LoRA terms into a ``y`` of the base GEMM's shape (the expands), and the shrink outputs v when
    ``keep_v`` (backward)."""
    modules = [lo for lo, _ in loras]
    if not keep_v and _fused_decode and backend.fused is not None and backend.fused[0](modules, meta):
        fused = backend.fused[1]
        return (lambda y: fused(y, x, loras, meta)), []  # one launch, no v
    if not keep_v and backend.forward_split is not None and backend.forward_split[0](meta):
        return backend.forward_split[1](x, loras, meta), []  # two launches, no v, the same bits every run
    if backend.parts is not None and len(loras) > 1 and backend.parts[0](modules):
        _, shrink_parts, expand_parts = backend.parts
        v_all = shrink_parts(x, modules, meta)  # [T, P * max_rank] fp32, one launch
        r = modules[0].max_rank
        return (lambda y: expand_parts(y, v_all, loras, meta)), [v_all[:, p * r : (p + 1) * r]
                                                                 for p in range(len(loras))]
    vs = [backend.shrink(x, lora, meta) for lora, _ in loras]  # [T, max_rank] fp32 each

    def expand_each(y: torch.Tensor) -> None:
        for (lora, offset), v in zip(loras, vs, strict=True):
            backend.expand(y, v, lora, meta, offset)
    return expand_each, vs


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # noqa: PLR0917
             loras: Sequence[LoRAPart], meta: SMLMMeta | None,
             backend: _Backend, keep_v: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y = x @ weight.T + bias + the LoRA terms; the shrink outputs v when ``keep_v`` (backward).
    Inside ``overlap_scope`` on CUDA (no v kept), the shrinks run on a side stream beside the base
    GEMM (``set_lora_overlap``); the sums are the same either way."""
    if meta is None or not meta.num_segments:
        return F.linear(x, weight, bias), []  # [T, out_total]
    if not keep_v and backend.name == "triton" and _gemm_lora_applies(x, weight, loras):
        from . import gemm_lora, smlm

        splits = smlm.shrink_splits(x, loras, meta)  # [S, T, P * R]: the v of the GEMM's LoRA loop
        return gemm_lora.linear_lora(x, weight, bias, loras, splits, meta.token_slots), []
    if not (_overlap and _overlap_depth and x.is_cuda and not keep_v):
        y = F.linear(x, weight, bias)
        finish, vs = _lora_terms(x, loras, meta, backend, keep_v)
        finish(y)
        return y, vs
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    side.wait_stream(main)  # x is ready
    with torch.cuda.stream(side):
        finish, vs = _lora_terms(x, loras, meta, backend, keep_v)
    y = F.linear(x, weight, bias)  # on the main stream, beside the shrinks
    main.wait_stream(side)
    finish(y)
    return y, vs


def _gemm_lora_applies(x: torch.Tensor, weight: torch.Tensor, loras: Sequence[LoRAPart]) -> bool:
    """Whether an inference-only forward takes ``kernels.gemm_lora`` (``Tuning.gemm_lora_rows``)."""
    from . import gemm_lora, smlm

    rows = smlm.TUNING.gemm_lora_rows
    if _fused_decode or not 0 < x.shape[0] <= min(rows, gemm_lora.MAX_ROWS):  # the one-launch switch wins
        return False
    if x.stride(1) != 1 or not weight.is_contiguous() or x.dtype != weight.dtype:
        return False
    modules = [lo for lo, _ in loras]
    block_n = gemm_lora.default_config(x.shape[0], weight.shape[0], weight.shape[1]).block_n
    return ((len(modules) == 1 or smlm.parts_fit(modules)) and gemm_lora.parts_ok(loras, block_n)
            and loras[-1][1] + modules[-1].out_features == weight.shape[0])


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_train: torch.Tensor, x_rest: torch.Tensor, weight: torch.Tensor,  # noqa: PLR0917
                bias: torch.Tensor | None, loras: Sequence[LoRAPart], meta: SMLMMeta | None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n_train = x_train.shape[0]
        backend = backend_for(x_train.device)
        y, vs = _forward(torch.cat([x_train, x_rest]), weight, bias, loras, meta, backend, keep_v=True)
        # Only the training slice is kept for backward.
        ctx.save_for_backward(x_train, weight, *[v[:n_train] for v in vs])
        ctx.loras, ctx.meta, ctx.backend = loras, meta, backend
        ctx.mark_non_differentiable(y[n_train:])
        return y[:n_train], y[n_train:]

    @staticmethod
    def backward(ctx: Any, g_train: torch.Tensor, _g_rest: torch.Tensor) -> tuple[Any, ...]:
        x_train, weight, *vs = ctx.saved_tensors
        dx = g_train @ weight  # [n_train, in]
        for (lora, offset), v in zip(ctx.loras, vs, strict=True):
            ctx.backend.backward(g_train, x_train, v, lora, ctx.meta, offset, dx)  # dx += LoRA term
        return dx, None, None, None, None, None


def lora_linear(x_train: torch.Tensor, x_rest: torch.Tensor, weight: torch.Tensor,  # noqa: PLR0917
                bias: torch.Tensor | None, loras: Sequence[LoRAPart] = (),
                meta: SMLMMeta | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics:
        x = cat([x_train, x_rest])                       # [T, in], rows [train | rest]
        y = x @ weight.T + bias                          # [T, out_total], one GEMM
        for lora, off in loras: y[:, off:off+lora.out] += SMLM(x, lora, meta)
        return y[:n_train], y[n_train:]
    Gradients flow to ``x_train`` only; LoRA gradients of training slots are accumulated into
    ``lora.grad_a`` / ``lora.grad_b`` (side effect of backward). The base weight is frozen.
    """
    if meta is not None and meta.num_tokens != x_train.shape[0] + x_rest.shape[0]:
        num_rows = x_train.shape[0] + x_rest.shape[0]
        raise ValueError(f"meta covers {meta.num_tokens} rows, batch has {num_rows}")
    if meta is not None and meta.num_train_tokens != x_train.shape[0]:
        raise ValueError(f"meta has {meta.num_train_tokens} training rows, x_train has {x_train.shape[0]}")
    if x_train.requires_grad and torch.is_grad_enabled():
        y_train, y_rest = _LoRALinear.apply(x_train, x_rest, weight, bias, tuple(loras), meta)
        return y_train, y_rest
    with torch.no_grad():
        n_train = x_train.shape[0]
        # no copy when one of the two is empty
        x = x_rest if n_train == 0 else x_train if x_rest.shape[0] == 0 else torch.cat([x_train, x_rest])
        y, _ = _forward(x, weight, bias, loras, meta, backend_for(x_train.device), keep_v=False)
        return y[:n_train], y[n_train:]
