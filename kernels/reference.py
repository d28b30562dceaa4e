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
zero. Stacked: the adapters' weights kept stacked from step to step (`kernels.layer_adapters.AdapterStack`: a
batch copies only the adapters the stack lacks) and each adapter's tokens, padded to the longest run, through one
batched shrink GEMM (`bmm`) and one per slice to expand. On a CPU each torch op costs microseconds whatever
its size, so the few large GEMMs win where adapters are many and the layer small, despite their wasted flops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kernels.layer_adapters import TARGETS_NOTHING, AdapterSlices, AdapterStack, LayerAdapters
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


# What a CPU core computes in the few microseconds a torch op costs to dispatch: `lora_path` prices an op at this
# many flops. `benchmarks/lora_paths.py` times the three ways on real layer shapes and reports which constant's
# choices lose least against the fastest way (on a 2-core CPU: 0.1 million, three runs, since the stacked way counts
# the ops it runs; 0.5-1 million before, when it counted three).
FLOPS_PER_OP = 100_000


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
    # index_select copies whole rows: faster on a CPU than x[by_slot]
    grouped_x = (x[rows] if grouped else x.index_select(0, batch.by_slot)).to(acc)
    in_place = grouped and y.dtype == acc  # updated where they are: no delta, no scatter
    out = y[rows] if in_place else torch.zeros(len(batch.by_slot), y.shape[1], dtype=acc, device=y.device)
    runs = range(len(batch.slot_runs))
    if path == "stacked":
        adapters = _batch_adapters(batch, targets)
        split = _stack_split(batch, table, adapters, targets, x.shape[1], slice_widths)
        if split.stacked:
            stacked = [adapters[i] for i in split.stacked]
            stack, positions = targets.stack_for(stacked, x.shape[1], slice_widths, acc, x.device)
            _stacked(out, grouped_x, batch, split, slice_widths, stack, positions)
        runs = split.apart
    _adapter_by_adapter(out, grouped_x, lora_a, lora_b, batch, runs, slice_widths, table, targets)
    if in_place:
        return
    if grouped:
        y[rows] += out.to(y.dtype)
    else:
        y.index_add_(0, batch.by_slot, out.to(y.dtype))


def _batch_adapters(batch: LoRABatch, targets: Mapping[int, AdapterSlices]) -> tuple[AdapterSlices, ...]:
    """What `targets` holds of each run's adapter (one missing there targets nothing)."""
    return tuple(targets.get(slot, TARGETS_NOTHING) for slot, _, _ in batch.slot_runs)


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
    adapters = _batch_adapters(batch, targets) if targets is not None else (every_slice,) * len(runs.lengths)
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
        costs["stacked"] = _stacked_cost(batch, table, adapters, targets, d_in, slice_widths)
    return min(costs, key=costs.get)


def _stacked_cost(batch: LoRABatch, table: PageTable, adapters: tuple[AdapterSlices, ...], targets: LayerAdapters,
                  d_in: int, slice_widths: tuple[int, ...]) -> int:
    """The stacked way's flops, copies and ops: its GEMMs over every position of the stack it would run on, the
    runs it leaves apart, and writing the adapters the kept stack lacks (or, where they do not fit it, all of them
    into a new one), spread over the steps they serve."""
    plan = _stack_plan(batch, table, adapters, targets, d_in, slice_widths)
    writes = sum(COPY_FLOPS * _stack_elements(a.rank, a.slices, d_in, slice_widths) + 2 * len(a.slices) * FLOPS_PER_OP
                 for a in plan.newcomers)
    return plan.cost + (10 + 3 * len(plan.slices)) * FLOPS_PER_OP + writes // STACK_REUSE_STEPS


def _stack_elements(rank: int, slices: Sequence[int], d_in: int, slice_widths: tuple[int, ...]) -> int:
    """Weights of an adapter of `rank` on `slices` (A's rows and B's columns), as a stack position holds them."""
    return rank * (len(slices) * d_in + sum(slice_widths[k] for k in slices))


