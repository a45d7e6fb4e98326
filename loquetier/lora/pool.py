"""A fixed pool of GPU slots for LoRA weights: one stacked ModuleLoRA per (layer, target module).

Capacity is static: loading an adapter writes into existing storage, so no tensor that a
running step reads ever moves. Model layers hold references to their ModuleLoRA objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from loquetier.kernels import ModuleLoRA

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelDims:
    """Shapes of the LoRA-targetable linears of a Llama-family decoder."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def module_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a target module."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, q),
            "k_proj": (self.hidden_size, kv),
            "v_proj": (self.hidden_size, kv),
            "o_proj": (q, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        if name not in shapes:
            raise ValueError(f"unknown LoRA target module {name!r}; expected one of {TARGET_MODULES}")
        return shapes[name]


class LoRASlotPool:
    """Slot-indexed storage for every target module of every layer.

    Slots ``[0, num_train_slots)`` also carry fp32 gradient storage and are reserved for
    adapters under training.
    """

    def __init__(self, dims: ModelDims, *, num_slots: int, max_rank: int, num_train_slots: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be >= 1")
        self.dims, self.num_slots, self.max_rank = dims, num_slots, max_rank
        self.num_train_slots, self.dtype, self.device = num_train_slots, dtype, torch.device(device)
        self.modules: dict[tuple[int, str], ModuleLoRA] = {}
        for layer in range(dims.num_layers):
            for name in TARGET_MODULES:
                fan_in, fan_out = dims.module_shape(name)
                self.modules[(layer, name)] = ModuleLoRA.empty(
                    num_slots, max_rank, fan_in, fan_out, num_train_slots=num_train_slots,
                    dtype=dtype, device=device)

    def get(self, layer: int, name: str) -> ModuleLoRA:
        return self.modules[(layer, name)]

    def write_slot(self, slot: int, weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                   scale: float) -> None:
        """Write one adapter into ``slot``.

        weights[(layer, module)] = (A [r, in], B [out, r]) in PEFT layout. Modules absent from
        ``weights`` get rank 0 in this slot (the adapter does not target them).
        """
        self._check_slot(slot)
        for key, lora in self.modules.items():
            pair = weights.get(key)
            if pair is None:
                self._set_rank(lora, slot, 0, 0.0)
                continue
            a, b = pair
            r = a.shape[0]
            if r > self.max_rank:
                raise ValueError(f"rank {r} exceeds the pool's max_rank {self.max_rank}")
            if a.shape != (r, lora.in_features) or b.shape != (lora.out_features, r):
                raise ValueError(f"{key}: expected A [{r}, {lora.in_features}] and B [{lora.out_features}, {r}],"
                                 f" got {tuple(a.shape)} and {tuple(b.shape)}")
            lora.a[slot].zero_()
            lora.b[slot].zero_()
            lora.a[slot, :r].copy_(a)
            lora.b[slot, :r].copy_(b.T)
            self._set_rank(lora, slot, r, scale)

    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        for lora in self.modules.values():
            self._set_rank(lora, slot, 0, 0.0)

    def _set_rank(self, lora: ModuleLoRA, slot: int, rank: int, scale: float) -> None:
        lora.ranks[slot] = rank
        lora.scales[slot] = scale
        if lora.host_ranks is not None:
            lora.host_ranks[slot] = rank

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} outside [0, {self.num_slots})")
