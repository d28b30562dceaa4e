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

The tokens with a slot are gathered once per call, grouped by slot (`LoRABatch.by_slot`), so each adapter's
rows are one contiguous block: the work is one pair of GEMMs per adapter present in the batch on its own
pages, with one gather and one scatter for the whole batch, not a [T, R, d_in] gather of weights.
"""

from __future__ import annotations

import torch

from kernels.metadata import LoRABatch
from kernels.paging import PAGE_RANK, PageTable


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (an fp16 intermediate loses the delta), the input's own type when wider."""
    return torch.promote_types(dtype, torch.float32)


def _slot_pages(table: PageTable, slot: int) -> slice | list[int]:
    """An index of the pages that hold the slot's adapter (those past its rank would only add zeros): a slice
    when they are consecutive, as one page always is, so that indexing the buffers copies nothing."""
    pages = table.host_pages[slot]
    if pages and list(pages) == list(range(pages[0], pages[0] + len(pages))):
        return slice(pages[0], pages[0] + len(pages))
    return list(pages)


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
    if not batch.has_lora:
        return v
    grouped_x = x[batch.by_slot].to(acc)
    grouped_v = torch.zeros(len(batch.by_slot), num_slices, table.max_rank, dtype=acc, device=x.device)
    for slot, start, end in batch.slot_runs:
        a = slot_a(lora_a, table, slot).to(acc)  # [K, r', d_in], r' the slot's rank rounded up to pages
        used = a.shape[1]
        if used:  # an adapter without weights (rank 0) adds nothing
            grouped_v[start:end, :, :used] = (grouped_x[start:end] @ a.flatten(0, 1).T).view(-1, num_slices, used)
    v[batch.by_slot] = grouped_v.flatten(1)
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
    if not batch.has_lora:
        return
    rank = table.max_rank
    grouped_v = v[batch.by_slot]
    delta = torch.zeros(len(batch.by_slot), y.shape[1], dtype=v.dtype, device=y.device)
    for slot, start, end in batch.slot_runs:
        b = slot_b(lora_b, table, slot).to(v.dtype)  # [r', D]
        used = b.shape[0]
        offset = 0
        for k, width in enumerate(slice_widths):
            torch.matmul(grouped_v[start:end, k * rank : k * rank + used], b[:, offset : offset + width],
                         out=delta[start:end, offset : offset + width])
            offset += width
    y.index_add_(0, batch.by_slot, delta.to(y.dtype))
