"""A linear layer that adds each token's own LoRA delta, without knowing about tenants.

Following vLLM's layering: the layer wraps a base layer (`y = base(x)`: today an `nn.Linear`; a quantized or
tensor-parallel linear plugs in the same way, LoRA untouched) and holds one paged buffer of A and one of B
(`kernels.paging`); the model runner writes an adapter's packed rows into pages (`write_pages`), keeps the page
table and publishes the step's token -> slot metadata once in the shared `LoRAContext`; `forward` runs the base layer
and then one shrink + one expand over all fused output slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kernels import LoRABatch, PageTable, add_lora
from kernels.paging import PAGE_RANK, PageRows, allocate_buffers, page_bytes
from kernels.reference import AdapterSlices, LayerAdapters, adapter_slices
from server.adapter_packer import PackedWeight


class LoRAContext:
    """The current step's LoRA metadata, shared by every LoRA layer of one model.

    `backend` is resolved once when the engine is built ("torch" or "triton"; "auto" decides per call);
    `table` holds each slot's pages and rank, kept by the model runner.
    """

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None
        self.backend: str = "auto"
        self.table: PageTable | None = None


def fused_linear(d_in: int, slice_widths: tuple[int, ...], bias: bool) -> nn.Linear:
    """The frozen base layer of a `LoRALinear`: one weight for all fused projections, left uninitialised (a
    checkpoint fills it; a random init would cost seconds on a large model and draw from the global RNG). Its
    tensors go on the default device and dtype, so a model built under `torch.device(...)` is built there."""
    d_out = sum(slice_widths)
    linear = nn.Linear(d_in, d_out, bias=bias, device="meta")  # shapes only; the tensors come next
    linear.weight = nn.Parameter(torch.empty(d_out, d_in), requires_grad=False)
    if bias:
        linear.bias = nn.Parameter(torch.zeros(d_out), requires_grad=False)
    return linear


class LoRALinear(nn.Module):
    """y = base(x), the base fusing several projections (e.g. q|k|v), plus per-token LoRA.

    `base` is any module with `in_features` and `out_features` that maps [T, in] to [T, out] in the
    activations' dtype (`nn.Linear`, or a quantized or sharded linear); LoRA never looks at its weights. The
    pages take the dtype and device the model runner allocates them in. `slice_names` are the projections
    fused in it (PEFT's module names), `slice_widths` their output widths; an adapter that targets only some
    of them has zeros in the others' rows of its pages.
    """

    def __init__(
        self,
        base: nn.Module,
        slice_widths: tuple[int, ...],
        slice_names: tuple[str, ...],
        context: LoRAContext,
    ):
        super().__init__()
        if sum(slice_widths) != base.out_features:
            raise ValueError(f"slices {slice_widths} do not add up to the base layer's {base.out_features} outputs")
        self.base = base
        self.d_in: int = base.in_features
        self.slice_widths = slice_widths
        self.slice_names = slice_names
        self.context = context
        self.lora_a: torch.Tensor | None = None  # [pages, K * PAGE_RANK, d_in]
        self.lora_b: torch.Tensor | None = None  # [pages, PAGE_RANK, sum(widths)]
        # Each adapter written here, by its first page, as the torch reference reads it (`AdapterSlices`).
        self.targets = LayerAdapters()

    def page_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one page of A and B in `dtype`."""
        return page_bytes(self.d_in, self.slice_widths, dtype)

    def allocate_pages(self, num_pages: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """Reserve zeroed A/B buffers of `num_pages` pages (page 0, the zero page, included)."""
        self.lora_a, self.lora_b = allocate_buffers(num_pages, self.d_in, self.slice_widths, dtype, device)

    def write_pages(self, pages: PageRows, slices: Sequence[PackedWeight | None]) -> None:
        """Write one adapter into `pages`: per fused slice its packed rank rows, None where it does not target
        the slice. Everything else in those pages (untargeted slices, rows past a slice's rank) becomes zero,
        so that whatever a freed page held before cannot leak in."""
        assert self.lora_a is not None and self.lora_b is not None, "allocate_pages first"
        device = self.lora_a.device
        full_rank = len(pages.pages) * PAGE_RANK
        if not all(w is not None and w.a.shape[0] == full_rank for w in slices):  # else every row is written
            self.lora_a.index_fill_(0, pages.index, 0)
            self.lora_b.index_fill_(0, pages.index, 0)
        a_rows = self.lora_a.view(-1, self.d_in)
        b_rows = self.lora_b.view(-1, sum(self.slice_widths))
        offset = 0
        for k, (width, weight) in enumerate(zip(self.slice_widths, slices, strict=True)):
            if weight is not None:
                rank = weight.a.shape[0]
                a_rows.index_copy_(0, pages.a_rows(len(slices), k, rank), weight.a.to(device, non_blocking=True))
                b_rows[:, offset : offset + width].index_copy_(
                    0, pages.b_rows(rank), weight.b_t.to(device, non_blocking=True))
            offset += width
        if pages.pages:
            self.targets[pages.pages[0]] = self._adapter_slices(pages.pages, slices)

    def _adapter_slices(self, pages: list[int], slices: Sequence[PackedWeight | None]) -> AdapterSlices:
        """What the torch reference reads of the adapter just written: on a CPU its weights too, copied out of
        the pages (the CPU's device tier then holds an adapter twice), elsewhere only the slices it targets."""
        targeted = tuple(k for k, weight in enumerate(slices) if weight is not None)
        if self.lora_a.device.type != "cpu" or not targeted:
            return AdapterSlices(targeted)
        rank = max(slices[k].a.shape[0] for k in targeted)
        return adapter_slices(self.lora_a, self.lora_b, pages, targeted, rank, self.slice_widths)

    def forget(self, first_page: int) -> None:
        """Drop what `write_pages` kept of the adapter whose first page is `first_page` (its slot was cleared)."""
        self.targets.pop(first_page, None)
        self.targets.stacked = None  # it may hold the adapter: rebuilt for the next batch that wants it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.context.batch
        if batch is not None and self.lora_a is not None:
            assert self.context.table is not None, "the slot pool publishes the page table"
            add_lora(y, x, self.lora_a, self.lora_b, batch, self.slice_widths, self.context.table, self.context.backend,
                     self.targets)
        return y
