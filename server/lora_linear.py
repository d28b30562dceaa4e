"""A linear layer that adds each token's own LoRA delta, without knowing about tenants.

Following vLLM's layering: the layer wraps a base layer (`y = base(x)`: today an `nn.Linear`; a quantized or
tensor-parallel linear plugs in the same way, LoRA untouched) and holds one paged buffer of A and one of B
(`kernels.paging`); the model runner writes an adapter's packed rows into pages (`write_pages`), keeps the page
table and publishes the step's token -> slot metadata once in the shared `LoRAContext`; `forward` runs the base layer
and then one shrink + one expand over all fused output slices. A CPU model runner with the torch kernels allocates
no pages: it hands the layer the host tier's packed weights (`hold`), which the torch reference reads where they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels import LoRABatch, PageTable, add_lora
from kernels.layer_adapters import AdapterSlices, LayerAdapters, StackGroup
from kernels.paging import PAGE_RANK, PageRows, allocate_buffers, page_bytes
from kernels.reference import accumulation_dtype
from kernels.scales import (
    IN_SCALE_ROW,
    OUT_SCALE_ROW,
    OUT_SHIFT_ROW,
    dora_output_scale,
    scale_inputs,
    scale_outputs,
    scaled_slots,
)
from server.adapter_packer import PackedScale, PackedWeight


class LoRAContext:
    """The current step's LoRA metadata, shared by every LoRA layer of one model.

    `backend` is resolved once when the engine is built ("torch" or "triton"; "auto" decides per call);
    `table` holds each slot's pages and rank, kept by the model runner.
    """

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None
        self.backend: str = "auto"
        self.table: PageTable | None = None
        # Bytes the torch reference's kept stacks (`kernels.layer_adapters.AdapterStack`) may take in all layers
        # together, which the model runner shares out to its groups of layers; None: no bound (set by the server at
        # start-up).
        self.stack_bytes: int | None = None


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
        # Each adapter written or held here, by slot, as the torch reference reads it (`AdapterSlices`).
        self.targets = LayerAdapters()

    def page_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one page of A and B in `dtype`."""
        return page_bytes(self.d_in, self.slice_widths, dtype)

    def allocate_pages(self, num_pages: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """Reserve zeroed A/B buffers of `num_pages` pages (page 0, the zero page, included)."""
        self.lora_a, self.lora_b = allocate_buffers(num_pages, self.d_in, self.slice_widths, dtype, device)

    def drop_adapters(self, group: StackGroup | None = None) -> None:
        """Forget every adapter and free the pages (a new model runner, or the memory profile, is done with them);
        batches of many adapters are then read from the stack of `group`, the layers of this shape (a group of its
        own when None)."""
        self.lora_a = self.lora_b = None
        self.targets = LayerAdapters(group)

    @property
    def rank_row_elements(self) -> int:
        """Elements one rank of an adapter on every slice takes here: A's row of each slice and B's column."""
        return len(self.slice_widths) * self.d_in + sum(self.slice_widths)

    def write_pages(self, slot: int, pages: PageRows, slices: Sequence[PackedWeight | None],
                    scales: Sequence[PackedScale | None] = (), vector_page: int | None = None) -> None:
        """Write `slot`'s adapter into `pages`: per fused slice its packed rank rows, None where it does not target
        the slice. Everything else in those pages (untargeted slices, rows past a slice's rank) becomes zero,
        so that whatever a freed page held before cannot leak in. An adapter with vectors (DoRA's magnitudes,
        IA3's `scales` per slice) has them written into `vector_page` (`kernels.scales`)."""
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
        self.targets[slot] = AdapterSlices(tuple(k for k, weight in enumerate(slices) if weight is not None))
        if vector_page is not None:
            self._write_vector_page(vector_page, *self._vectors(slices, scales))

    def _write_vector_page(self, page: int, out_scale: torch.Tensor | None, out_shift: torch.Tensor | None,
                           in_scale: torch.Tensor | None) -> None:
        """The vectors' rows of `page`, zeros where the adapter has none in this layer."""
        self.lora_a[page].zero_()
        self.lora_b[page].zero_()
        for buffer, row, vector in ((self.lora_b, OUT_SCALE_ROW, out_scale), (self.lora_b, OUT_SHIFT_ROW, out_shift),
                                    (self.lora_a, IN_SCALE_ROW, in_scale)):
            if vector is not None:
                buffer[page, row].copy_(vector)

    def _vectors(self, slices: Sequence[PackedWeight | None], scales: Sequence[PackedScale | None]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(output scale, output shift, input scale) of an adapter in this layer, each minus one where a scale and
        None where it has none (`kernels.scales`), in float32. DoRA's scale is its magnitude over the row norms of
        this layer's weight plus the adapter's B A: the one place LoRA reads the base layer's weight."""
        device = self.base.weight.device
        bias = getattr(self.base, "bias", None)
        out_scale: list[tuple[slice, torch.Tensor]] = []  # (output columns of the fused layer, values)
        out_shift: list[tuple[slice, torch.Tensor]] = []
        in_scale = None
        offset = 0
        for k, size in enumerate(self.slice_widths):
            weight = slices[k] if k < len(slices) else None
            scale = scales[k] if k < len(scales) else None
            part = slice(offset, offset + size)
            offset += size
            if weight is not None and weight.magnitude is not None:
                g = dora_output_scale(self.base.weight[part], weight.a.to(device), weight.b_t.to(device),
                                      weight.magnitude.to(device))
                out_scale.append((part, g - 1))
                if bias is not None:  # DoRA leaves the bias unscaled: take back what the scale adds to it
                    out_shift.append((part, -(g - 1) * bias[part].float()))
            elif scale is not None and not scale.on_input:
                out_scale.append((part, scale.vector.to(device).float() - 1))
            elif scale is not None:
                if len(self.slice_widths) != 1:
                    raise ValueError(f"IA3 cannot scale the input of {self.slice_names[k]} alone: "
                                     f"{', '.join(self.slice_names)} read it in one base layer")
                in_scale = scale.vector.to(device).float() - 1
        return self._joined(out_scale), self._joined(out_shift), in_scale

    def _joined(self, parts: list[tuple[slice, torch.Tensor]]) -> torch.Tensor | None:
        """One vector over the fused layer's outputs from its slices' parts, zeros elsewhere; None without parts."""
        if not parts:
            return None
        vector = torch.zeros(sum(self.slice_widths), device=self.base.weight.device)
        for part, values in parts:
            vector[part] = values
        return vector

    def hold(self, slot: int, slices: Sequence[PackedWeight | None], scales: Sequence[PackedScale | None] = ()
             ) -> None:
        """Serve `slot`'s adapter from its packed weights as they are (per fused slice its rows, None where it does
        not target the slice): views of the host tier's buffer, copied only where the slices' A rows are not one
        block there (different ranks) or the weights are narrower than the accumulation dtype. Its vectors (DoRA's
        scale, IA3's `scales`) are worked out here, in the weights' dtype."""
        targeted = tuple(k for k, weight in enumerate(slices) if weight is not None)
        dtype = next((t.dtype for t in [*(w.a for w in slices if w), *(s.vector for s in scales if s)]), None)
        vectors = {name: None if vector is None else vector.to(dtype)
                   for name, vector in zip(("out_scale", "out_shift", "in_scale"), self._vectors(slices, scales),
                                           strict=True)}
        if not targeted:
            self.targets[slot] = AdapterSlices((), **vectors)
            return
        acc = accumulation_dtype(slices[targeted[0]].a.dtype)
        ranks = {slices[k].a.shape[0] for k in targeted}
        rank = max(ranks)
        if len(ranks) == 1:
            a = _as_one_block([slices[k].a for k in targeted])
            b = tuple(slices[k].b_t for k in targeted)
        else:  # ranks differ per module (PEFT's rank_pattern): each padded with zero rows to the largest
            a = torch.cat([F.pad(slices[k].a, (0, 0, 0, rank - slices[k].a.shape[0])) for k in targeted])
            b = tuple(F.pad(slices[k].b_t, (0, 0, 0, rank - slices[k].b_t.shape[0])) for k in targeted)
        flops = 2 * rank * (len(targeted) * self.d_in + sum(self.slice_widths[k] for k in targeted))
        self.targets[slot] = AdapterSlices(targeted, rank, a.to(acc).T, tuple(w.to(acc) for w in b), flops,
                                           **vectors)

    def forget(self, slot: int) -> None:
        """Drop what `write_pages` or `hold` kept of `slot`'s adapter (its slot was cleared)."""
        self.targets.forget(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, table = self.context.batch, self.context.table
        if batch is None or (self.lora_a is None and not self.targets):
            return self.base(x)
        assert table is not None, "the slot pool publishes the page table"
        scaled = bool(scaled_slots(batch, table))
        if scaled and len(self.slice_widths) == 1:  # only a layer with its input to itself has input scales
            y = self.base(scale_inputs(x, batch, table, self.lora_a, self.targets))
        else:
            y = self.base(x)
        # Without pages (a CPU runner, no CUDA graph to keep whole) a layer no held adapter has weights in adds nothing:
        # with q,v adapters, three of a block's four LoRA layers.
        if self.lora_a is not None or self.targets.weighted:
            add_lora(y, x, self.lora_a, self.lora_b, batch, self.slice_widths, table, self.context.backend,
                     self.targets)
        if scaled:
            scale_outputs(y, batch, table, self.lora_b, self.targets, getattr(self.base, "bias", None) is not None)
        return y


def _as_one_block(rows: list[torch.Tensor]) -> torch.Tensor:
    """The row blocks stacked: a view where each follows the one before it in their buffer (the packer lays a
    layer's A blocks out so), else a copy."""
    first = rows[0]
    storage = first.untyped_storage().data_ptr()
    follows = all(r.is_contiguous() and r.untyped_storage().data_ptr() == storage for r in rows)
    offset = first.storage_offset()
    for r in rows:
        follows = follows and r.storage_offset() == offset
        offset += r.numel()
    if not follows:
        return torch.cat(rows)
    return first.as_strided((sum(r.shape[0] for r in rows), first.shape[1]), (first.shape[1], 1))
