"""Before the Triton kernels serve, they compute small batches on the real device and must agree with the torch
reference: a kernel that is wrong on some GPU (a compiler bug, an untested architecture) then costs speed, never
wrong tokens.

LoRA (`disagreement`): one mixed batch that crosses what the kernels specialise on: several adapters of different
ranks in one pool (rank-aware work, a partly used page), a token with no adapter, fused output slices of different
widths, and a d_in that spans several of the shrink's column blocks.

Paged attention (`attention_disagreement`): a decode step and a mixed prefill/extend step in the model's own head
shape, cache block size and sliding window (what the kernels are compiled for), over blocks scattered through
the cache: whole prompts, a chunk on a cached prefix, decode tokens, contexts crossing block edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from kernels import attention_reference, reference
from kernels.attention_metadata import AttentionBatch
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


@dataclass(frozen=True)
class AttentionShape:
    """What the attention kernels are compiled for: the model's heads, the cache's block size, the window."""

    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16
    window: int | None = None


# (context length, new tokens) per sequence: decode tokens on both sides of a block edge; then a mixed step of a
# one-token prompt, a whole prompt, a chunk on a cached prefix and a decode token.
DECODE_STEP = [(1, 1), (17, 1), (40, 1)]
MIXED_STEP = [(1, 1), (20, 20), (45, 12), (33, 1)]


def attention_disagreement(ops: ModuleType, device: torch.device, dtype: torch.dtype,
                           shape: AttentionShape) -> str | None:
    """None when `ops.paged_attention` matches the reference on `device` in `dtype`; else what went wrong."""
    gen = torch.Generator().manual_seed(0)
    for name, seqs in (("decode", DECODE_STEP), ("prefill/extend", MIXED_STEP)):
        step = _AttentionStep.random(gen, seqs, shape)
        try:
            got = step.run(ops, device, dtype)
        except Exception as exc:  # noqa: BLE001 - any failure to compile or launch means: do not serve with it
            return f"the {name} kernel failed on a test batch: {type(exc).__name__}: {exc}"
        expected = step.run(None, torch.device("cpu"), torch.float64)
        error = (got - expected).norm().item() / expected.norm().item()
        if not error <= TOLERANCE[dtype]:  # also catches NaN
            return (f"their {name} output differs from the reference's by {error:.2e} (relative; {TOLERANCE[dtype]} "
                    "allowed)")
    return None


@dataclass
class _AttentionStep:
    seqs: list[tuple[int, int]]
    tables: list[list[int]]
    q: torch.Tensor  # [T, H, D] float32
    k_cache: torch.Tensor  # [N, P, Hkv, D] float32
    v_cache: torch.Tensor
    window: int | None

    @classmethod
    def random(cls, gen: torch.Generator, seqs: list[tuple[int, int]], shape: AttentionShape) -> _AttentionStep:
        blocks_per_seq = [-(-context // shape.block_size) for context, _ in seqs]
        order = torch.randperm(sum(blocks_per_seq), generator=gen).tolist()  # blocks scattered over the cache
        ends = [sum(blocks_per_seq[: i + 1]) for i in range(len(seqs))]
        tables = [order[end - count : end] for count, end in zip(blocks_per_seq, ends, strict=True)]
        cache_shape = (len(order), shape.block_size, shape.n_kv_heads, shape.head_dim)
        k_cache, v_cache = torch.randn(cache_shape, generator=gen), torch.randn(cache_shape, generator=gen)
        q = torch.randn(sum(n for _, n in seqs), shape.n_heads, shape.head_dim, generator=gen)
        return cls(seqs, tables, q, k_cache, v_cache, shape.window)

    def run(self, ops: ModuleType | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`ops.paged_attention` (None: the reference) on `device` in `dtype`, as float64 on the CPU."""
        batch = AttentionBatch.from_sequences(self.tables, [c for c, _ in self.seqs], [n for _, n in self.seqs],
                                              device)
        q, k_cache, v_cache = (t.to(device, dtype) for t in (self.q, self.k_cache, self.v_cache))
        attend = attention_reference.paged_attention if ops is None else ops.paged_attention
        return attend(q, k_cache, v_cache, batch, self.window).to("cpu", torch.float64)