@dataclass(frozen=True)
class _StackPlan:
    """How the stacked way would run one layer's step: runs up to `length` through a stack of `slices` and `rank`
    (the kept one, or a new one), writing `newcomers`; `cost` the flops of its GEMMs and of the runs left apart."""

    length: int
    cost: int
    slices: tuple[int, ...]
    newcomers: tuple[AdapterSlices, ...]


def _stack_plan(batch: LoRABatch, table: PageTable, adapters: tuple[AdapterSlices, ...], targets: LayerAdapters,
                d_in: int, slice_widths: tuple[int, ...]) -> _StackPlan:
    """The layer's `_StackPlan` for this step (cached on the batch: `lora_path` and `add_lora` both read it)."""
    key = ("plan", id(targets))
    if key not in batch.cache:
        serving = list({id(a): a for a in adapters if a.slices}.values())
        if not serving:  # nothing to stack: every run targets nothing here
            batch.cache[key] = _StackPlan(0, 0, (), ())
            return batch.cache[key]
        stack = targets.stack
        new = stack.newcomers(serving) if stack is not None else None
        if new is None:  # a new stack of just these
            new = serving
            slices, rank = tuple(sorted({k for a in new for k in a.slices})), max(a.rank for a in new)
        else:
            slices, rank = stack.slices, stack.rank
        per_row = 2 * _stack_elements(rank, slices, d_in, slice_widths)  # flops of one padded row of one run
        length, cost = _stack_length(_run_shape(batch, table).lengths, adapters, per_row)
        batch.cache[key] = _StackPlan(length, cost, slices, tuple(new))
    return batch.cache[key]


# Steps an adapter written into a stack serves, over which `lora_path` spreads the cost of writing it: its request
# decodes on for tens of steps, and the stack keeps it while batches use it. Charged whole to the step that writes
# it, a stack would never be built where it pays off over the next steps.
STACK_REUSE_STEPS = 8


@dataclass(frozen=True)
class _StackSplit:
    """Which runs of a step the stacked way takes, padded to `length` rows each (the shorter repeat their first
    row), and which go adapter by adapter (`apart`: the longer ones, and those whose adapter targets nothing here),
    with the index tensors of the stacked part, in `by_slot` order: `gather` [S * length] the grouped rows each
    padded block reads, `keep` the real rows of the padded result, `rows` where they go."""

    length: int
    stacked: tuple[int, ...]
    apart: tuple[int, ...]
    gather: torch.Tensor
    keep: torch.Tensor
    rows: torch.Tensor


def _stack_length(lengths: Sequence[int], adapters: Sequence[AdapterSlices], per_row: int) -> tuple[int, int]:
    """(L, cost): the run length up to which runs go through the stack, padded to L rows of `per_row` flops each,
    the longer ones adapter by adapter, at the least cost of flops and ops (a prefill chunk among decodes is not
    worth padding every decode to)."""
    best = (0, 0)
    for length in sorted({n for n, a in zip(lengths, adapters, strict=True) if a.slices}):
        cost = sum(n * a.flops_per_token + (3 + len(a.slices)) * FLOPS_PER_OP
                   for n, a in zip(lengths, adapters, strict=True) if a.slices and n > length)
        cost += length * per_row * sum(1 for n, a in zip(lengths, adapters, strict=True) if a.slices and n <= length)
        if best[0] == 0 or cost < best[1]:
            best = (length, cost)
    return best


def _stack_split(batch: LoRABatch, table: PageTable, adapters: tuple[AdapterSlices, ...], targets: LayerAdapters,
                 d_in: int, slice_widths: tuple[int, ...]) -> _StackSplit:
    """The layer's `_StackSplit` for this step (its indices cached on the batch for the layers that agree)."""
    lengths = _run_shape(batch, table).lengths
    length = _stack_plan(batch, table, adapters, targets, d_in, slice_widths).length
    stacked = tuple(i for i, (n, a) in enumerate(zip(lengths, adapters, strict=True)) if a.slices and n <= length)
    key = ("stacked", length, stacked)
    if key not in batch.cache:
        starts = [batch.slot_runs[i][1] for i in stacked]
        gather = [start + min(j, lengths[i] - 1) for i, start in zip(stacked, starts, strict=True)
                  for j in range(length)]
        keep = [s * length + j for s, i in enumerate(stacked) for j in range(lengths[i])]
        rows = [start + j for i, start in zip(stacked, starts, strict=True) for j in range(lengths[i])]
        device = batch.by_slot.device
        batch.cache[key] = tuple(_host_index(v).to(device, non_blocking=True) for v in (gather, keep, rows))
    taken = set(stacked)
    apart = tuple(i for i in range(len(lengths)) if i not in taken)
    return _StackSplit(length, stacked, apart, *batch.cache[key])


