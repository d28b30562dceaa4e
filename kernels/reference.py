"""Pure-torch reference of the Punica shrink/expand contract over paged adapter weights.

Shapes (K slices fused in one layer, D the sum of their widths, R = `table.max_rank`; the page layout is
described in `kernels.paging`):
  x: [T, d_in]                              the layer's input
  lora_a: [num_pages, K * PAGE_RANK, d_in]  A pages
  lora_b: [num_pages, PAGE_RANK, D]         B pages (B transposed, scale already folded in)
  v: [T, K * R]                             the shrink's output: slice k's ranks in columns k*R ... k*R + R-1
  y: [T, D]                                 the base layer's output, updated in place

shrink: v[t, k*R : (k+1)*R] = x[t] @ A_k[slot[t]]^T
expand: y[t, off_k : off_k + d_k] += v[t, k*R : (k+1)*R] @ B_k[slot[t]]^T

The tokens with a slot are gathered once per call, grouped by slot (`LoRABatch.by_slot`), so each adapter's
rows are one contiguous block: the work is one pair of GEMMs per adapter present in the batch on its own
pages, with one gather and one scatter for the whole batch, not a [T, R, d_in] gather of weights.

`add_lora` is the two fused, as the model calls them, in one of three ways (`lora_path` prices them per call).
Per adapter: v never leaves the adapter's block of rows, and each adapter's GEMMs cover only the slices it
targets (`targets`) and only its own rank, not its pages' multiple of PAGE_RANK (a rank-8 adapter on q and v of
a fused q|k|v does half a page of two slices, not a page of three). All at once: every token against every page
of the batch's adapters in one shrink GEMM and one expand GEMM per slice, the pages of other adapters masked to
zero. Stacked: the batch's adapters' weights stacked once (`LayerAdapters` keeps them while the batch keeps the
same adapters) and each adapter's tokens, padded to the longest run, through two batched GEMMs (`bmm`), B laid
out block-diagonally so that one expand feeds every slice. On a CPU each torch op costs microseconds whatever
its size, so the few large GEMMs win where adapters are many and the layer small, despite their wasted flops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kernels.metadata import LoRABatch
from kernels.paging import PAGE_RANK, PageTable


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (an fp16 intermediate loses the delta), the input's own type when wider."""
    return torch.promote_types(dtype, torch.float32)


def _as_slice(pages: Sequence[int]) -> slice | None:
    """`pages` as a slice when they are consecutive (indexing the buffers with it copies nothing), else None."""
    if pages and list(pages) == list(range(pages[0], pages[0] + len(pages))):
        return slice(pages[0], pages[0] + len(pages))
    return None


def _slot_pages(table: PageTable, slot: int) -> slice | list[int]:
    """An index of the pages that hold the slot's adapter (those past its rank would only add zeros): a slice
    when they are consecutive, as one page always is."""
    pages = table.host_pages[slot]
    return _as_slice(pages) or list(pages)


def slot_a(lora_a: torch.Tensor, table: PageTable, slot: int) -> torch.Tensor:
    """[K, n * PAGE_RANK, d_in]: slot's A of every slice, gathered from its n pages."""
    pages = lora_a[_slot_pages(table, slot)]  # [n, K * PAGE_RANK, d_in]
    num_pages, rows, d_in = pages.shape
    num_slices = rows // PAGE_RANK
    return pages.view(num_pages, num_slices, PAGE_RANK, d_in).transpose(0, 1).reshape(
        num_slices, num_pages * PAGE_RANK, d_in
    )


def slot_b(lora_b: torch.Tensor, table: PageTable, slot: int) -> torch.Tensor:
    """[n * PAGE_RANK, D]: slot's B^T of all slices, gathered from its n pages."""
    return lora_b[_slot_pages(table, slot)].flatten(0, 1)


def shrink(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch, table: PageTable) -> torch.Tensor:
    """v = x @ A[slot]^T for every token with a slot; zero rows for slot -1. At least fp32."""
    acc = accumulation_dtype(x.dtype)
    num_slices = lora_a.shape[1] // PAGE_RANK
    v = torch.zeros(x.shape[0], num_slices * table.max_rank, dtype=acc, device=x.device)
    if not batch.has_lora:
        return v
    grouped_x = x[batch.by_slot].to(acc)
    grouped_v = torch.zeros(len(batch.by_slot), num_slices, table.max_rank, dtype=acc, device=x.device)
    for slot, start, end in batch.slot_runs:
        a = slot_a(lora_a, table, slot).to(acc)  # [K, r', d_in], r' the slot's rank rounded up to pages
        used = a.shape[1]
        if used:  # an adapter without weights (rank 0) adds nothing
            grouped_v[start:end, :, :used] = (grouped_x[start:end] @ a.flatten(0, 1).T).view(-1, num_slices, used)
    v[batch.by_slot] = grouped_v.flatten(1)
    return v


def expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    slice_widths: tuple[int, ...],
    table: PageTable,
) -> None:
    """y[:, slice k] += v[:, rank block k] @ B_k[slot]^T, in place; slot -1 rows untouched."""
    if not batch.has_lora:
        return
    rank = table.max_rank
    grouped_v = v[batch.by_slot]
    delta = torch.zeros(len(batch.by_slot), y.shape[1], dtype=v.dtype, device=y.device)
    for slot, start, end in batch.slot_runs:
        b = slot_b(lora_b, table, slot).to(v.dtype)  # [r', D]
        used = b.shape[0]
        offset = 0
        for k, width in enumerate(slice_widths):
            torch.matmul(grouped_v[start:end, k * rank : k * rank + used], b[:, offset : offset + width],
                         out=delta[start:end, offset : offset + width])
            offset += width
    y.index_add_(0, batch.by_slot, delta.to(y.dtype))


@dataclass(frozen=True)
class AdapterSlices:
    """One adapter in one layer, as the per-adapter path of `add_lora` reads it: the fused slices it targets (its
    pages hold zeros in the others) and, where given, those slices' weights laid out for its GEMMs (`a_t`: A of
    every targeted slice, `rank` rows each, transposed to [d_in, n * rank]; `b`: B^T [rank, width] per slice).
    Read from the pages instead, they cost a handful of view and copy ops per adapter, layer and step, which on a
    CPU is most of the LoRA time of a small model; a CPU model runner gives them once, when it loads the adapter
    (`server.lora_linear.LoRALinear.hold`: views of the host tier's buffer)."""

    slices: tuple[int, ...]
    rank: int = 0
    a_t: torch.Tensor | None = None
    b: tuple[torch.Tensor, ...] = ()
    flops_per_token: int = 0  # of its shrink and expands, where its weights are given (`lora_path` reads it)


@dataclass(frozen=True)
class StackedAdapters:
    """Adapters of one layer, in a batch's slot-run order, stacked for batched GEMMs: `a_t` [S, d_in, K * R] (slice
    k's ranks in columns k*R ...) and `b` [S, K * R, D], block-diagonal (slice k's ranks feed only slice k's
    columns), R the largest rank among them; zeros wherever an adapter has no weight."""

    adapters: tuple[AdapterSlices, ...]
    a_t: torch.Tensor
    b: torch.Tensor


class LayerAdapters(dict[int, AdapterSlices]):
    """One layer's `AdapterSlices` by slot, and the last batch's adapters stacked (`StackedAdapters`), kept
    while batches keep the same adapters: in a decode-heavy stream the stack is built once per change of the
    batch's adapters, not per step."""

    def __init__(self) -> None:
        super().__init__()
        self.stacked: StackedAdapters | None = None

    def stacked_for(self, adapters: tuple[AdapterSlices, ...], d_in: int, slice_widths: tuple[int, ...],
                    like: torch.Tensor) -> StackedAdapters:
        if self.stacked is None or not _same_objects(self.stacked.adapters, adapters):
            self.stacked = None  # its memory goes before the new stack takes its own
            self.stacked = stack_adapters(adapters, d_in, slice_widths, like)
        return self.stacked


