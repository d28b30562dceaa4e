"""Paged adapter weights: the LoRA buffers hold pages of `PAGE_RANK` rank rows, not whole max-rank slots.

An adapter of rank r takes `pages_for_rank(r)` pages, the same page numbers in every LoRA layer, so the
device tier spends memory in proportion to rank (S-LoRA's unified paging, at a granularity of 16 ranks):
a byte budget that holds 8 rank-64 adapters holds 32 rank-16 ones. A *slot* is one row of the page table;
the step's token -> slot metadata (`LoRABatch`) is unchanged, and each slot names its pages.

Buffers of one layer (K fused slices, D the sum of their widths, page p = pages[slot, j]):
  lora_a: [num_pages, K * PAGE_RANK, d_in]  row k * PAGE_RANK + i of page p = rank row j * PAGE_RANK + i of A_k
  lora_b: [num_pages, PAGE_RANK, D]         row i of page p = rank j * PAGE_RANK + i of B (scale folded in),
                                            i.e. B transposed: one rank's D outputs are contiguous
B is rank-major so that a low-rank adapter reads whole memory sectors: with B stored [D, R] each output row
held only r useful elements, which for r < 16 in a half type is less than one 32-byte sector.

Page `ZERO_PAGE` (0) is all zeros and never handed out. A slot's page-table entries past its rank point
there, so code that reads a whole page-table row reads zeros past an adapter's rank.

An adapter that scales outputs or inputs (DoRA, IA3) has one more page, its *vector page* (`scale_pages[slot]`),
holding vectors instead of rank rows (`kernels.scales`): row 0 of its B page the output scale minus one (zero for
outputs it does not scale), row 1 an output shift (DoRA on a layer with a bias), row 0 of its A page the input
scale minus one. Stored minus one so that the zero page, every other slot's, scales by one: nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAGE_RANK = 16  # rank rows per page: the kernels' rank block, the smallest dimension a tensor-core dot takes
ZERO_PAGE = 0

# One adapter's A and B for one fused slice: (A [r, d_in], B [d_out_k, r]) with the LoRA scale folded into B,
# or None where the adapter does not target that slice.
SliceWeights = tuple[torch.Tensor, torch.Tensor] | None


def pages_for_rank(rank: int) -> int:
    return -(-rank // PAGE_RANK)


@dataclass(frozen=True)
class PageTable:
    """Each slot's adapter rank and pages, on the model's device; updated in place by the slot pool, so a
    captured step sees the current values. `host_pages` and `host_ranks` mirror each slot's pages and rank in
    host memory, for the torch reference, which reads them without a device round trip."""

    ranks: torch.Tensor  # [num_slots] int32; 0 for an empty slot
    pages: torch.Tensor  # [num_slots, max_pages] int32; ZERO_PAGE past the slot's rank
    host_pages: list[tuple[int, ...]]  # each slot's own pages, none past its rank
    host_ranks: list[int]  # each slot's rank
    # [num_slots + 1] int32: each slot's vector page, ZERO_PAGE for none; the last entry stays ZERO_PAGE, so that
    # indexing with a token's slot -1 reads "none"
    scale_pages: torch.Tensor
    has_vectors: list[bool]  # [num_slots]: its adapter scales outputs or inputs, in pages or not

    @classmethod
    def empty(cls, num_slots: int, max_rank: int, device: torch.device | str = "cpu") -> PageTable:
        return cls(
            ranks=torch.zeros(num_slots, dtype=torch.int32, device=device),
            pages=torch.full((num_slots, pages_for_rank(max_rank)), ZERO_PAGE, dtype=torch.int32, device=device),
            host_pages=[()] * num_slots,
            host_ranks=[0] * num_slots,
            scale_pages=torch.full((num_slots + 1,), ZERO_PAGE, dtype=torch.int32, device=device),
            has_vectors=[False] * num_slots,
        )

    def to(self, device: torch.device | str) -> PageTable:
        return PageTable(self.ranks.to(device), self.pages.to(device), list(self.host_pages), list(self.host_ranks),
                         self.scale_pages.to(device), list(self.has_vectors))

    @property
    def max_rank(self) -> int:
        """The rank every slot could hold: the width of one slice's block of v."""
        return self.pages.shape[1] * PAGE_RANK

    def assign(self, slot: int, rank: int, pages: list[int], scale_page: int = ZERO_PAGE,
               has_vectors: bool = False) -> None:
        """Point `slot` at its adapter's rank pages and vector page (ZERO_PAGE: none, or not held in pages)."""
        self.pages[slot].fill_(ZERO_PAGE)
        if pages:
            self.pages[slot, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.ranks[slot] = rank
        self.host_pages[slot] = tuple(pages[: pages_for_rank(rank)])
        self.host_ranks[slot] = rank
        self.scale_pages[slot] = scale_page
        self.has_vectors[slot] = has_vectors

    def clear(self, slot: int) -> None:
        self.assign(slot, 0, [])


class PageRows:
    """Where an adapter's rank rows go in the page buffers of the pages it was given, for writing it row by row.

    Rank row i lives in row i % PAGE_RANK of page pages[i // PAGE_RANK]. Seen as rows, lora_a is
    [num_pages * K * PAGE_RANK, d_in] (slice k's rows of page p start at (p * K + k) * PAGE_RANK) and lora_b is
    [num_pages * PAGE_RANK, D]. The row indices are made once per (K, k, rank) and shared by every layer of one
    load, on `device`."""

    def __init__(self, pages: list[int], device: torch.device | str) -> None:
        self.pages = pages
        self.device = device
        self.index = torch.tensor(pages, dtype=torch.int64).to(device, non_blocking=True)  # the pages themselves
        self._rows: dict[tuple[int, int, int], torch.Tensor] = {}

    def a_rows(self, num_slices: int, k: int, rank: int) -> torch.Tensor:
        """Rows of lora_a that hold rank rows 0 .. rank-1 of slice `k` of `num_slices`."""
        return self._cached(num_slices, k, rank)

    def b_rows(self, rank: int) -> torch.Tensor:
        """Rows of lora_b that hold rank rows 0 .. rank-1."""
        return self._cached(1, 0, rank)

    def _cached(self, num_slices: int, k: int, rank: int) -> torch.Tensor:
        key = (num_slices, k, rank)
        if key not in self._rows:
            if rank > len(self.pages) * PAGE_RANK:
                raise ValueError(f"rank {rank} does not fit {len(self.pages)} pages of {PAGE_RANK} ranks")
            rows = [(self.pages[i // PAGE_RANK] * num_slices + k) * PAGE_RANK + i % PAGE_RANK for i in range(rank)]
            self._rows[key] = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        return self._rows[key]


def allocate_buffers(
    num_pages: int, d_in: int, slice_widths: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed (lora_a, lora_b) of `num_pages` pages, page 0 included."""
    k = len(slice_widths)
    lora_a = torch.zeros(num_pages, k * PAGE_RANK, d_in, dtype=dtype, device=device)
    lora_b = torch.zeros(num_pages, PAGE_RANK, sum(slice_widths), dtype=dtype, device=device)
    return lora_a, lora_b


def page_bytes(d_in: int, slice_widths: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes one page takes in one layer's A and B buffers."""
    return (len(slice_widths) * d_in + sum(slice_widths)) * PAGE_RANK * torch.finfo(dtype).bits // 8


def pack_pages(
    slices: list[SliceWeights],
    d_in: int,
    slice_widths: tuple[int, ...],
    num_pages: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter's weights laid out as `num_pages` pages: (A pages, B pages) on `device`.

    Ranks past an adapter's rank, and slices it does not target, are zeros. Built whole off the buffers so
    that loading it into them is one copy per buffer.
    """
    rows = num_pages * PAGE_RANK
    a_pages = torch.zeros(num_pages, len(slice_widths), PAGE_RANK, d_in, dtype=dtype, device=device)
    b_pages = torch.zeros(num_pages, PAGE_RANK, sum(slice_widths), dtype=dtype, device=device)
    b_rows = b_pages.view(rows, sum(slice_widths))
    offset = 0
    for index, (width, weights) in enumerate(zip(slice_widths, slices, strict=True)):
        if weights is not None:
            a, b = weights
            rank = a.shape[0]
            if rank > rows:
                raise ValueError(f"a slice of rank {rank} does not fit {num_pages} pages of {PAGE_RANK} ranks")
            a_rows = torch.zeros(rows, d_in, dtype=dtype, device=device)
            a_rows[:rank] = a
            a_pages[:, index] = a_rows.view(num_pages, PAGE_RANK, d_in)
            b_rows[:rank, offset : offset + width] = b.T
        offset += width
    return a_pages.view(num_pages, len(slice_widths) * PAGE_RANK, d_in), b_pages


def pack_dense(
    lora_a: torch.Tensor, lora_b: torch.Tensor, slice_widths: tuple[int, ...], ranks: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, PageTable]:
    """Per-slot dense buffers (A [S, K * R, d_in], B [S, D, R]) as paged buffers and their page table.

    For benchmarks and tests that think in slots: slot s gets pages 1 + s * P ... 1 + (s + 1) * P - 1 (P
    pages hold the max rank R). `ranks` (default R for every slot) are the table's ranks.
    """
    num_slots, _, d_in = lora_a.shape
    max_rank = lora_b.shape[2]
    per_slot = pages_for_rank(max_rank)
    table = PageTable.empty(num_slots, max_rank, lora_a.device)
    a_pages, b_pages = allocate_buffers(1 + num_slots * per_slot, d_in, slice_widths, lora_a.dtype, lora_a.device)
    offsets = [sum(slice_widths[:k]) for k in range(len(slice_widths))]
    for slot in range(num_slots):
        slices: list[SliceWeights] = [
            (lora_a[slot, k * max_rank : (k + 1) * max_rank], lora_b[slot, offset : offset + width])
            for k, (offset, width) in enumerate(zip(offsets, slice_widths, strict=True))
        ]
        pages = list(range(1 + slot * per_slot, 1 + (slot + 1) * per_slot))
        a_pages[pages], b_pages[pages] = pack_pages(slices, d_in, slice_widths, per_slot, lora_a.dtype, lora_a.device)
        table.assign(slot, max_rank if ranks is None else ranks[slot], pages)
    return a_pages, b_pages, table
