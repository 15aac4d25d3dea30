"""The paged latent cache: two tensors in the layout the NPU kernels use, and a block allocator."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .config import MLAConfig


class CacheFullError(RuntimeError):
    pass


# Never handed out to a request: graph-mode decode writes its padded batch rows here (the fused
# prolog's cache_index must be a valid slot, -1 is not admitted), and nothing ever reads it back.
# vLLM's block pool keeps block 0 out of use the same way (its null block).
PADDING_BLOCK = 0


class BlockAllocator:
    """Hands out physical block ids, never PADDING_BLOCK. `shuffle=True` hands them out in random
    order, so tests see block tables that are not 1, 2, 3, ..."""

    def __init__(self, num_blocks: int, *, shuffle: bool = False, seed: int = 0) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self._free = [b for b in range(num_blocks) if b != PADDING_BLOCK]
        if shuffle:
            random.Random(seed).shuffle(self._free)
        self._free.reverse()  # pop() from the end hands out the list's first element first
        self.num_blocks = num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise CacheFullError(f"need {count} free blocks, only {len(self._free)} of {self.num_blocks} left "
                                 f"(block {PADDING_BLOCK} is the padding block, never handed out)")
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def grow(self, block_table_row: list[int], num_tokens: int, block_size: int) -> list[int]:
        """Append blocks to one request's row until it holds `num_tokens` tokens; returns the row."""
        needed = -(-num_tokens // block_size) - len(block_table_row)
        if needed > 0:
            block_table_row.extend(self.allocate(needed))
        return block_table_row


@dataclass
class PagedLatentCache:
    """latent [num_blocks, block_size, 1, kv_lora_rank] and rope [num_blocks, block_size, 1, qk_rope_head_dim].

    Token t of a request lives in block block_table[t // block_size], row t % block_size.
    """

    latent: torch.Tensor
    rope: torch.Tensor
    allocator: BlockAllocator | None = field(default=None, repr=False)

    @classmethod
    def allocate(cls, config: MLAConfig, num_blocks: int, block_size: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 shuffle_blocks: bool = False, seed: int = 0) -> "PagedLatentCache":
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PagedLatentCache.allocate: {name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"PagedLatentCache.allocate: dtype must be a floating torch.dtype (the layer's), got {dtype!r}")
        latent = torch.zeros(num_blocks, block_size, 1, config.kv_lora_rank, dtype=dtype, device=device)
        rope = torch.zeros(num_blocks, block_size, 1, config.qk_rope_head_dim, dtype=dtype, device=device)
        return cls(latent, rope, BlockAllocator(num_blocks, shuffle=shuffle_blocks, seed=seed))

    @property
    def num_blocks(self) -> int:
        return self.latent.shape[0]

    @property
    def block_size(self) -> int:
        return self.latent.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.latent.dtype

    def clone(self) -> "PagedLatentCache":
        """A copy of the contents (the allocator is not copied)."""
        return PagedLatentCache(self.latent.clone(), self.rope.clone(), None)

    def check(self, config: MLAConfig) -> None:
        """Layout checks, cheap (no device sync)."""
        for name, tensor, width in (("latent", self.latent, config.kv_lora_rank),
                                    ("rope", self.rope, config.qk_rope_head_dim)):
            if tensor.dim() != 4 or tensor.shape[2] != 1 or tensor.shape[3] != width:
                raise ValueError(f"kv_cache.{name} must be [num_blocks, block_size, 1, {width}], "
                                 f"got {list(tensor.shape)}")
            # Rows may be strided (vLLM keeps latent and rope side by side in one 576-wide cache;
            # these are views of it), but [num_blocks, block_size] must flatten to slots.
            if tensor.stride(-1) != 1 or tensor.stride(0) != tensor.shape[1] * tensor.stride(1):
                raise ValueError(f"kv_cache.{name} must be viewable as [num_blocks * block_size, {width}] "
                                 f"(unit stride in the last dim, blocks of consecutive rows), "
                                 f"got strides {tensor.stride()}")
        if self.latent.shape[:2] != self.rope.shape[:2]:
            raise ValueError(f"kv_cache.latent {list(self.latent.shape)} and kv_cache.rope "
                             f"{list(self.rope.shape)} disagree on [num_blocks, block_size]")
        if self.latent.dtype != self.rope.dtype:
            raise ValueError(f"kv_cache.latent is {self.latent.dtype} but kv_cache.rope is {self.rope.dtype}")
