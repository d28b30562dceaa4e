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
zero. Gathered: the adapters' weights kept stacked from step to step (`kernels.layer_adapters.AdapterStack`: a
batch copies only the adapters the stack lacks) and every token reading its own adapter's rows of the stack, in
token order (`embedding_bag`, a weighted sum of rows per token): one op for the shrink and one per slice for the
expand whatever the number of adapters, no padding, no gather or scatter of tokens when every token has an
adapter; runs long enough for a GEMM of their own go adapter by adapter. On a CPU each torch op costs
microseconds whatever its size, so the few ops win where adapters are many and runs short (decode).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from kernels.layer_adapters import TARGETS_NOTHING, AdapterSlices, AdapterStack, LayerAdapters, StackGroup
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
# many flops. `benchmarks/lora_paths.py` times the three ways on real layer shapes and reports which constants'
# choices lose least against the fastest way (with GATHERED_FLOPS_FACTOR, below).
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
    runs: Sequence[int] = range(len(batch.slot_runs))
    if path == "gathered":
        plan = _gather_plan(batch, table, targets, x.shape[1], slice_widths)
        gathered = bool(plan.gathered) and _gathered(y, x, batch, plan, targets, slice_widths)
        # The plan is shared by the step's layers of this shape: an adapter idle where it was made may target this
        # layer (PEFT's layers_to_transform), and goes adapter by adapter, as do gathered runs where the layer's
        # group has no room for their stack.
        runs = plan.apart
        if plan.idle:
            adapters = _batch_adapters(batch, targets)
            runs += tuple(i for i in plan.idle if adapters[i].slices)
        if not gathered:
            runs += plan.gathered
        if not runs:
            return
    acc = accumulation_dtype(x.dtype)
    grouped = batch.grouped_from is not None  # the tokens with a slot already one block, grouped by slot
    rows = slice(batch.grouped_from, batch.grouped_from + len(batch.by_slot)) if grouped else slice(0)
    # index_select copies whole rows: faster on a CPU than x[by_slot]
    grouped_x = (x[rows] if grouped else x.index_select(0, batch.by_slot)).to(acc)
    in_place = grouped and y.dtype == acc  # updated where they are: no delta, no scatter
    out = y[rows] if in_place else torch.zeros(len(batch.by_slot), y.shape[1], dtype=acc, device=y.device)
    _adapter_by_adapter(out, grouped_x, lora_a, lora_b, batch, runs, slice_widths, table, targets)
    if in_place:
        return
    if grouped:
        y[rows] += out.to(y.dtype)
    else:
        y.index_add_(0, batch.by_slot, out.to(y.dtype))


def _batch_adapters(batch: LoRABatch, targets: Mapping[int, AdapterSlices]) -> tuple[AdapterSlices, ...]:
    """What `targets` holds of each run's adapter (one missing there targets nothing)."""
    return tuple(map(targets.get, _run_shape(batch).slots, repeat(TARGETS_NOTHING)))


@dataclass(frozen=True)
class _RunShape:
    """What the cost model and the gathered way read of a step's runs (`batch.slot_runs`), the same in every layer
    (cached on the batch): each run's slot, tokens, and first row in `by_slot`."""

    slots: tuple[int, ...]
    lengths: tuple[int, ...]
    starts: tuple[int, ...]


def _run_shape(batch: LoRABatch) -> _RunShape:
    key = ("runs",)
    if key not in batch.cache:
        slots, starts, ends = (tuple(column) for column in zip(*batch.slot_runs, strict=True))
        batch.cache[key] = _RunShape(slots, tuple(end - start for start, end in zip(starts, ends, strict=True)), starts)
    return batch.cache[key]


def _run_pages(batch: LoRABatch, table: PageTable) -> tuple[int, bool]:
    """(pages of all runs' slots, whether the all-at-once path reads them as a view), cached on the batch."""
    key = ("run pages",)
    if key not in batch.cache:
        pages = [page for slot, _, _ in batch.slot_runs for page in table.host_pages[slot]]
        batch.cache[key] = (len(pages), _as_slice(pages) is not None)
    return batch.cache[key]


# Flops-equivalent of copying one element: a gather of pages, or building a stack.
COPY_FLOPS = 4


