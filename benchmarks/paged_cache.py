"""Random inputs of one paged-attention layer, for the attention benchmarks and tests: sequences' cache blocks
scattered over the pool in a random order (as an allocator that has served for a while leaves them), random K/V
in every block and random queries, with the step's `AttentionBatch`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import AttentionBatch


@dataclass
class PagedCase:
    q: torch.Tensor  # [T, H, D], each sequence's new tokens one after another
    k_cache: torch.Tensor  # [N, P, Hkv, D]
    v_cache: torch.Tensor
    batch: AttentionBatch
    tables: list[list[int]]  # each sequence's own blocks, in position order
    free_blocks: list[int]  # the spare blocks no sequence owns


def random_paged_case(
    gen: torch.Generator,
    seqs: list[tuple[int, int]],
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    spare_blocks: int = 0,
    device: torch.device | str = "cpu",
) -> PagedCase:
    """`seqs` are (context length, new tokens) per sequence; the cache holds their blocks and `spare_blocks` more.

    Values are drawn on the generator's device (a CUDA generator fills a large cache quickly) and moved to
    `device` in `dtype`.
    """
    needed = [-(-context // block_size) for context, _ in seqs]
    num_blocks = sum(needed) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen, device=gen.device).tolist()
    tables, taken = [], 0
    for count in needed:
        tables.append(order[taken : taken + count])
        taken += count

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=gen.device).to(device, dtype)

    k_cache = draw(num_blocks, block_size, n_kv_heads, head_dim)
    v_cache = draw(num_blocks, block_size, n_kv_heads, head_dim)
    q = draw(sum(n for _, n in seqs), n_heads, head_dim)
    batch = AttentionBatch.from_sequences(tables, [c for c, _ in seqs], [n for _, n in seqs], device)
    return PagedCase(q, k_cache, v_cache, batch, tables, order[taken:])
