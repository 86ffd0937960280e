"""The engine's own paged KV cache: fixed-size blocks handed out to sequences, sized by a byte budget."""

from dataclasses import dataclass

import torch

from server.engine.block_manager import BlockAllocator


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize


class PagedKVCache:
    """Per layer, keys and values as (num_blocks·block_size, kv_heads, head_dim) rows.

    Token i of a sequence lives in row `block_table[i // block_size] * block_size + i % block_size`.
    """

    def __init__(self, shape: KVShape, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 prefix_caching: bool = False):
        rows = num_blocks * block_size
        self.keys = [torch.zeros(rows, shape.num_kv_heads, shape.head_dim, dtype=dtype, device=device)
                     for _ in range(shape.num_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.allocator = BlockAllocator(num_blocks, block_size, caching=prefix_caching)

    @classmethod
    def from_budget(cls, shape: KVShape, budget_bytes: int, block_size: int, dtype: torch.dtype,
                    device: torch.device, prefix_caching: bool = False) -> "PagedKVCache":
        num_blocks = budget_bytes // (shape.bytes_per_token(dtype) * block_size)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes holds not even one block")
        return cls(shape, num_blocks, block_size, dtype, device, prefix_caching)

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_blocks * self.allocator.block_size

    def write(self, layer: int, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[layer].index_copy_(0, rows, keys)
        self.values[layer].index_copy_(0, rows, values)