def lora_path(batch: LoRABatch, table: PageTable, d_in: int, slice_widths: tuple[int, ...],
              targets: Mapping[int, AdapterSlices] | None, has_pages: bool = True) -> str:
    """"adapter", "dense" or "gathered": the way of `add_lora` whose flops, copies (`COPY_FLOPS` per element) and
    ops (`FLOPS_PER_OP` each) cost least for this call. Dense reads the pages (`has_pages`). Gathered needs every
    adapter's weights kept (`LayerAdapters` of `AdapterSlices` with weights: a CPU model runner's); writing the
    adapters its stack lacks counts.

    Decided once per step for all layers of one shape (cached on the batch): they see the same adapters, and the
    Python that prices a batch of 32 adapters costs as much as the LoRA ops of a small layer. Where an adapter
    targets only some of those layers the first one's targets price them all; what each layer adds is its own."""
    if len(batch.slot_runs) < 2:  # one adapter: its own GEMMs, nothing wasted
        return "adapter"
    key = ("path", d_in, slice_widths, has_pages)
    if key not in batch.cache:
        batch.cache[key] = _cheapest_path(batch, table, d_in, slice_widths, targets, has_pages)
    return batch.cache[key]


def _cheapest_path(batch: LoRABatch, table: PageTable, d_in: int, slice_widths: tuple[int, ...],
                   targets: Mapping[int, AdapterSlices] | None, has_pages: bool) -> str:
    alone, kept = _alone_costs(batch, table, targets, d_in, slice_widths)
    costs = {"adapter": sum(alone)}
    if has_pages:
        num_slices, (pages, consecutive) = len(slice_widths), _run_pages(batch, table)
        dense_rows = pages * PAGE_RANK * (num_slices * d_in + sum(slice_widths))
        costs["dense"] = (2 * len(batch.token_slots) * dense_rows + (2 + num_slices) * FLOPS_PER_OP
                          + (0 if consecutive else COPY_FLOPS * dense_rows))
    if kept and isinstance(targets, LayerAdapters):
        plan = _gather_plan(batch, table, targets, d_in, slice_widths)
        if plan.gathered:
            costs["gathered"] = plan.cost
    return min(costs, key=costs.get)


def _alone_costs(batch: LoRABatch, table: PageTable, targets: Mapping[int, AdapterSlices] | None, d_in: int,
                 slice_widths: tuple[int, ...]) -> tuple[list[int], bool]:
    """(per run, what its adapter's own GEMMs and ops cost in a layer of this shape, 0 where it adds nothing there;
    whether every adapter that adds something has its weights kept, `AdapterSlices.a_t`), made on `targets`'
    adapters (None: every adapter on every slice) and cached on the batch: `lora_path` and `_gather_plan` read it."""
    key = ("alone", d_in, slice_widths)
    if key not in batch.cache:
        runs = _run_shape(batch)
        every_slice = AdapterSlices(tuple(range(len(slice_widths))))
        adapters = _batch_adapters(batch, targets) if targets is not None else (every_slice,) * len(runs.slots)
        costs, kept = [], True
        for n, adapter, slot in zip(runs.lengths, adapters, runs.slots, strict=True):
            rank = table.host_ranks[slot]
            if not adapter.slices or not rank:
                costs.append(0)
                continue
            if adapter.a_t is not None:
                per_token = adapter.flops_per_token
            else:
                kept = False
                per_token = 2 * rank * (len(adapter.slices) * d_in + sum(slice_widths[k] for k in adapter.slices))
            costs.append(n * per_token + (3 + len(adapter.slices)) * FLOPS_PER_OP)
        batch.cache[key] = (costs, kept)
    return batch.cache[key]


# Steps an adapter written into a stack serves, over which `lora_path` spreads the cost of writing it: its request
# decodes on for tens of steps, and the stack keeps it while batches use it. Charged whole to the step that writes
# it, a stack would never be built where it pays off over the next steps.
STACK_REUSE_STEPS = 8

# The gathered way reads a token's adapter row by row (a weighted sum of rows, `embedding_bag`), a GEMV where the
# adapter-by-adapter way runs a GEMM over the adapter's tokens: `lora_path` prices its flops at this multiple of a
# GEMM's, so that a long run (a prefill chunk) goes adapter by adapter. On a 2-core CPU one adapter's 16-256 tokens
# alone ran 2-3x slower gathered; among other adapters' (`benchmarks/lora_paths.py`, 64 tokens each) about as fast.
# Over three runs of that benchmark no pair of constants was best twice; 1.5 with FLOPS_PER_OP 0.1 million was best
# once and, in the others, lost most of its excess on the largest rows, whose times swing most between runs.
GATHERED_FLOPS_FACTOR = 1.5


