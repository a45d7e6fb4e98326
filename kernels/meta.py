"""Per-step segment metadata for the SMLM kernels.

Built once per engine step on the host (the scheduler knows every row's adapter slot),
copied to the device in one transfer, and read by every LoRA-targeted linear of every layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Row-block schedules read by the Triton kernels: every block lies inside one segment and holds at
# most this many rows. One program (per column tile) walks one block, so a segment's A/B tile is
# read once per block, never once per row; a kernel whose BLOCK_M is smaller loops inside a block.
FWD_BLOCK_ROWS = 64
GRAD_BLOCK_ROWS = 256  # grad_a/grad_b kernels: fewer, longer blocks mean fewer fp32 atomics


def row_blocks(segments: Sequence[tuple[int, int, int]], block_rows: int) -> list[tuple[int, int, int]]:
    """(row_start, row_end, slot) for each block of at most ``block_rows`` rows of each segment."""
    return [
        (row, min(row + block_rows, start + n), slot)
        for start, n, slot in segments
        for row in range(start, start + n, block_rows)
    ]


def segments_of(slots: Sequence[int], num_train_tokens: int = 0) -> tuple[list[tuple[int, int, int]], int]:
    """Maximal runs of one slot >= 0, as (start, length, slot), none straddling the training
    boundary; and how many of them are training segments (they come first)."""
    segments: list[tuple[int, int, int]] = []
    num_train_segments = 0
    start = 0
    while start < len(slots):
        end = start + 1
        limit = num_train_tokens if start < num_train_tokens else len(slots)
        while end < limit and slots[end] == slots[start]:
            end += 1
        if slots[start] >= 0:
            segments.append((start, end - start, slots[start]))
            if start < num_train_tokens:
                num_train_segments += 1
        start = end
    return segments, num_train_segments


def upload(sections: Sequence[tuple[Sequence[int] | Sequence[float], torch.dtype]],
           device: torch.device | str) -> list[torch.Tensor]:
    """Host lists as tensors on ``device``: views of one buffer per dtype, in the order given.

    On CUDA each buffer goes over in one asynchronous copy from pinned memory:
    ``torch.tensor(..., device="cuda")`` copies from pageable memory and waits for the stream, i.e.
    for the step queued before. Each section starts on a 16-byte boundary: Triton specializes every
    pointer argument on it, so a table at an odd offset of a shared buffer would compile a second
    variant of each kernel mid-serving, depending only on how many rows came before it."""
    dev = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(sections)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, (_, dtype) in enumerate(sections):
        by_dtype.setdefault(dtype, []).append(i)
    for dtype, members in by_dtype.items():
        align = 16 // torch.empty(0, dtype=dtype).element_size()
        starts, end = [], 0
        for i in members:
            starts.append(end)
            end += -(-len(sections[i][0]) // align) * align
        flat: list[int | float] = [0] * max(end, align)
        for a, i in zip(starts, members, strict=True):
            flat[a : a + len(sections[i][0])] = sections[i][0]
        host = torch.tensor(flat, dtype=dtype)
        if dev.type == "cuda":
            host = host.pin_memory().to(dev, non_blocking=True)
        elif host.device != dev:
            host = host.to(dev)
        for a, i in zip(starts, members, strict=True):
            out[i] = host[a : a + len(sections[i][0])]
    return [t for t in out if t is not None]


@dataclass(frozen=True)
class SMLMMeta:
    """Which rows of a packed batch use which adapter slot.

    Rows are laid out ``[train | eval | prefill | decode]``. A *segment* is a maximal run of
    consecutive rows with the same slot ``>= 0``; rows with slot ``-1`` (base model) belong to no
    segment. Segments never straddle the training boundary, so training segments are
    ``segments[:num_train_segments]`` and cover only rows ``[0, num_train_tokens)``.
    """

    token_slots: torch.Tensor  # [T] int32, -1 = no adapter
    seg_starts: torch.Tensor  # [S] int32, first row of each segment
    seg_lens: torch.Tensor  # [S] int32
    seg_slots: torch.Tensor  # [S] int32, slot of each segment (always >= 0)
    blocks: torch.Tensor  # [NB, 3] int32 (row_start, row_end, slot), FWD_BLOCK_ROWS rows at most
    grad_blocks: torch.Tensor  # [NGB, 3] int32, the same over training segments, GRAD_BLOCK_ROWS
    num_tokens: int
    num_train_tokens: int
    num_train_segments: int
    max_seg_len: int
    num_blocks: int  # rows of `blocks` (the forward kernels' grid size)
    num_train_blocks: int  # blocks[:num_train_blocks] cover the training rows
    num_grad_blocks: int  # rows of `grad_blocks` (the grad_a/grad_b kernels' grid size)
    # host copies, for reference paths and the scheduler's bookkeeping (never read on the hot path)
    host_segments: tuple[tuple[int, int, int], ...]  # (start, length, slot)

    @property
    def num_segments(self) -> int:
        return len(self.host_segments)

    @classmethod
    def build(
        cls,
        token_slots: Sequence[int],
        num_train_tokens: int,
        device: torch.device | str = "cpu",
    ) -> SMLMMeta:
        sections, finish = cls.prepare(token_slots, num_train_tokens)
        return finish(upload(sections, device))  # one transfer, no sync

    @classmethod
    def prepare(
        cls, token_slots: Sequence[int], num_train_tokens: int
    ) -> tuple[list[tuple[Sequence[int], torch.dtype]], Callable[[Sequence[torch.Tensor]], SMLMMeta]]:
        """``build``'s host half: the int32 sections to put on the device, and what makes the
        metadata from their device views (in the same order). A caller with sections of its own
        (``BatchBuilder.build``) uploads both in one ``upload``: one pinned buffer and one copy a
        step instead of two."""
        slots = [int(s) for s in token_slots]
        if not 0 <= num_train_tokens <= len(slots):
            raise ValueError(f"num_train_tokens={num_train_tokens} outside [0, {len(slots)}]")
        if any(s < -1 for s in slots):
            raise ValueError("adapter slots must be >= -1")
        segments, num_train_segments = segments_of(slots, num_train_tokens)
        blocks = row_blocks(segments, FWD_BLOCK_ROWS)
        num_train_blocks = len(row_blocks(segments[:num_train_segments], FWD_BLOCK_ROWS))
        grad_blocks = row_blocks(segments[:num_train_segments], GRAD_BLOCK_ROWS)
        i32 = torch.int32
        sections: list[tuple[Sequence[int], torch.dtype]] = [
            (slots, i32), ([s for s, _, _ in segments], i32), ([n for _, n, _ in segments], i32),
            ([slot for _, _, slot in segments], i32), ([v for b in blocks for v in b], i32),
            ([v for b in grad_blocks for v in b], i32)]
        n, nb, ngb = len(slots), len(blocks), len(grad_blocks)

        def finish(views: Sequence[torch.Tensor]) -> SMLMMeta:
            if len(views) != len(sections):
                raise ValueError(f"SMLMMeta takes {len(sections)} device views, got {len(views)}")
            return cls(
                token_slots=views[0],
                seg_starts=views[1],
                seg_lens=views[2],
                seg_slots=views[3],
                blocks=views[4].view(nb, 3),
                grad_blocks=views[5].view(ngb, 3),
                num_tokens=n,
                num_train_tokens=num_train_tokens,
                num_train_segments=num_train_segments,
                max_seg_len=max((length for _, length, _ in segments), default=0),
                num_blocks=nb,
                num_train_blocks=num_train_blocks,
                num_grad_blocks=ngb,
                host_segments=tuple(segments),
            )

        return sections, finish
