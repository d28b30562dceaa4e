"""Bookkeeping of the paged KV cache: which fixed-size blocks are free."""

from __future__ import annotations


class BlockAllocator:
    """A free list over `num_blocks` blocks of `block_size` token slots each."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks with {len(self._free)} free")
        # Take from the end in place: O(count), where re-slicing the list copied all free blocks (millions on a
        # large GPU) on every allocation.
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        return taken

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
