"""Random LoRA layers in the kernels' paged layout (`LoraCase`), and the naive per-token float64 loop that
the kernels are checked against, with the tolerance each dtype is held to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import LoRABatch, PageTable
from kernels.layer_adapters import AdapterSlices, LayerAdapters, StackGroup
from kernels.paging import PAGE_RANK, ZERO_PAGE, allocate_buffers, pack_pages, pages_for_rank
from kernels.reference import accumulation_dtype

# float64 is held to float64 accuracy (the reference accumulates in the wider of the input dtype and fp32);
# the others to their own rounding. Any indexing or slicing mistake shows up as an O(1) error.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-4},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 4e-2},
}


@dataclass
class LoraCase:
    """One random layer: inputs in `dtype` and the same values, unpadded, in float64 for the naive loop."""

    x: torch.Tensor  # [T, d_in]
    y: torch.Tensor  # [T, sum(widths)], the base output before LoRA
    lora_a: torch.Tensor  # [pages, K * PAGE_RANK, d_in]
    lora_b: torch.Tensor  # [pages, PAGE_RANK, sum(widths)]
    table: PageTable
    token_slots: list[int]
    widths: tuple[int, ...]
    a: list[list[torch.Tensor | None]]  # a[s][k]: [rank, d_in] float64, None where slot s skips slice k
    b: list[list[torch.Tensor | None]]  # b[s][k]: [width_k, rank] float64

    @property
    def batch(self) -> LoRABatch:
        return LoRABatch.from_token_slots(self.token_slots, device=self.x.device)

    def pages_of(self, slot: int) -> list[int]:
        return [p for p in self.table.pages[slot].tolist() if p != ZERO_PAGE]

    def targets(self, with_weights: bool = False, group: StackGroup | None = None) -> LayerAdapters:
        """Each slot's adapter (`kernels.reference.add_lora`): the slices it targets, and with
        `with_weights` their weights copied out of the pages as a CPU model runner keeps them; in `group` with
        other layers of the shape where given (else a group of its own)."""
        targets = LayerAdapters(group)
        for slot, pages in enumerate(self.table.host_pages):
            slices = tuple(k for k, a_k in enumerate(self.a[slot]) if a_k is not None)
            if pages and with_weights and slices:
                rank = max(self.a[slot][k].shape[0] for k in slices)
                targets[slot] = adapter_slices(self.lora_a, self.lora_b, list(pages), slices, rank, self.widths)
            elif pages:
                targets[slot] = AdapterSlices(slices)
        return targets


def adapter_slices(lora_a: torch.Tensor, lora_b: torch.Tensor, pages: list[int], slices: tuple[int, ...], rank: int,
                   slice_widths: tuple[int, ...]) -> AdapterSlices:
    """The `AdapterSlices` of the adapter of rank `rank` (at most) written in `pages`, with its weights (copied out
    of the pages in the accumulation dtype), as a CPU model runner gives them."""
    num_slices, acc = len(slice_widths), accumulation_dtype(lora_a.dtype)
    a = lora_a[pages].view(len(pages), num_slices, PAGE_RANK, -1).transpose(0, 1).flatten(1, 2)  # [K, n * 16, d_in]
    a_t = a[list(slices), :rank].flatten(0, 1).T.to(acc).contiguous()
    b = lora_b[pages].flatten(0, 1)[:rank].to(acc)
    offsets = [sum(slice_widths[:k]) for k in range(num_slices)]
    flops = 2 * rank * (len(slices) * a.shape[2] + sum(slice_widths[k] for k in slices))
    return AdapterSlices(slices, rank, a_t, tuple(b[:, offsets[k] : offsets[k] + slice_widths[k]].contiguous()
                                                  for k in slices), flops)


def make_case(
    gen: torch.Generator,
    token_slots: list[int],
    num_slots: int,
    max_rank: int,
    d_in: int,
    widths: tuple[int, ...],
    ranks: list[list[int]] | None = None,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
) -> LoraCase:
    """Random x, y and per-slot A/B in paged buffers, as the slot pool lays them out.

    `ranks[s][k]` is the rank of slot s's adapter on slice k (0: the adapter does not target that slice);
    by default every slot uses `max_rank` on every slice. Slot s takes pages for its largest rank, drawn in a
    random order from buffers with two spare pages. Values are scaled so that x, y and every delta are O(1).
    """
    ranks = ranks if ranks is not None else [[max_rank] * len(widths) for _ in range(num_slots)]

    def rounded(*shape: int, std: float = 1.0) -> torch.Tensor:
        """float64 values that are exactly representable in `dtype`."""
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(torch.float64)

    t = len(token_slots)
    pages_needed = [pages_for_rank(max(slot_ranks, default=0)) for slot_ranks in ranks]
    num_pages = 1 + sum(pages_needed) + 2
    order = (1 + torch.randperm(num_pages - 1, generator=gen)).tolist()
    lora_a, lora_b = allocate_buffers(num_pages, d_in, tuple(widths), torch.float64, "cpu")
    table = PageTable.empty(num_slots, max_rank)
    a: list[list[torch.Tensor | None]] = []
    b: list[list[torch.Tensor | None]] = []
    for s in range(num_slots):
        a.append([])
        b.append([])
        for k, width in enumerate(widths):
            rank = ranks[s][k]
            a[s].append(rounded(rank, d_in, std=d_in**-0.5) if rank else None)
            b[s].append(rounded(width, rank, std=rank**-0.5) if rank else None)
        pages = [order.pop() for _ in range(pages_needed[s])]
        slices = [None if a_k is None else (a_k, b_k) for a_k, b_k in zip(a[s], b[s], strict=True)]
        lora_a[pages], lora_b[pages] = pack_pages(slices, d_in, tuple(widths), len(pages), torch.float64)
        table.assign(s, max(ranks[s], default=0), pages)
    return LoraCase(
        x=rounded(t, d_in).to(device, dtype),
        y=rounded(t, sum(widths)).to(device, dtype),
        lora_a=lora_a.to(device, dtype),
        lora_b=lora_b.to(device, dtype),
        table=table.to(device),
        token_slots=list(token_slots),
        widths=tuple(widths),
        a=a,
        b=b,
    )


def naive_shrink(case: LoraCase) -> torch.Tensor:
    """[T, K * R] float64: v[t, k*R : k*R + r] = x[t] @ A_k[slot].T, zero elsewhere."""
    max_rank = case.table.max_rank
    x = case.x.cpu().to(torch.float64)
    v = torch.zeros(len(case.token_slots), len(case.widths) * max_rank, dtype=torch.float64)
    for t, slot in enumerate(case.token_slots):
        if slot < 0:
            continue
        for k, a_k in enumerate(case.a[slot]):
            if a_k is not None:
                v[t, k * max_rank : k * max_rank + a_k.shape[0]] = x[t] @ a_k.T
    return v


def naive_lora(case: LoraCase) -> torch.Tensor:
    """y + the LoRA delta of every token, one token and one slice at a time, in float64."""
    x = case.x.cpu().to(torch.float64)
    y = case.y.cpu().to(torch.float64).clone()
    for t, slot in enumerate(case.token_slots):
        if slot < 0:
            continue
        offset = 0
        for a_k, b_k, width in zip(case.a[slot], case.b[slot], case.widths, strict=True):
            if a_k is not None and b_k is not None:
                y[t, offset : offset + width] += (x[t] @ a_k.T) @ b_k.T
            offset += width
    return y