@dataclass(frozen=True)
class _GatherPlan:
    """How the gathered way would run one layer's step: the runs (indices into `batch.slot_runs`) it takes
    (`gathered`), those it leaves to the adapter-by-adapter way (`apart`: runs long enough for a GEMM of their own)
    and those whose adapter targets nothing in the layer it was planned on (`idle`), with `cost` the flops of the
    first two, the ops, and the writes of the adapters the layer's stack lacks."""

    gathered: tuple[int, ...]
    apart: tuple[int, ...]
    idle: tuple[int, ...]
    cost: int


def _gather_plan(batch: LoRABatch, table: PageTable, targets: LayerAdapters, d_in: int,
                 slice_widths: tuple[int, ...]) -> _GatherPlan:
    """The `_GatherPlan` of this step's layers of this shape (cached on the batch as `lora_path`'s choice is, for the
    same reason: `lora_path` and every such layer's `add_lora` read it), made on `targets`' adapters."""
    key = ("gather plan", d_in, slice_widths)
    if key not in batch.cache:
        runs, adapters = _run_shape(batch), _batch_adapters(batch, targets)
        serving = [slot for slot, adapter in zip(runs.slots, adapters, strict=True) if adapter.slices]
        group = targets.group
        new = group.stack.newcomers(serving) if group.stack is not None and serving else None
        if new is None:  # a new stack of just these, where the group has room for it
            shape = group.new_stack(serving, d_in, slice_widths)
            if shape is None:
                idle = tuple(i for i, adapter in enumerate(adapters) if not adapter.slices)
                busy = tuple(i for i, adapter in enumerate(adapters) if adapter.slices)
                batch.cache[key] = _GatherPlan((), busy, idle, 0)
                return batch.cache[key]
            new, (slices, rank, _) = serving, shape
        else:
            slices, rank = group.stack.slices, group.stack.rank
        # Every token reads its stack position's whole width: the stack's slices at the stack's rank.
        per_token = GATHERED_FLOPS_FACTOR * 2 * AdapterStack.position_elements(slices, rank, d_in, slice_widths)
        alone, _ = _alone_costs(batch, table, targets, d_in, slice_widths)
        gathered, apart, idle, cost = [], [], [], 0
        for i, (n, adapter, own) in enumerate(zip(runs.lengths, adapters, alone, strict=True)):
            if not adapter.slices:
                idle.append(i)
                continue
            read = n * per_token
            (gathered if read < own else apart).append(i)
            cost += min(read, own)
        if gathered:
            taken = {runs.slots[i] for i in gathered}
            writes = sum(COPY_FLOPS * AdapterStack.position_elements(a.slices, a.rank, d_in, slice_widths)
                         + 2 * len(a.slices) * FLOPS_PER_OP for a in (targets[slot] for slot in new if slot in taken))
            cost += (4 + 2 * len(slices)) * FLOPS_PER_OP + writes // STACK_REUSE_STEPS
        batch.cache[key] = _GatherPlan(tuple(gathered), tuple(apart), tuple(idle), int(cost))
    return batch.cache[key]


@dataclass(frozen=True)
class _GatherIndex:
    """Which rows of a stack's tables each gathered token reads, flat, as `_weighted_row_sums` takes them: `a` the
    n tokens' d_in rows of the A table each (position p's rows p * d_in ... p * d_in + d_in - 1), `b` their R rows
    of each B table, `a_starts` and `b_starts` where each token's rows begin; `tokens` the n tokens, None where they
    are the step's every token in order (the inputs and outputs then need no gather or scatter)."""

    tokens: torch.Tensor | None
    a: torch.Tensor
    a_starts: torch.Tensor
    b: torch.Tensor
    b_starts: torch.Tensor


def _gather_index(batch: LoRABatch, runs: _RunShape, gathered: tuple[int, ...], positions: list[int], d_in: int,
                  rank: int) -> _GatherIndex:
    """The `_GatherIndex` of the gathered runs at their stack positions (made once per step for the groups whose
    stacks agree: after the same batches, they place the same adapters alike)."""
    key = ("gather index", gathered, tuple(positions), d_in, rank)
    if key in batch.cache:
        return batch.cache[key]
    if ("by_slot", "host") not in batch.cache:  # read from the device once per step, and only for this way
        batch.cache[("by_slot", "host")] = batch.by_slot.cpu().numpy()
    starts, lengths, by_slot = np.asarray(runs.starts), np.asarray(runs.lengths), batch.cache[("by_slot", "host")]
    if len(gathered) < len(starts):
        starts, lengths = starts[list(gathered)], lengths[list(gathered)]
        tokens = by_slot[np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())]
    else:
        tokens = by_slot
    token_positions = np.repeat(np.asarray(positions), lengths)
    every_token = len(tokens) == len(batch.token_slots)
    if every_token:  # in token order instead
        in_order = np.empty_like(token_positions)
        in_order[tokens] = token_positions
        token_positions = in_order
    device = batch.by_slot.device
    rows_a = np.add.outer(token_positions * d_in, np.arange(d_in)).ravel()
    rows_b = np.add.outer(token_positions * rank, np.arange(rank)).ravel()
    bag_starts = np.arange(len(token_positions))
    batch.cache[key] = _GatherIndex(None if every_token else _host_index(tokens).to(device, non_blocking=True),
                                    *(_host_index(values).to(device, non_blocking=True)
                                      for values in (rows_a, bag_starts * d_in, rows_b, bag_starts * rank)))
    return batch.cache[key]


