"""A linear layer that adds each token's own LoRA delta, without knowing about tenants.

Following vLLM's layering: the layer holds the base weight plus one buffer of A and one of B with a row
block per adapter *slot*; the slot pool writes adapters into slots (`set_slot` / `clear_slot`); the
engine publishes the step's token -> slot metadata once in the shared `LoRAContext`; `forward` does the
base GEMM and then one shrink + one expand over all fused output slices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import LoRABatch, add_lora


class LoRAContext:
    """The current step's LoRA metadata, shared by every LoRA layer of one model.

    `backend` is resolved once when the engine is built ("torch" or "triton"; "auto" decides per call);
    `slot_ranks` [num_slots] int32 on the model's device is each slot's adapter rank, kept by the slot pool,
    so the Triton kernels do rank-r work for a rank-r adapter in a pool of a larger max rank.
    """

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None
        self.backend: str = "auto"
        self.slot_ranks: torch.Tensor | None = None


class LoRALinear(nn.Module):
    """y = x W^T (+ b), W fused from several projections (e.g. q|k|v), plus per-token LoRA.

    `slice_names` are the projections fused in W (PEFT's module names), `slice_widths` their output
    widths; an adapter that targets only some of them has zeros in the others' slot rows.
    """

    def __init__(
        self,
        d_in: int,
        slice_widths: tuple[int, ...],
        slice_names: tuple[str, ...],
        bias: bool,
        context: LoRAContext,
    ):
        super().__init__()
        self.d_in = d_in
        self.slice_widths = slice_widths
        self.slice_names = slice_names
        self.context = context
        self.weight = nn.Parameter(torch.empty(sum(slice_widths), d_in), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(sum(slice_widths)), requires_grad=False) if bias else None
        self.lora_a: torch.Tensor | None = None  # [slots, K * R, d_in]
        self.lora_b: torch.Tensor | None = None  # [slots, sum(widths), R]

    def allocate_slots(self, num_slots: int, max_rank: int) -> None:
        """Reserve zeroed A/B buffers for `num_slots` adapters of rank up to `max_rank`."""
        k = len(self.slice_widths)
        w = self.weight
        self.lora_a = torch.zeros(num_slots, k * max_rank, self.d_in, dtype=w.dtype, device=w.device)
        self.lora_b = torch.zeros(num_slots, sum(self.slice_widths), max_rank, dtype=w.dtype, device=w.device)

    def set_slot(self, slot: int, slices: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Write one adapter into `slot`: per fused slice (A [r, d_in], B*scale [d_out, r]) or None."""
        assert self.lora_a is not None and self.lora_b is not None, "allocate_slots first"
        max_rank = self.lora_b.shape[2]
        self.clear_slot(slot)
        offset = 0
        for k, (width, pair) in enumerate(zip(self.slice_widths, slices, strict=True)):
            if pair is not None:
                a, b = pair
                rank = a.shape[0]
                self.lora_a[slot, k * max_rank : k * max_rank + rank].copy_(a)
                self.lora_b[slot, offset : offset + width, :rank].copy_(b)
            offset += width

    def clear_slot(self, slot: int) -> None:
        assert self.lora_a is not None and self.lora_b is not None
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        batch = self.context.batch
        if batch is not None and self.lora_a is not None:
            add_lora(y, x, self.lora_a, self.lora_b, batch, self.slice_widths, self.context.slot_ranks,
                     self.context.backend)
        return y
