"""KVCache: the paged KV cache's device storage, beside the model that reads and writes it.

Per layer, ``k[layer]`` / ``v[layer]`` of shape [num_blocks, block_size, num_kv_heads, head_dim],
allocated once. A token at position ``p`` of a sequence lives at block ``table[p // block_size]``,
offset ``p % block_size``; the blocks are handed out by the engine's ``BlockManager``.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(  # noqa: PLR0917
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)
        ]  # [NB, BS, Hkv, D]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize
