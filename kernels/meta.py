"""Per-step segment metadata for the SMLM kernels.

Built once per engine step on the host (the scheduler knows every row's adapter slot),
copied to the device in one transfer, and read by every LoRA-targeted linear of every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
    num_tokens: int
    num_train_tokens: int
    num_train_segments: int
    max_seg_len: int
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
        slots = [int(s) for s in token_slots]
        if not 0 <= num_train_tokens <= len(slots):
            raise ValueError(f"num_train_tokens={num_train_tokens} outside [0, {len(slots)}]")
        if any(s < -1 for s in slots):
            raise ValueError("adapter slots must be >= -1")
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
        dev = torch.device(device)
        token_t = torch.tensor(slots, dtype=torch.int32)
        seg_t = torch.tensor(segments, dtype=torch.int32).reshape(-1, 3)
        host = torch.cat([token_t, seg_t[:, 0], seg_t[:, 1], seg_t[:, 2]]).to(dev, non_blocking=True)
        n, s = len(slots), len(segments)
        return cls(
            token_slots=host[:n],
            seg_starts=host[n : n + s],
            seg_lens=host[n + s : n + 2 * s],
            seg_slots=host[n + 2 * s : n + 3 * s],
            num_tokens=n,
            num_train_tokens=num_train_tokens,
            num_train_segments=num_train_segments,
            max_seg_len=max((length for _, length, _ in segments), default=0),
            host_segments=tuple(segments),
        )