def _host_index(values: list[int] | np.ndarray) -> torch.Tensor:
    """An int64 index built on the host (numpy, not `torch.tensor`: nothing here waits for a device)."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def _gathered(y: torch.Tensor, x: torch.Tensor, batch: LoRABatch, plan: _GatherPlan, targets: LayerAdapters,
              slice_widths: tuple[int, ...]) -> bool:
    """y += the plan's gathered runs through their adapters' positions of the layer's stack, every token reading its
    own position's rows: one `embedding_bag` (a weighted sum of rows per token) for the shrink of every slice and
    one per slice for the expand. No padding, and nothing copied but the adapters the stack lacks. False (nothing
    added) when the layer's group has no room for a stack of them."""
    stacked = _stacked(batch, plan, targets.group, x.shape[1], slice_widths, accumulation_dtype(x.dtype), x.device)
    if stacked is None:
        return False
    stack, index = stacked
    # An adapter that targets nothing here (the plan was made on another layer of the shape: PEFT's
    # layers_to_transform) has zeros in this layer's rows, and adds nothing.
    a_rows, b_rows = stack.a_rows[targets.member], stack.b_rows[targets.member]
    xs = (x if index.tokens is None else x.index_select(0, index.tokens)).to(a_rows.dtype)
    v = _weighted_row_sums(a_rows, index.a, index.a_starts, xs.reshape(-1))  # [n, slices * R]
    by_slice = v.view(len(v), len(stack.slices), stack.rank).transpose(0, 1).contiguous()  # [slices, n, R]
    parts = [_weighted_row_sums(rows, index.b, index.b_starts, by_slice[i].view(-1)) for i, rows in enumerate(b_rows)]
    delta = _join_slices(parts, stack.slices, slice_widths).to(y.dtype)
    if index.tokens is None:
        y += delta
    else:
        y.index_add_(0, index.tokens, delta)
    return True


def _stacked(batch: LoRABatch, plan: _GatherPlan, group: StackGroup, d_in: int, slice_widths: tuple[int, ...],
             dtype: torch.dtype, device: torch.device) -> tuple[AdapterStack, _GatherIndex] | None:
    """The group's stack with the plan's gathered adapters and where their tokens read it: placed once per step
    for the group's layers (cached on the batch); None when the group has no room for such a stack."""
    key = ("stacked", id(group), plan.gathered)
    if key not in batch.cache:
        runs = _run_shape(batch)
        stacked = group.stack_for([runs.slots[i] for i in plan.gathered], d_in, slice_widths, dtype, device)
        batch.cache[key] = None if stacked is None else (
            stacked[0], _gather_index(batch, runs, plan.gathered, stacked[1], d_in, stacked[0].rank))
    return batch.cache[key]


def _weighted_row_sums(table: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """[bags, width]: for each bag (`rows[starts[i]:starts[i + 1]]`), its rows of `table` times their `weights`,
    summed. `embedding_bag` called as the op itself: `F.embedding_bag`'s argument checks and its offsets tensor,
    made anew each call, cost ~10 us a call on a CPU, and a step of the demo model makes 44 calls."""
    return torch.embedding_bag(table, rows, starts, False, 0, False, weights, False)[0]


def _join_slices(parts: list[torch.Tensor], slices: tuple[int, ...], slice_widths: tuple[int, ...]) -> torch.Tensor:
    """[n, D]: each of `slices`' part [n, its width] in that slice's columns, zeros in the others."""
    if slices == tuple(range(len(slice_widths))):
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    delta = parts[0].new_zeros(len(parts[0]), sum(slice_widths))
    for k, part in zip(slices, parts, strict=True):
        offset = sum(slice_widths[:k])
        delta[:, offset : offset + slice_widths[k]] = part
    return delta


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
