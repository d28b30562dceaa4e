"""Pure-torch reference of the Punica shrink/expand contract.

Shapes (S slots, R the pool's max rank, K slices fused in one layer):
  x: [T, d_in]                      the layer's input
  lora_a: [S, K * R, d_in]          the K slices' A matrices stacked along the rank axis
  lora_b: [S, sum(d_out_k), R]      the K slices' B matrices (scale already folded in) stacked along d_out
  y: [T, sum(d_out_k)]              the base layer's output, updated in place

shrink: v[t, k*R:(k+1)*R] = x[t] @ A_k[slot[t]]^T
expand: y[t, off_k:off_k+d_k] += v[t, k*R:(k+1)*R] @ B_k[slot[t]]^T

Tokens are processed per distinct slot (gather the slot's rows, two matmuls, scatter back), so the work
is one pair of GEMMs per adapter present in the batch, not a [T, R, d_in] gather of weights.
"""

from __future__ import annotations

import torch

from kernels.metadata import LoRABatch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (an fp16 intermediate loses the delta), the input's own type when wider."""
    return torch.promote_types(dtype, torch.float32)


def shrink(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """v = x @ A[slot]^T for every token with a slot; zero rows for slot -1. At least fp32."""
    acc = accumulation_dtype(x.dtype)
    v = torch.zeros(x.shape[0], lora_a.shape[1], dtype=acc, device=x.device)
    for slot in batch.active_slots:
        rows = batch.token_slots == slot
        v[rows] = x[rows].to(acc) @ lora_a[slot].to(acc).T
    return v


def expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    slice_widths: tuple[int, ...],
) -> None:
    """y[:, slice k] += v[:, rank block k] @ B_k[slot]^T, in place; slot -1 rows untouched."""
    rank = lora_b.shape[2]
    for slot in batch.active_slots:
        rows = batch.token_slots == slot
        v_rows = v[rows]
        delta = torch.empty(v_rows.shape[0], lora_b.shape[1], dtype=v.dtype, device=y.device)
        offset = 0
        for k, width in enumerate(slice_widths):
            b_k = lora_b[slot, offset : offset + width].to(v.dtype)
            delta[:, offset : offset + width] = v_rows[:, k * rank : (k + 1) * rank] @ b_k.T
            offset += width
        y[rows] += delta.to(y.dtype)
