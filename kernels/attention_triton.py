"""Paged attention as Triton kernels: split-KV decode (flash-decoding) and varlen prefill/extend.

Same contract and shapes as `kernels.attention_reference` (q [T, H, D], caches [N, P, Hkv, D], an
`AttentionBatch`, an optional sliding window W: a query at position p sees keys j with j <= p, p - j < W).

* Straight from the block table. A program walks its keys BLOCK_N at a time; for each key it loads the block
  number from the sequence's block-table row (key // P) and reads the key's D contiguous values of its KV head
  (vectorised loads: D is contiguous). Nothing is gathered into a dense copy, and a block-table entry is only
  followed for keys the sequence has: padding entries and other sequences' blocks are never read.
* GQA-aware. A program serves one KV head and all G = H / Hkv query heads that read it: their rows are stacked
  into the dot's M dimension (row r = query token r // G, head r % G), so each K/V tile is loaded once per KV
  head and feeds one tensor-core dot for the whole group.
* Decode (one query per sequence): grid (sequences, KV heads, splits). The keys a query sees (its window) are
  cut into `splits` contiguous ranges, each reduced by its own program to a partial output and its log-sum-exp;
  a second small kernel combines the partials. With a batch of one, `splits` still fills every SM.
* Prefill/extend: one launch for the whole mixed batch over the `AttentionBatch.prefill_tiles` work list
  (runs of up to `tile_tokens` queries of one sequence, built on the host), grid (tiles, KV heads). Causality
  and the window bound each tile's key loop (keys before the window's start or after its last query are never
  visited) and a mask computed from positions handles the edges: no mask tensor exists anywhere.
* Precision: online softmax in base 2 with fp32 statistics and an fp32 accumulator; q k^T and p v run on the
  tensor cores in half precision (p rounded to v's dtype, as FlashAttention does) and in IEEE fp32 for fp32.

Importing this module imports triton (`kernels.dispatch` does so lazily); the interpreter is chosen when it is
first imported, as for `kernels.triton_ops`. The kernels call only Triton builtins and this module's own
`@triton.jit` helpers, never `triton.language`'s (`tl.max`, `tl.sum`, `tl.cdiv`): those are interpreted or
compiled as triton itself was first imported, possibly before the interpreter was switched on. Under the
interpreter bf16 operands are widened to fp32 before a dot (the interpreter multiplies raw bf16 bits as
integers).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.attention_metadata import AttentionBatch

LOG2E = 1.4426950408889634
NO_WINDOW = 0  # the kernels' spelling of "no sliding window"
# The running max starts finite, so a row that has seen no visible key yet never computes inf - inf.
MIN_STAT = tl.constexpr(-1.0e30)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add(a, b):
    return a + b


INTERPRETED = type(_add).__name__ == "InterpretedFunction"
if INTERPRETED:  # the interpreter reduces with numpy only for triton's own combine functions (else per element)
    _maximum = getattr(tl.standard, "_elementwise_max", _maximum)
    _add = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def _attend_tile(
    q, m, denom, acc, k_ptr, v_ptr, table_row, kv_head, keys, key_ok, allowed, d, d_ok, scale_log2,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    PAGE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One online-softmax step over BLOCK_N keys read through the block table: returns the new (m, denom, acc)."""
    block = tl.load(table_row + keys // PAGE, mask=key_ok, other=0).to(tl.int64)
    slot = keys % PAGE
    kv_ok = key_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + (block * stride_kb + slot * stride_kt + kv_head * stride_kh)[:, None] + d[None, :],
                mask=kv_ok, other=0.0)
    v = tl.load(v_ptr + (block * stride_vb + slot * stride_vt + kv_head * stride_vh)[:, None] + d[None, :],
                mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=tl.float32) * scale_log2
    qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m, tl.reduce(qk, 1, _maximum))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(qk - m_new[:, None])
    denom = denom * alpha + tl.reduce(p, 1, _add)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION, out_dtype=tl.float32)
    return m_new, denom, acc


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, window, num_splits, num_heads,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_table,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial attention of one sequence's query, one KV head's G query heads, over one split of its keys."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(lens_ptr + seq)
    start = 0
    if window > 0:
        start = tl.maximum(context - window, 0)
    per_split = (context - start + num_splits - 1) // num_splits
    split_len = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # whole key blocks
    lo = start + split * split_len
    hi = tl.minimum(context, lo + split_len)

    g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + g
    g_ok = g < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full((BLOCK_G,), MIN_STAT, dtype=tl.float32)
    denom = tl.full((BLOCK_G,), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_G, BLOCK_D), 0.0, dtype=tl.float32)
    table_row = tables_ptr + seq * stride_table
    for first in range(lo, hi, BLOCK_N):
        keys = first + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        m, denom, acc = _attend_tile(
            q, m, denom, acc, k_ptr, v_ptr, table_row, kv_head, keys, key_ok, key_ok[None, :], d, d_ok, scale_log2,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, PAGE, UPCAST, PRECISION,
        )
    # An empty split (its range past the sequence's keys) leaves denom = 0: log-sum-exp -inf, weight 0 in the reduce.
    has_keys = denom > 0
    out = acc / tl.where(has_keys, denom, 1.0)[:, None]
    lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, denom, 1.0)), float("-inf"))
    row = (seq * num_heads + heads) * num_splits + split  # partials: [B, H, splits, (D)]
    tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + row, lse, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out[seq, head] = the partials of its splits, weighted by their share of the softmax's denominator."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row = (seq * num_heads + head) * num_splits + s
    lse = tl.load(part_lse_ptr + row, mask=s_ok, other=float("-inf"))
    weight = tl.exp2(lse - tl.reduce(lse, 0, _maximum))  # the first split always has keys: the max is finite
    weight = weight / tl.reduce(weight, 0, _add)
    partial = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                      other=0.0)
    out = tl.reduce(partial * weight[:, None], 0, _add)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, starts_ptr, tiles_ptr,
    scale_log2, window,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_table,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Causal attention of one tile of a sequence's new queries (one KV head's G query heads) over its context."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tiles_ptr + tile * 3).to(tl.int64)
    first = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    seq_start = tl.load(starts_ptr + seq)
    context = tl.load(lens_ptr + seq)
    first_pos = context - (tl.load(starts_ptr + seq + 1) - seq_start)  # the position of the sequence's 1st query

    r = tl.arange(0, BLOCK_M)
    token = first + r // GROUP
    heads = kv_head * GROUP + r % GROUP
    row_ok = token < end
    pos = first_pos + token - seq_start
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_at = token.to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_at, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # Keys this tile can see: from its first query's window start to its last query (causal).
    hi = first_pos + end - seq_start
    lo = 0
    if window > 0:
        lo = tl.maximum(first_pos + first - seq_start - window + 1, 0)
    m = tl.full((BLOCK_M,), MIN_STAT, dtype=tl.float32)
    denom = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, dtype=tl.float32)
    table_row = tables_ptr + seq * stride_table
    for first_key in range(lo, hi, BLOCK_N):
        keys = first_key + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        allowed = key_ok[None, :] & (keys[None, :] <= pos[:, None])
        if window > 0:
            allowed = allowed & (pos[:, None] - keys[None, :] < window)
        m, denom, acc = _attend_tile(
            q, m, denom, acc, k_ptr, v_ptr, table_row, kv_head, keys, key_ok, allowed, d, d_ok, scale_log2,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, PAGE, UPCAST, PRECISION,
        )
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]  # 0 only on padding rows, which are not stored
    o_at = token.to(tl.int64)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_at, out.to(out_ptr.dtype.element_ty), mask=q_mask)


