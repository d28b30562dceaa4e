"""A linear layer that adds each token's own LoRA delta, without knowing about tenants.

Following vLLM's layering: the layer wraps a base layer (`y = base(x)`: today an `nn.Linear`; a quantized or
tensor-parallel linear plugs in the same way, LoRA untouched) and holds one paged buffer of A and one of B
(`kernels.paging`); the model runner writes an adapter into pages (`write_pages`), keeps the page table and
publishes the step's token -> slot metadata once in the shared `LoRAContext`; `forward` runs the base layer
and then one shrink + one expand over all fused output slices.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import LoRABatch, PageTable, add_lora
from kernels.paging import SliceWeights, allocate_buffers, pack_pages, page_bytes


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

    def page_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one page of A and B in `dtype`."""
        return page_bytes(self.d_in, self.slice_widths, dtype)

    def allocate_pages(self, num_pages: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """Reserve zeroed A/B buffers of `num_pages` pages (page 0, the zero page, included)."""
        self.lora_a, self.lora_b = allocate_buffers(num_pages, self.d_in, self.slice_widths, dtype, device)

    def pack(self, slices: list[SliceWeights], num_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One adapter's weights for this layer as `num_pages` pages, in host memory, ready to copy."""
        assert self.lora_a is not None, "allocate_pages first"
        return pack_pages(slices, self.d_in, self.slice_widths, num_pages, self.lora_a.dtype)

    def write_pages(self, pages: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Copy `pack`'s output into `pages` (int64 indices on this layer's device)."""
        assert self.lora_a is not None and self.lora_b is not None, "allocate_pages first"
        a_pages, b_pages = packed
        device = self.lora_a.device
        self.lora_a.index_copy_(0, pages, a_pages.to(device, non_blocking=True))
        self.lora_b.index_copy_(0, pages, b_pages.to(device, non_blocking=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.context.batch
        if batch is not None and self.lora_a is not None:
            assert self.context.table is not None, "the slot pool publishes the page table"
            add_lora(y, x, self.lora_a, self.lora_b, batch, self.slice_widths, self.context.table, self.context.backend)
        return y
