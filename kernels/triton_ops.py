"""Punica's shrink and multi-slice expand as Triton kernels: one launch each per layer.

Design (the same contract and shapes as `kernels.reference`; K fused slices, R the page table's max rank,
weights in pages of PAGE_RANK ranks as `kernels.paging` lays them out):

* One kernel family for prefill and decode. Both kernels walk `LoRABatch.tiles`, a work list of runs of at
  most `tile_rows` tokens that share a slot. A prefill segment becomes a few long tiles (SGMV); a decode
  token is a tile of one token (BGMV), and decode tokens of one adapter, which the step builder lays out
  next to each other, share a tile and so load that adapter's weights once. One family means one set of
  kernels to test and tune, and a batch that mixes prefill chunks with decode tokens needs no split.
  Padding tiles carry slot -1 and exit at once, so a decode step's work list can have a fixed shape (one
  row per token) whatever the number of distinct adapters: a CUDA graph replay then sees every tile.
* Grids. Shrink: (K slices x ceil(R / BLOCK_R) rank blocks, tiles, d_in splits); the rank-block axis is
  the fastest so the programs that read the same x tile run together and share it through L2. Expand:
  (output blocks of BLOCK_N columns, each inside one slice, tiles); every y element belongs to exactly one
  program, which loads it, adds its delta and stores it: no atomics.
* Paged and rank-aware. A rank block is one page (BLOCK_R = PAGE_RANK): a program loads its page number
  from the slot's page-table row, then reads that page's rows. `table.ranks[slot]` bounds each adapter's
  rank: shrink programs whose rank block starts at or past it return before loading anything; expand loops
  over the adapter's own pages only and masks ranks past it, so a rank-8 adapter reads rank-8 bytes of A
  and does one rank block of arithmetic whatever the max rank. B pages are rank-major (d_out contiguous),
  so a rank-8 adapter's expand reads full 32-byte sectors of B too.
* Precision. Both kernels accumulate in fp32 (fp64 for fp64 inputs) and the intermediate v is fp32: an
  fp16 v is the accuracy trap of earlier kernels. The expand dot multiplies v (fp32) by B converted to
  fp32; for half inputs that dot runs in TF32 (B is exact in TF32, v keeps fp32 range, and the error stays
  below the half-precision rounding of y), for fp32/fp64 inputs in IEEE precision.
* Split d_in. A small decode batch has too few (tile, slice, rank block) programs to keep the GPU's memory
  system busy, so the shrink may split d_in over `splits` programs. Rather than fp32 atomics (run-to-run
  nondeterminism, and a memset of v) each split writes its own partial v, and the expand adds the
  partials while loading v: deterministic, no extra launch, and the partials are a few hundred KB.
* Only tiles' rows and ranks below the slot's rank are written in v; `add_lora` allocates v with
  `torch.empty` because the expand never reads elsewhere, while the standalone `shrink` zero-fills so its
  result matches the reference exactly.

Importing this module imports triton; `kernels.dispatch` does so lazily. Whether the kernels are compiled or
interpreted is fixed when this module is imported (`TRITON_INTERPRET=1` set before: interpreter). The kernels
use only Triton builtins, no `@triton.jit` helpers of `triton.language` such as `tl.zeros`: those are fixed
when triton itself is first imported, possibly by another library before the interpreter was switched on.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from kernels.metadata import LoRABatch
from kernels.paging import PAGE_RANK, PageTable

TARGET_PROGRAMS_PER_SM = 4  # when to split d_in in the shrink
MIN_SPLIT_COLUMNS = 256  # never split d_in into pieces narrower than this
MAX_SPLITS = 16

_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32, torch.float64: tl.float64}
_ACC_TORCH = {tl.float32: torch.float32, tl.float64: torch.float64}


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, v_ptr, tiles_ptr, ranks_ptr, pages_ptr,
    d_in, max_rank, split_columns,
    stride_xt, stride_xd, stride_ap, stride_ar, stride_ad, stride_pt, stride_vs, stride_vt,
    RANK_BLOCKS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    D_ALIGN: tl.constexpr,
):
    """v[split, rows, k*R + ranks] = x[rows, split's d_in] @ (slice k's rows of one A page)[:, split's d_in]^T.

    D_ALIGN: d_in and the row strides of x and A are multiples of it; with 16 bytes' worth, x and A move in
    16-byte accesses (the masked tail of d_in is then whole vectors)."""
    tile = tl.program_id(1)
    slot = tl.load(tiles_ptr + tile * 3 + 2).to(tl.int64)
    if slot < 0:  # padding tile
        return
    rank = tl.load(ranks_ptr + slot)
    kr = tl.program_id(0)
    block = kr % RANK_BLOCKS
    r0 = block * BLOCK_R
    if r0 >= rank:  # rank-aware: this block is all zero padding
        return
    # Index math in int64: no overflow on large pools, and no overflow checks under the interpreter.
    page = tl.load(pages_ptr + slot * stride_pt + block).to(tl.int64)
    k = kr // RANK_BLOCKS
    first = tl.load(tiles_ptr + tile * 3).to(tl.int64)
    end = tl.load(tiles_ptr + tile * 3 + 1)
    rows = first + tl.arange(0, BLOCK_M)
    in_page = tl.arange(0, BLOCK_R)
    ranks = r0 + in_page
    a_row = k * BLOCK_R + in_page  # the page's rows of slice k
    row_ok = (rows < end)[:, None]
    rank_ok = ranks < rank
    d_start = tl.program_id(2).to(tl.int64) * split_columns
    d_end = tl.multiple_of(tl.minimum(d_start + split_columns, d_in), D_ALIGN)
    d = tl.arange(0, BLOCK_K)
    x_at = x_ptr + rows[:, None] * stride_xt + (d_start + d)[None, :] * stride_xd
    a_at = a_ptr + page * stride_ap + a_row[:, None] * stride_ar + (d_start + d)[None, :] * stride_ad
    acc = tl.full((BLOCK_M, BLOCK_R), 0, dtype=ACC)
    for d0 in range(d_start, d_end, BLOCK_K):
        d_ok = (d < d_end - d0)[None, :]
        xt = tl.load(x_at, mask=row_ok & d_ok, other=0.0)
        at = tl.load(a_at, mask=rank_ok[:, None] & d_ok, other=0.0)
        if UPCAST:  # exact: products of two halves fit fp32's mantissa
            xt = xt.to(ACC)
            at = at.to(ACC)
        acc = tl.dot(xt, tl.trans(at), acc, input_precision=PRECISION, out_dtype=ACC)
        x_at += BLOCK_K * stride_xd
        a_at += BLOCK_K * stride_ad
    v_at = v_ptr + tl.program_id(2) * stride_vs + rows[:, None] * stride_vt + (k * max_rank + ranks)[None, :]
    tl.store(v_at, acc, mask=row_ok & rank_ok[None, :])


@triton.jit
def _expand_kernel(
    v_ptr, b_ptr, y_ptr, tiles_ptr, ranks_ptr, pages_ptr, slices_ptr,
    max_rank,
    stride_vs, stride_vt, stride_bp, stride_br, stride_bn, stride_pt, stride_yt, stride_yn,
    NUM_SLICES: tl.constexpr, SPLITS: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    COL_ALIGN: tl.constexpr,
):
    """y[rows, cols] += v[rows, k*R : k*R + rank] @ (the slot's B pages)[:rank, cols] for one block of slice k.

    COL_ALIGN: every slice offset (so every column block's start and end) is a multiple of it, as are the row
    strides of y and B; with 16 bytes' worth, B and y move in 16-byte accesses (the offsets are loaded at run
    time, so without this promise the compiler can only assume scalar ones)."""
    tile = tl.program_id(1)
    slot = tl.load(tiles_ptr + tile * 3 + 2).to(tl.int64)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    if rank == 0:
        return
    # slices_ptr holds [output offset of slice 0..K] then [first column block of slice 0..K]; find the slice k
    # that column block pid_n falls in.
    pid_n = tl.program_id(0)
    k = 0
    for j in tl.static_range(1, NUM_SLICES):
        k += (pid_n >= tl.load(slices_ptr + NUM_SLICES + 1 + j)).to(tl.int32)
    first_block = tl.load(slices_ptr + NUM_SLICES + 1 + k)
    col_start = tl.multiple_of(tl.load(slices_ptr + k).to(tl.int64) + (pid_n - first_block) * BLOCK_N, COL_ALIGN)
    col_end = tl.multiple_of(tl.load(slices_ptr + k + 1), COL_ALIGN)
    cols = tl.max_contiguous(col_start + tl.arange(0, BLOCK_N), BLOCK_N)
    first = tl.load(tiles_ptr + tile * 3).to(tl.int64)
    end = tl.load(tiles_ptr + tile * 3 + 1)
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = (rows < end)[:, None]
    col_ok = cols < col_end
    ranks = tl.arange(0, BLOCK_R)
    v_at = v_ptr + rows[:, None] * stride_vt + (k * max_rank + ranks)[None, :]
    b_in_page = ranks[:, None] * stride_br + cols[None, :] * stride_bn
    page_at = pages_ptr + slot * stride_pt
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=ACC)
    for r0 in range(0, rank, BLOCK_R):  # rank-aware: only the adapter's own pages
        rank_ok = ranks < rank - r0
        vt = tl.load(v_at, mask=row_ok & rank_ok[None, :], other=0.0)
        for s in tl.static_range(1, SPLITS):  # add the shrink's other d_in partials
            vt += tl.load(v_at + s * stride_vs, mask=row_ok & rank_ok[None, :], other=0.0)
        page = tl.load(page_at).to(tl.int64)
        bt = tl.load(b_ptr + page * stride_bp + b_in_page, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(vt.to(ACC), bt.to(ACC), acc, input_precision=PRECISION, out_dtype=ACC)
        v_at += BLOCK_R
        page_at += 1
    y_at = y_ptr + rows[:, None] * stride_yt + cols[None, :] * stride_yn
    mask = row_ok & col_ok[None, :]
    y = tl.load(y_at, mask=mask, other=0.0)
    tl.store(y_at, (y.to(ACC) + acc).to(y_ptr.dtype.element_ty), mask=mask)


# Triton's interpreter keeps bfloat16 as raw uint16 and its dot multiplies those bits as integers, so under
# the interpreter bfloat16 operands are widened to fp32 before the shrink's dot (the same exact products).
INTERPRETED = type(_shrink_kernel).__name__ == "InterpretedFunction"

# Block sizes: starting points for a GPU, to be tuned with benchmarks/lora_kernels.py. The interpreter's cost
# is per operation, not per element, so it runs fewer, larger blocks (tests shrink them to reach every edge).
BLOCK_R = PAGE_RANK  # rank rows per block: one page, the granularity of rank-aware work
BLOCK_K = 256 if INTERPRETED else 64  # d_in columns per shrink step
BLOCK_N = 256 if INTERPRETED else 64  # output columns per expand program


# ------------------------------------------------------------------------------------------- host side


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "the Triton LoRA kernels were compiled for a GPU but got CPU tensors; set TRITON_INTERPRET=1 before "
            "kernels.triton_ops is first imported to run them on the CPU through Triton's interpreter"
        )


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's own GPU: Triton launches on the current device, which is cuda:0 unless set."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _precision(dtype: torch.dtype, expand: bool) -> str:
    # Shrink of half inputs: native half dot with fp32 accumulation (exact products). Expand of half inputs:
    # fp32 v times B (exact in TF32). fp32 and fp64 inputs: IEEE, as accurate as the reference.
    return "tf32" if expand and dtype in (torch.float16, torch.bfloat16) else "ieee"


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(num_tiles: int, num_slices: int, d_in: int, device: torch.device) -> int:
    """How many pieces to split d_in into so that a small batch still occupies every SM.

    Counts one working rank block per (tile, slice), the low-rank case; depends on shapes only, so a
    captured step keeps it. The interpreter runs programs one by one: no split there.
    """
    if device.type != "cuda":
        return 1
    target = TARGET_PROGRAMS_PER_SM * _sm_count(device)
    splits = 1
    while num_tiles * num_slices * splits < target and d_in >= 2 * splits * MIN_SPLIT_COLUMNS and splits < MAX_SPLITS:
        splits *= 2
    return splits


@functools.cache
def _slice_table(widths: tuple[int, ...], block_n: int, device: torch.device) -> torch.Tensor:
    """[2 * (K + 1)] int32: output offset of each slice, then its first column block; built once per layer."""
    offsets, blocks = [0], [0]
    for width in widths:
        offsets.append(offsets[-1] + width)
        blocks.append(blocks[-1] + triton.cdiv(width, block_n))
    return torch.tensor(offsets + blocks, dtype=torch.int32, device=device)


def _launch_shrink(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch, table: PageTable, v: torch.Tensor) -> None:
    """Write v [splits, T, K*R] (partials over d_in) for the rows of every tile and the slot's ranks."""
    splits = v.shape[0]
    d_in = x.shape[1]
    num_slices = lora_a.shape[1] // PAGE_RANK
    rank_blocks = table.pages.shape[1]
    split_columns = triton.cdiv(triton.cdiv(d_in, splits), BLOCK_K) * BLOCK_K
    grid = (num_slices * rank_blocks, batch.tiles.shape[0], splits)
    with _on_device(x):
        _shrink_kernel[grid](
            x, lora_a, v, batch.tiles, table.ranks, table.pages,
            d_in, table.max_rank, split_columns,
            x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), table.pages.stride(0),
            v.stride(0), v.stride(1),
            RANK_BLOCKS=rank_blocks, ACC=_ACC[x.dtype], PRECISION=_precision(x.dtype, False),
            UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
            BLOCK_M=batch.tile_rows, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
            D_ALIGN=_vector_alignment((x, lora_a), (d_in,)),
        )


def _launch_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    slice_widths: tuple[int, ...],
    table: PageTable,
) -> None:
    """y += sum over splits of v [splits, T, K*R], expanded through B, for the rows of every tile."""
    slices = _slice_table(tuple(slice_widths), BLOCK_N, y.device)
    column_blocks = sum(triton.cdiv(w, BLOCK_N) for w in slice_widths)
    grid = (column_blocks, batch.tiles.shape[0])
    with _on_device(y):
        _expand_kernel[grid](
            v, lora_b, y, batch.tiles, table.ranks, table.pages, slices,
            table.max_rank,
            v.stride(0), v.stride(1), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), table.pages.stride(0),
            y.stride(0), y.stride(1),
            NUM_SLICES=len(slice_widths), SPLITS=v.shape[0], ACC=_ACC[y.dtype],
            PRECISION=_precision(y.dtype, True), BLOCK_M=batch.tile_rows, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
            COL_ALIGN=_vector_alignment((y, lora_b), slice_widths),
        )