def _host_index(values: list[int]) -> torch.Tensor:
    """An int64 index built on the host (numpy, not `torch.tensor`: nothing here waits for a device)."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def _stacked(out: torch.Tensor, grouped_x: torch.Tensor, batch: LoRABatch, split: _StackSplit,
             slice_widths: tuple[int, ...], stack: AdapterStack, positions: list[int]) -> None:
    """out [T', D] += the split's stacked runs through their adapters' positions of `stack`: one bmm shrink over
    the positions up to the last one they use (those the batch does not use read zeros) and one bmm expand per
    slice."""
    runs = len(split.stacked)
    # Positions up to the last one used: newcomers take the lowest free positions, so these stay few past the batch's.
    used = max(positions) + 1
    padded = grouped_x.index_select(0, split.gather).view(runs, split.length, -1)
    in_order = positions == list(range(used))  # run i at position i
    index = None if in_order else _positions_index(batch, positions)
    xs = padded if index is None else padded.new_zeros(used, *padded.shape[1:]).index_copy_(0, index, padded)
    delta = _expand_stacked(torch.bmm(xs, stack.a_t[:used]), stack, used, slice_widths)  # [used, length, D]
    if index is not None:
        delta = delta.index_select(0, index)
    out.index_add_(0, split.rows, delta.flatten(0, 1).index_select(0, split.keep))


def _expand_stacked(v: torch.Tensor, stack: AdapterStack, used: int, slice_widths: tuple[int, ...]) -> torch.Tensor:
    """[used, length, D]: each served slice's ranks of v [used, length, n * R] through the B^T of the stack's first
    `used` positions, in that slice's columns. One bmm per slice into a tensor of its own, then joined: a bmm into a
    column slice of a wider tensor runs several times slower on a CPU."""
    rank = stack.rank
    parts = [torch.bmm(v[:, :, i * rank : (i + 1) * rank], b[:used]) for i, b in enumerate(stack.b)]
    if stack.slices == tuple(range(len(slice_widths))):
        return torch.cat(parts, dim=2)
    delta = v.new_zeros(*v.shape[:2], sum(slice_widths))
    for k, part in zip(stack.slices, parts, strict=True):
        offset = sum(slice_widths[:k])
        delta[:, :, offset : offset + slice_widths[k]] = part
    return delta


def _positions_index(batch: LoRABatch, positions: list[int]) -> torch.Tensor:
    """`positions` as an index on the batch's device, made once per step for the layers whose stacks agree."""
    key = ("positions", tuple(positions))
    if key not in batch.cache:
        batch.cache[key] = _host_index(positions).to(batch.by_slot.device, non_blocking=True)
    return batch.cache[key]


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


def _adapter_by_adapter(out: torch.Tensor, grouped_x: torch.Tensor, lora_a: torch.Tensor | None,
                        lora_b: torch.Tensor | None, batch: LoRABatch, runs: Sequence[int],
                        slice_widths: tuple[int, ...], table: PageTable,
                        targets: Mapping[int, AdapterSlices] | None) -> None:
    """out [T', D] += the block of grouped tokens of each of `runs` (indices into `batch.slot_runs`) against its
    adapter's own rank of the slices it targets."""
    acc = grouped_x.dtype
    offsets = [sum(slice_widths[:k]) for k in range(len(slice_widths))]
    every_slice = AdapterSlices(tuple(range(len(slice_widths))))
    for run in runs:
        slot, start, end = batch.slot_runs[run]
        if not table.host_ranks[slot]:
            continue
        adapter = every_slice if targets is None else targets.get(slot, TARGETS_NOTHING)
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
