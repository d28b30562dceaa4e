"""Before the Triton kernels serve, they compute one small mixed batch on the real device and must agree with
the torch reference: a kernel that is wrong on some GPU (a compiler bug, an untested architecture) then costs
speed, never wrong tokens.

The batch crosses what the kernels specialise on: several adapters of different ranks in one pool (rank-aware
work, a partly used page), a token with no adapter, fused output slices of different widths, and a d_in that
spans several of the shrink's column blocks.
"""

from __future__ import annotations

from types import ModuleType

import torch

from kernels import reference
from kernels.metadata import LoRABatch
from kernels.paging import pack_dense

SLICE_WIDTHS = (96, 32)
D_IN = 320
RANKS = [8, 16, 32]
TOKEN_SLOTS = [0, 0, 1, -1, 2, 2, 2, 1, 0]
# Relative error allowed: the kernels round v to fp32 and accumulate in fp32; half inputs round once more.
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-3, torch.float64: 1e-6}


def disagreement(ops: ModuleType, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `ops.add_lora` matches the reference on `device` in `dtype`; else what went wrong."""
    gen = torch.Generator().manual_seed(0)
    max_rank = max(RANKS)
    dense_a = torch.randn(len(RANKS), len(SLICE_WIDTHS) * max_rank, D_IN, generator=gen) / D_IN**0.5
    dense_b = torch.randn(len(RANKS), sum(SLICE_WIDTHS), max_rank, generator=gen)
    for slot, rank in enumerate(RANKS):  # as the pool writes them: rows past an adapter's rank are zero
        dense_a[slot].view(len(SLICE_WIDTHS), max_rank, D_IN)[:, rank:] = 0
        dense_b[slot, :, rank:] = 0
    x = torch.randn(len(TOKEN_SLOTS), D_IN, generator=gen)
    y = torch.randn(len(TOKEN_SLOTS), sum(SLICE_WIDTHS), generator=gen)

    def run(use_ops: ModuleType | None, on: torch.device, as_type: torch.dtype) -> torch.Tensor:
        lora_a, lora_b, table = pack_dense(dense_a.to(on, as_type), dense_b.to(on, as_type), SLICE_WIDTHS, RANKS)
        batch = LoRABatch.from_token_slots(TOKEN_SLOTS, on)
        out = y.to(on, as_type, copy=True)  # never y itself: it is the baseline of both runs
        if use_ops is None:
            reference.expand(out, reference.shrink(x.to(on, as_type), lora_a, batch, table), lora_b, batch,
                             SLICE_WIDTHS, table)
        else:
            use_ops.add_lora(out, x.to(on, as_type), lora_a, lora_b, batch, SLICE_WIDTHS, table)
        return out.to("cpu", torch.float64)

    try:
        got = run(ops, device, dtype)
    except Exception as exc:  # noqa: BLE001 - any failure to compile or launch means: do not serve with it
        return f"the kernels failed on a test batch: {type(exc).__name__}: {exc}"
    expected = run(None, torch.device("cpu"), torch.float64)
    delta, base = expected - y.double(), got - y.double()
    error = (base - delta).norm().item() / max(delta.norm().item(), 1e-30)
    if not error <= TOLERANCE[dtype]:  # also catches NaN
        return f"their LoRA delta differs from the reference's by {error:.2e} (relative; {TOLERANCE[dtype]} allowed)"
    return None