def _vector_alignment(tensors: tuple[torch.Tensor, ...], extents: tuple[int, ...]) -> int:
    """Elements per 16 bytes when the tensors' innermost dimension is contiguous, their other strides and data
    pointers are 16-byte aligned and every extent along it is whole vectors; else 1 (scalar accesses)."""
    vector = 16 // tensors[0].element_size()
    aligned = all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % vector == 0 for s in t.stride()[:-1])
        for t in tensors
    ) and all(extent % vector == 0 for extent in extents)
    return vector if aligned else 1


def _check(x: torch.Tensor, lora_a: torch.Tensor) -> None:
    _check_device(x)
    if x.dtype not in _ACC:
        raise TypeError(f"LoRA kernels take float16, bfloat16, float32 or float64, not {x.dtype}")
    if lora_a.shape[1] % PAGE_RANK:
        raise ValueError(f"A pages have {lora_a.shape[1]} rows, not a multiple of the page rank {PAGE_RANK}")


def _v_buffer(x: torch.Tensor, lora_a: torch.Tensor, table: PageTable, splits: int, zeroed: bool) -> torch.Tensor:
    shape = (splits, x.shape[0], lora_a.shape[1] // PAGE_RANK * table.max_rank)
    make = torch.zeros if zeroed else torch.empty
    return make(shape, dtype=_ACC_TORCH[_ACC[x.dtype]], device=x.device)


def shrink(
    x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch, table: PageTable, splits: int = 1
) -> torch.Tensor:
    """v = x @ A[slot]^T as `reference.shrink` (zero rows for slot -1, zeros past each slot's rank)."""
    _check(x, lora_a)
    v = _v_buffer(x, lora_a, table, splits, zeroed=True)
    if batch.has_lora and x.shape[0]:
        _launch_shrink(x, lora_a, batch, table, v)
    return v.sum(0) if splits > 1 else v[0]


def expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    slice_widths: tuple[int, ...],
    table: PageTable,
) -> None:
    """y[:, slice k] += v[:, rank block k] @ B_k[slot]^T in place, as `reference.expand`."""
    _check_device(y)
    if batch.has_lora and y.shape[0]:
        _launch_expand(y, v.contiguous().unsqueeze(0), lora_b, batch, slice_widths, table)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    slice_widths: tuple[int, ...],
    table: PageTable,
    splits: int | None = None,
) -> None:
    """y += the per-token LoRA delta: one shrink launch and one multi-slice expand launch."""
    if not batch.has_lora or x.shape[0] == 0:
        return
    _check(x, lora_a)
    if lora_a.shape[1] != len(slice_widths) * PAGE_RANK:
        raise ValueError(f"A pages hold {lora_a.shape[1] // PAGE_RANK} slices, not {len(slice_widths)}")
    if splits is None:
        splits = default_splits(batch.tiles.shape[0], len(slice_widths), x.shape[1], x.device)
    # Uninitialised on purpose: the expand reads only what the shrink wrote (tile rows, ranks < slot rank).
    v = _v_buffer(x, lora_a, table, splits, zeroed=False)
    _launch_shrink(x, lora_a, batch, table, v)
    _launch_expand(y, v, lora_b, batch, slice_widths, table)
