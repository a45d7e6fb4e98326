"""The stacked, slot-indexed LoRA weights of one target module of one layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModuleLoRA:
    """Static-capacity LoRA storage for one target module (e.g. layer 3's q_proj).

    Slot ``s`` holds one adapter: ``a[s, :r]`` is PEFT's ``lora_A.weight`` ([r, in]) and
    ``b[s, :r]`` is PEFT's ``lora_B.weight`` transposed ([r, out]), so every slot view
    ``[:r]`` is contiguous. ``ranks[s] == 0`` means the adapter in slot ``s`` does not target
    this module (or the slot is empty): the kernels skip it.

    Training adapters live in slots ``[0, num_train_slots)``; their gradients are accumulated
    (fp32) into ``grad_a`` / ``grad_b`` by the backward kernels. Each job's master parameters use
    those slices as their ``.grad``, so no copy or Python loop over adapters is needed.
    """

    a: torch.Tensor  # [num_slots, max_rank, in_features], model dtype
    b: torch.Tensor  # [num_slots, max_rank, out_features], model dtype
    ranks: torch.Tensor  # [num_slots] int32
    scales: torch.Tensor  # [num_slots] float32
    grad_a: torch.Tensor | None = None  # [num_train_slots, max_rank, in_features] fp32
    grad_b: torch.Tensor | None = None  # [num_train_slots, max_rank, out_features] fp32
    host_ranks: list[int] | None = None  # host mirror of `ranks`, kept in sync by the slot pool

    @property
    def in_features(self) -> int:
        return int(self.a.shape[2])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[2])

    @property
    def max_rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def num_slots(self) -> int:
        return int(self.a.shape[0])

    @property
    def num_train_slots(self) -> int:
        return 0 if self.grad_a is None else int(self.grad_a.shape[0])

    @classmethod
    def empty(
        cls,
        num_slots: int,
        max_rank: int,
        in_features: int,
        out_features: int,
        *,
        num_train_slots: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> ModuleLoRA:
        if not 0 <= num_train_slots <= num_slots:
            raise ValueError("num_train_slots must lie in [0, num_slots]")
        grads = num_train_slots > 0
        return cls(
            a=torch.zeros(num_slots, max_rank, in_features, dtype=dtype, device=device),
            b=torch.zeros(num_slots, max_rank, out_features, dtype=dtype, device=device),
            ranks=torch.zeros(num_slots, dtype=torch.int32, device=device),
            scales=torch.zeros(num_slots, dtype=torch.float32, device=device),
            grad_a=torch.zeros(num_train_slots, max_rank, in_features, device=device) if grads else None,
            grad_b=torch.zeros(num_train_slots, max_rank, out_features, device=device) if grads else None,
            host_ranks=[0] * num_slots,
        )
