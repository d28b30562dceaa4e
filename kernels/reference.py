"""Pure-torch reference of the Punica shrink/expand contract over paged adapter weights.

Shapes (K slices fused in one layer, D the sum of their widths, R = `table.max_rank`; the page layout is
described in `kernels.paging`):
  x: [T, d_in]                              the layer's input
  lora_a: [num_pages, K * PAGE_RANK, d_in]  A pages
  lora_b: [num_pages, PAGE_RANK, D]         B pages (B transposed, scale already folded in)
  v: [T, K * R]                             the shrink's output: slice k's ranks in columns k*R ... k*R + R-1
  y: [T, D]                                 the base layer's output, updated in place

shrink: v[t, k*R : (k+1)*R] = x[t] @ A_k[slot[t]]^T
expand: y[t, off_k : off_k + d_k] += v[t, k*R : (k+1)*R] @ B_k[slot[t]]^T

Tokens are processed per distinct slot (gather the slot's own pages, two rank-r matmuls, scatter back), so
the work is one pair of GEMMs per adapter present in the batch, not a [T, R, d_in] gather of weights.
"""

from __future__ import annotations

import torch

from kernels.metadata import LoRABatch
from kernels.paging import PAGE_RANK, PageTable, pages_for_rank


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (an fp16 intermediate loses the delta), the input's own type when wider."""
    return torch.promote_types(dtype, torch.float32)


def _slot_pages(table: PageTable, slot: int) -> torch.Tensor:
    """The pages that hold the slot's adapter (those past its rank would only add zeros)."""
    return table.pages[slot, : pages_for_rank(table.host_ranks[slot])].long()


def slot_a(lora_a: torch.Tensor, table: PageTable, slot: int) -> torch.Tensor:
    """[K, n * PAGE_RANK, d_in]: slot's A of every slice, gathered from its n pages."""
    pages = lora_a[_slot_pages(table, slot)]  # [n, K * PAGE_RANK, d_in]
    num_pages, rows, d_in = pages.shape
    num_slices = rows // PAGE_RANK
    return pages.view(num_pages, num_slices, PAGE_RANK, d_in).transpose(0, 1).reshape(
        num_slices, num_pages * PAGE_RANK, d_in
    )


def slot_b(lora_b: torch.Tensor, table: PageTable, slot: int) -> torch.Tensor:
    """[n * PAGE_RANK, D]: slot's B^T of all slices, gathered from its n pages."""
    return lora_b[_slot_pages(table, slot)].flatten(0, 1)


def shrink(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch, table: PageTable) -> torch.Tensor:
    """v = x @ A[slot]^T for every token with a slot; zero rows for slot -1. At least fp32."""
    acc = accumulation_dtype(x.dtype)
    num_slices = lora_a.shape[1] // PAGE_RANK
    v = torch.zeros(x.shape[0], num_slices * table.max_rank, dtype=acc, device=x.device)
    by_slice = v.view(x.shape[0], num_slices, table.max_rank)
    for slot in batch.active_slots:
        rows = batch.token_slots == slot
        a = slot_a(lora_a, table, slot).to(acc)  # [K, r', d_in], r' the slot's rank rounded up to pages
        used = a.shape[1]
        if not used:  # an adapter without weights (rank 0): nothing to add
            continue
        by_slice[rows, :, :used] = (x[rows].to(acc) @ a.flatten(0, 1).T).view(-1, num_slices, used)
    return v


def expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    slice_widths: tuple[int, ...],
    table: PageTable,
) -> None:
    """y[:, slice k] += v[:, rank block k] @ B_k[slot]^T, in place; slot -1 rows untouched."""
    rank = table.max_rank
    for slot in batch.active_slots:
        rows = batch.token_slots == slot
        v_rows = v[rows]
        b = slot_b(lora_b, table, slot).to(v.dtype)  # [r', D]
        used = b.shape[0]
        delta = torch.empty(v_rows.shape[0], b.shape[1], dtype=v.dtype, device=y.device)
        offset = 0
        for k, width in enumerate(slice_widths):
            delta[:, offset : offset + width] = v_rows[:, k * rank : k * rank + used] @ b[:, offset : offset + width]
            offset += width
        y[rows] += delta.to(y.dtype)