def _same_objects(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """Identity, not equality: an adapter reloaded into the same pages is a new `AdapterSlices`."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def stack_adapters(adapters: tuple[AdapterSlices, ...], d_in: int, slice_widths: tuple[int, ...],
                   like: torch.Tensor) -> StackedAdapters:
    """`StackedAdapters` of `adapters` (each with its weights, or targeting nothing) in `like`'s accumulation dtype,
    on its device."""
    rank = max((a.rank for a in adapters if a.a_t is not None), default=0)
    num_slices = len(slice_widths)
    like = like.new_empty(0, dtype=accumulation_dtype(like.dtype))
    offsets = [sum(slice_widths[:k]) for k in range(num_slices)]
    a_t = like.new_zeros(len(adapters), d_in, num_slices * rank)
    b = like.new_zeros(len(adapters), num_slices * rank, sum(slice_widths))
    for s, adapter in enumerate(adapters):
        r = adapter.rank
        for j, k in enumerate(adapter.slices if adapter.a_t is not None else ()):
            a_t[s, :, k * rank : k * rank + r] = adapter.a_t[:, j * r : (j + 1) * r]
            b[s, k * rank : k * rank + r, offsets[k] : offsets[k] + slice_widths[k]] = adapter.b[j]
    return StackedAdapters(adapters, a_t, b)


# What a CPU core computes in the few microseconds a torch op costs to dispatch: `lora_path` prices an op at this
# many flops. `benchmarks/lora_paths.py` times the three ways on real layer shapes and reports which constant's
# choices lose least against the fastest way (on a 2-core CPU: 0.5-1 million).
FLOPS_PER_OP = 500_000


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    slice_widths: tuple[int, ...],
    table: PageTable,
    targets: Mapping[int, AdapterSlices] | None = None,
) -> None:
    """y += expand(shrink(x)), in place (the module's contract), doing only each adapter's own work.

    `targets[slot]` describes the slot's adapter (`AdapterSlices`): the per-adapter path skips the slices it does
    not target, and reads its weights from there where given (an adapter missing from `targets` targets none).
    None: every slot targets every slice, weights read from the pages. Without pages (`lora_a` and `lora_b` None:
    a CPU model runner reading the host tier's buffers) every adapter in `targets` must have its weights."""
    if not batch.has_lora:
        return
    path = lora_path(batch, table, x.shape[1], slice_widths, targets, lora_a is not None)
    if path == "dense":
        _all_adapters_at_once(y, x, lora_a, lora_b, batch, slice_widths, table)
        return
    acc = accumulation_dtype(x.dtype)
    grouped = batch.grouped_from is not None  # the tokens with a slot already one block, grouped by slot
    rows = slice(batch.grouped_from, batch.grouped_from + len(batch.by_slot)) if grouped else slice(0)
    if path == "stacked":
        stacked = targets.stacked_for(_batch_adapters(batch, table, targets), x.shape[1], slice_widths, x)
        _stacked(y, x, rows if grouped else None, batch, stacked)
        return
    # index_select copies whole rows: faster on a CPU than x[by_slot]
    grouped_x = (x[rows] if grouped else x.index_select(0, batch.by_slot)).to(acc)
    if grouped and y.dtype == acc:  # updated where they are: no delta, no scatter
        _adapter_by_adapter(y[rows], grouped_x, lora_a, lora_b, batch, slice_widths, table, targets)
        return
    delta = torch.zeros(len(batch.by_slot), y.shape[1], dtype=acc, device=y.device)
    _adapter_by_adapter(delta, grouped_x, lora_a, lora_b, batch, slice_widths, table, targets)
    if grouped:
        y[rows] += delta.to(y.dtype)
    else:
        y.index_add_(0, batch.by_slot, delta.to(y.dtype))


_TARGETS_NOTHING = AdapterSlices(())


def _batch_adapters(batch: LoRABatch, table: PageTable,
                    targets: Mapping[int, AdapterSlices]) -> tuple[AdapterSlices, ...]:
    """What `targets` holds of each run's adapter (one missing there targets nothing)."""
    return tuple(targets.get(slot, _TARGETS_NOTHING) for slot, _, _ in batch.slot_runs)


@dataclass(frozen=True)
class _RunShape:
    """What `lora_path` reads of a step's runs, the same in every layer (cached on the batch)."""

    lengths: tuple[int, ...]  # tokens per run
    ranks: tuple[int, ...]  # each run's slot's rank
    pages: int  # pages of all runs' slots
    pages_consecutive: bool  # whether the all-at-once path reads them as a view


def _run_shape(batch: LoRABatch, table: PageTable) -> _RunShape:
    key = ("runs",)
    if key not in batch.cache:
        slots = [slot for slot, _, _ in batch.slot_runs]
        pages = [page for slot in slots for page in table.host_pages[slot]]
        batch.cache[key] = _RunShape(
            tuple(end - start for _, start, end in batch.slot_runs), tuple(table.host_ranks[s] for s in slots),
            len(pages), _as_slice(pages) is not None)
    return batch.cache[key]


# Flops-equivalent of copying one element: a gather of pages, or building a stack.
COPY_FLOPS = 4


def lora_path(batch: LoRABatch, table: PageTable, d_in: int, slice_widths: tuple[int, ...],
              targets: Mapping[int, AdapterSlices] | None, has_pages: bool = True) -> str:
    """"adapter", "dense" or "stacked": the way of `add_lora` whose flops, copies (`COPY_FLOPS` per element) and
    ops (`FLOPS_PER_OP` each) cost least for this call. Dense reads the pages (`has_pages`). Stacked needs every
    adapter's weights kept (`LayerAdapters` of `AdapterSlices` with weights: a CPU model runner's); building its
    stack counts when the batch's adapters changed. Called in every layer of every step, so it reads what the step
    shares from `_run_shape`."""
    if len(batch.slot_runs) < 2:  # one adapter: its own GEMMs, nothing wasted
        return "adapter"
    runs = _run_shape(batch, table)
    num_slices, width = len(slice_widths), sum(slice_widths)
    every_slice = AdapterSlices(tuple(range(num_slices)))
    adapters = _batch_adapters(batch, table, targets) if targets is not None else (every_slice,) * len(runs.lengths)
    adapter_cost, kept_rank, stackable = 0, 0, isinstance(targets, LayerAdapters)
    for n, adapter, rank in zip(runs.lengths, adapters, runs.ranks, strict=True):
        if not adapter.slices or not rank:
            continue
        if adapter.a_t is not None:
            kept_rank = max(kept_rank, adapter.rank)
            per_token = adapter.flops_per_token
        else:
            stackable = False
            per_token = 2 * rank * (len(adapter.slices) * d_in + sum(slice_widths[k] for k in adapter.slices))
        adapter_cost += n * per_token + (3 + len(adapter.slices)) * FLOPS_PER_OP
    costs = {"adapter": adapter_cost}
    if has_pages:
        dense_rows = runs.pages * PAGE_RANK * (num_slices * d_in + width)
        costs["dense"] = (2 * len(batch.token_slots) * dense_rows + (2 + num_slices) * FLOPS_PER_OP
                          + (0 if runs.pages_consecutive else COPY_FLOPS * dense_rows))
    if stackable and kept_rank:
        stack = len(adapters) * num_slices * kept_rank * (d_in + width)
        built = targets.stacked is not None and _same_objects(targets.stacked.adapters, adapters)
        costs["stacked"] = 2 * max(runs.lengths) * stack + 3 * FLOPS_PER_OP + (0 if built else COPY_FLOPS * stack)
    return min(costs, key=costs.get)


def _stacked_rows(batch: LoRABatch) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """(longest run, gather [S * longest], keep [T']) of the stacked path: the rows of the grouped tokens each
    adapter's padded block reads (a run shorter than the longest repeats its first row), and which rows of the
    padded result are real, in `by_slot` order; both None when every run is as long as the longest (no padding).
    Made once per step (cached on the batch) for every layer."""
    key = ("stacked",)
    if key not in batch.cache:
        lengths = [end - start for _, start, end in batch.slot_runs]
        longest = max(lengths)
        if all(n == longest for n in lengths):
            batch.cache[key] = (longest, None, None)
        else:
            gather = [start + min(j, end - start - 1) for _, start, end in batch.slot_runs for j in range(longest)]
            keep = [s * longest + j for s, n in enumerate(lengths) for j in range(n)]
            device = batch.by_slot.device
            batch.cache[key] = (longest, _host_index(gather).to(device, non_blocking=True),
                                _host_index(keep).to(device, non_blocking=True))
    return batch.cache[key]


def _host_index(values: list[int]) -> torch.Tensor:
    """An int64 index built on the host (numpy, not `torch.tensor`: nothing here waits for a device)."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def _stacked(y: torch.Tensor, x: torch.Tensor, rows: slice | None, batch: LoRABatch,
             stacked: StackedAdapters) -> None:
    """y += each adapter's tokens through the stacked weights: one bmm shrink, one bmm expand. `rows`: where the
    tokens with a slot lie in x and y when they are one block grouped by slot (None: gathered by `by_slot`)."""
    acc = stacked.a_t.dtype
    num_adapters = len(batch.slot_runs)
    longest, gather, keep = _stacked_rows(batch)
    grouped_x = x[rows] if rows is not None else x.index_select(0, batch.by_slot)
    if gather is not None:
        grouped_x = grouped_x.index_select(0, gather)
    v = torch.bmm(grouped_x.to(acc).view(num_adapters, longest, -1), stacked.a_t)  # [S, longest, K * R]
    if rows is not None and gather is None and y.dtype == acc:  # updated where they are
        y[rows].view(num_adapters, longest, -1).baddbmm_(v, stacked.b)
        return
    delta = torch.bmm(v, stacked.b).flatten(0, 1)
    if keep is not None:
        delta = delta.index_select(0, keep)
    if rows is not None:
        y[rows] += delta.to(y.dtype)
    else:
        y.index_add_(0, batch.by_slot, delta.to(y.dtype))


def _batch_pages(batch: LoRABatch, table: PageTable, dtype: torch.dtype) -> tuple[slice | torch.Tensor, torch.Tensor]:
    """(pages, owned [T, P]) of the step: its adapters' P pages, slot after slot (a slice when consecutive, so
    reading them copies nothing), and which of them each token's own adapter holds (1, else 0; all 0 for a token
    without one). Made once per step (cached on the batch) for every layer."""
    key = ("dense", dtype)
    if key not in batch.cache:
        pages = [page for slot, _, _ in batch.slot_runs for page in table.host_pages[slot]]
        owner = [slot for slot, _, _ in batch.slot_runs for _ in table.host_pages[slot]]
        device = batch.token_slots.device
        owned = (batch.token_slots[:, None] == torch.tensor(owner).to(device, non_blocking=True)[None, :]).to(dtype)
        index = _as_slice(pages) or torch.tensor(pages, dtype=torch.int64).to(device, non_blocking=True)
        batch.cache[key] = (index, owned)
    return batch.cache[key]


def _all_adapters_at_once(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          batch: LoRABatch, slice_widths: tuple[int, ...], table: PageTable) -> None:
    """y += every token against every page of the step's adapters, other adapters' pages masked out: one shrink
    GEMM and one expand GEMM per slice, in token order (no gather, no scatter)."""
    acc = accumulation_dtype(x.dtype)
    pages, owned = _batch_pages(batch, table, acc)
    tokens, num_pages, num_slices = x.shape[0], owned.shape[1], len(slice_widths)
    a = (lora_a[pages] if isinstance(pages, slice) else lora_a.index_select(0, pages)).to(acc)
    b = (lora_b[pages] if isinstance(pages, slice) else lora_b.index_select(0, pages)).to(acc)
    v = x.to(acc) @ a.view(num_pages * num_slices * PAGE_RANK, x.shape[1]).T  # [T, P * K * PAGE_RANK], page-major
    # Masked and laid out slice-major in one op: slice k's ranks of every page are then one [T, P * 16] matrix.
    masked = torch.empty(tokens, num_slices, num_pages, PAGE_RANK, dtype=acc, device=x.device)
    torch.mul(v.view(tokens, num_pages, num_slices, PAGE_RANK).transpose(1, 2), owned[:, None, :, None], out=masked)
    b = b.view(num_pages * PAGE_RANK, y.shape[1])
    offset = 0
    for k, width in enumerate(slice_widths):
        columns = slice(offset, offset + width)
        if y.dtype == acc:
            y[:, columns].addmm_(masked[:, k].view(tokens, num_pages * PAGE_RANK), b[:, columns])
        else:
            y[:, columns] += (masked[:, k].view(tokens, num_pages * PAGE_RANK) @ b[:, columns]).to(y.dtype)
        offset += width


def _adapter_by_adapter(out: torch.Tensor, grouped_x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                        batch: LoRABatch, slice_widths: tuple[int, ...], table: PageTable,
                        targets: Mapping[int, AdapterSlices] | None) -> None:
    """out [T', D] += each adapter's block of grouped tokens against its own rank of the slices it targets."""
    acc = grouped_x.dtype
    offsets = [sum(slice_widths[:k]) for k in range(len(slice_widths))]
    every_slice = AdapterSlices(tuple(range(len(slice_widths))))
    for slot, start, end in batch.slot_runs:
        if not table.host_ranks[slot]:
            continue
        adapter = every_slice if targets is None else targets.get(slot, _TARGETS_NOTHING)
        if not adapter.slices:
            continue
        if adapter.a_t is not None:
            rank, a_t, b = adapter.rank, adapter.a_t, adapter.b
        else:
            rank = table.host_ranks[slot]
            a = slot_a(lora_a, table, slot)  # [K, pages * PAGE_RANK, d_in]
            a_t = a[list(adapter.slices), :rank].flatten(0, 1).T.to(acc)
            b_all = slot_b(lora_b, table, slot)[:rank].to(acc)  # [rank, D]
            b = [b_all[:, offsets[k] : offsets[k] + slice_widths[k]] for k in adapter.slices]
        v = grouped_x[start:end] @ a_t  # [n, len(slices) * rank]
        for j, k in enumerate(adapter.slices):
            out[start:end, offsets[k] : offsets[k] + slice_widths[k]].addmm_(v[:, j * rank : (j + 1) * rank], b[j])
