"""The one function the model calls to add the LoRA delta of a mixed batch."""

from __future__ import annotations

import torch

from kernels import reference
from kernels.metadata import LoRABatch


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    slice_widths: tuple[int, ...],
) -> None:
    """y += per-token LoRA delta (shrink then multi-slice expand), in place.

    A step whose tokens all use slot -1 returns at once: base-model traffic pays nothing for LoRA.
    """
    if not batch.has_lora or x.shape[0] == 0:
        return
    v = reference.shrink(x, lora_a, batch)
    reference.expand(y, v, lora_b, batch, slice_widths)