# Starting points for an H100/H200, to be tuned with benchmarks/attention_kernels.py. The interpreter's cost is
# per operation, so it runs larger key blocks (tests shrink them to cross every edge).
BLOCK_N = 128 if INTERPRETED else 64  # keys per step of the key loop
PREFILL_ROWS = 64  # query rows (tokens x heads of one KV head) per prefill program
MIN_DOT = 16  # the smallest M, N, K a tensor-core dot takes
TARGET_PROGRAMS_PER_SM = 2  # decode: enough splits for this many programs per SM
MIN_SPLIT_KEYS = 256  # decode: never split a context into ranges shorter than this
MAX_SPLITS = 64
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------- host side


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if not q.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "the Triton attention kernels were compiled for a GPU but got CPU tensors; set TRITON_INTERPRET=1 "
            "before kernels.attention_triton is first imported to run them on the CPU through Triton's interpreter"
        )
    if q.dtype not in DTYPES:
        raise TypeError(f"attention kernels take float16, bfloat16 or float32, not {q.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != q.dtype:
        raise ValueError("k_cache and v_cache must both be [blocks, block_size, kv_heads, head_dim] in q's dtype")
    if q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"{q.shape[1]} query heads of dim {q.shape[2]} cannot read {k_cache.shape[2]} KV heads "
                         f"of dim {k_cache.shape[3]}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q and the caches need a contiguous head_dim")


def _constexprs(q: torch.Tensor, k_cache: torch.Tensor) -> dict:
    """The compile-time arguments both kernels share."""
    head_dim = q.shape[2]
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(MIN_DOT, triton.next_power_of_2(head_dim)),
        "PAGE": k_cache.shape[1],
        "UPCAST": INTERPRETED and q.dtype == torch.bfloat16,
        "PRECISION": precision(q.dtype),
    }


def precision(dtype: torch.dtype) -> str:
    """fp32 inputs: IEEE dots, as exact as the reference (half inputs ignore the setting)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _scale_log2(q: torch.Tensor) -> float:
    return LOG2E / q.shape[2] ** 0.5


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    return (*k_cache.stride()[:3], *v_cache.stride()[:3])


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """How many ranges to split each decode context into so that (sequences x KV heads x splits) fills the GPU.

    Depends on shapes only. The interpreter runs programs one by one: no split there.
    """
    if device.type != "cuda":
        return 1
    wanted = triton.cdiv(TARGET_PROGRAMS_PER_SM * _sm_count(device), num_seqs * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_context, MIN_SPLIT_KEYS), MAX_SPLITS))


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    window: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence (q row b is sequence b's): split-KV, then a reduce launch."""
    _check(q, k_cache, v_cache)
    if not batch.decode_only:
        raise ValueError("decode takes exactly one query per sequence; use prefill for longer chunks")
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if splits is None:
        splits = default_splits(num_seqs, num_kv_heads, batch.max_context_len, q.device)
    part_out = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=q.device)
    group = num_heads // num_kv_heads
    constexprs = _constexprs(q, k_cache)
    _decode_kernel[(num_seqs, num_kv_heads, splits)](
        q, k_cache, v_cache, batch.block_tables, batch.context_lens, part_out, part_lse,
        _scale_log2(q), window or NO_WINDOW, splits, num_heads,
        q.stride(0), q.stride(1), *_cache_strides(k_cache, v_cache), batch.block_tables.stride(0),
        GROUP=group, BLOCK_G=max(MIN_DOT, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N, **constexprs,
    )
    _decode_reduce_kernel[(num_seqs, num_heads)](
        part_out, part_lse, out, splits, num_heads, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=constexprs["BLOCK_D"], BLOCK_S=triton.next_power_of_2(splits),
    )
    return out


def prefill_warps(block_m: int, head_dim: int) -> int:
    """8 warps once the fp32 accumulator passes 64 x 128 (registers), 4 below."""
    return 4 if block_m * head_dim <= 64 * 128 else 8


def prefill_tile_tokens(group: int) -> int:
    """Query tokens per prefill program: PREFILL_ROWS rows of (token, query head of the KV head)."""
    return max(1, PREFILL_ROWS // group)


def prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch, window: int | None = None
) -> torch.Tensor:
    """Causal attention of every sequence's new queries over its context (prefix + new tokens), one launch."""
    _check(q, k_cache, v_cache)
    num_tokens, num_heads, _ = q.shape
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    tile_tokens = prefill_tile_tokens(group)
    tiles = batch.prefill_tiles(tile_tokens)
    block_m = max(MIN_DOT, triton.next_power_of_2(tile_tokens * group))
    _prefill_kernel[(tiles.shape[0], num_kv_heads)](
        q, k_cache, v_cache, out, batch.block_tables, batch.context_lens, batch.query_starts, tiles,
        _scale_log2(q), window or NO_WINDOW,
        q.stride(0), q.stride(1), *_cache_strides(k_cache, v_cache), batch.block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=BLOCK_N, **_constexprs(q, k_cache),
        num_warps=prefill_warps(block_m, q.shape[2]),
    )
    return out


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch, window: int | None = None
) -> torch.Tensor:
    """The decode kernel for a decode-only step, the prefill/extend kernel for any other (mixed) step."""
    if batch.decode_only:
        return decode(q, k_cache, v_cache, batch, window, batch.decode_splits)
    return prefill(q, k_cache, v_cache, batch, window)
