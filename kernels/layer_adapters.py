"""What one LoRA layer keeps of its adapters for the torch reference (`kernels.reference.add_lora`).

`AdapterSlices`: one adapter in one layer, the fused slices it targets and, on a CPU, their weights as its GEMMs
read them. `LayerAdapters`: a layer's adapters by slot, and `AdapterStack`, the adapters of recent batches in one
table each token's rows are gathered from, kept from step to step so that a batch whose adapters come and go a few
at a time copies only the newcomers' weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class AdapterSlices:
    """One adapter in one layer, as the per-adapter path of `add_lora` reads it: the fused slices it targets (its
    pages hold zeros in the others) and, where given, those slices' weights laid out for its GEMMs (`a_t`: A of
    every targeted slice, `rank` rows each, transposed to [d_in, n * rank]; `b`: B^T [rank, width] per slice).
    Read from the pages instead, they cost a handful of view and copy ops per adapter, layer and step, which on a
    CPU is most of the LoRA time of a small model; a CPU model runner gives them once, when it loads the adapter
    (`server.lora_linear.LoRALinear.hold`: views of the host tier's buffer). Compared by identity: an adapter
    loaded again is another one."""

    slices: tuple[int, ...]
    rank: int = 0
    a_t: torch.Tensor | None = None
    b: tuple[torch.Tensor, ...] = ()
    flops_per_token: int = 0  # of its shrink and expands, where its weights are given (`lora_path` reads it)
    # DoRA's and IA3's vectors where they are given (`kernels.scales`: stored minus one): output scale and shift
    # [sum of widths], input scale [d_in]
    out_scale: torch.Tensor | None = None
    out_shift: torch.Tensor | None = None
    in_scale: torch.Tensor | None = None


TARGETS_NOTHING = AdapterSlices(())


class AdapterStack:
    """Adapters of one layer in one table, position p holding one adapter: `a_t` [C, d_in, n * R] its A of each of
    `slices` (the fused slices the stack serves, n of them) in R-wide column blocks, `b[i]` [C, R, width of
    slices[i]] its B^T of slices[i], zeros wherever it has no weight (a slice it does not target, ranks past its
    own), R the largest rank it serves. Flattened to [C * d_in, n * R] and [C * R, width], a token of the adapter
    at p reads rows p * d_in ... and p * R ... of them (the gathered way of `kernels.reference`). A batch's
    adapters the stack lacks are written over the positions of adapters that batch does not use, so only
    newcomers are copied; a batch that does not fit (more adapters than positions, a larger rank, another slice)
    gets a new stack (`LayerAdapters.stack_for`), where the layer's bound on its stack's size leaves room."""

    def __init__(self, slices: tuple[int, ...], rank: int, capacity: int, d_in: int, widths: Sequence[int],
                 dtype: torch.dtype, device: torch.device):
        self.slices, self.rank = slices, rank
        self.a_t = torch.zeros(capacity, d_in, len(slices) * rank, dtype=dtype, device=device)
        self.b = tuple(torch.zeros(capacity, rank, widths[k], dtype=dtype, device=device) for k in slices)
        self.a_rows, self.b_rows = self.a_t.flatten(0, 1), tuple(b.flatten(0, 1) for b in self.b)  # as tokens read them
        self.nbytes = self.a_t.nbytes + sum(b.nbytes for b in self.b)
        self.held: list[AdapterSlices | None] = [None] * capacity
        self._position: dict[int, int] = {}  # id(adapter) -> position; `held` keeps it alive, so no id is reused

    @property
    def capacity(self) -> int:
        return len(self.held)

    @staticmethod
    def capacity_for(adapters: int) -> int:
        """Positions of a new stack for `adapters`: a few more, so that a batch growing by some need not rebuild."""
        return adapters + adapters // 4 + 1

    @staticmethod
    def position_elements(slices: Sequence[int], rank: int, d_in: int, widths: Sequence[int]) -> int:
        """Elements one position of a stack of `slices` at `rank` holds: A's rows and B's columns of each slice."""
        return rank * (len(slices) * d_in + sum(widths[k] for k in slices))

    def newcomers(self, adapters: Sequence[AdapterSlices]) -> list[AdapterSlices] | None:
        """The adapters of `adapters` the stack would have to write, once each; None when they do not fit."""
        wanted = {id(a): a for a in adapters}
        new = [a for key, a in wanted.items() if key not in self._position]
        if not new:  # the common step: the batch's adapters are the last one's, or some of them
            return new
        fits = all(a.rank <= self.rank and set(a.slices) <= set(self.slices) for a in new)
        reusable = sum(1 for a in self.held if a is None or id(a) not in wanted)
        return new if fits and len(new) <= reusable else None

    def place(self, adapters: Sequence[AdapterSlices]) -> list[int] | None:
        """Each adapter's position, writing in those the stack lacks; None (writing nothing) when they do not fit."""
        held = [self._position.get(id(a)) for a in adapters]
        if None not in held:  # the common step: no newcomer
            return held
        new = self.newcomers(adapters)
        if new is None:
            return None
        wanted = {id(a) for a in adapters}
        reusable = [p for p, a in enumerate(self.held) if a is None or id(a) not in wanted]
        for adapter, position in zip(new, reusable, strict=False):  # newcomers checked there are enough
            self._write(position, adapter)
        return [self._position[id(a)] for a in adapters]

    def drop(self, adapter: AdapterSlices) -> None:
        """Let go of `adapter` (its slot was cleared): its position is free, its weights no longer referenced."""
        position = self._position.pop(id(adapter), None)
        if position is not None:
            self.held[position] = None

    def _write(self, position: int, adapter: AdapterSlices) -> None:
        previous = self.held[position]
        if previous is not None:
            del self._position[id(previous)]
        self.held[position], self._position[id(adapter)] = adapter, position
        rank, r = self.rank, adapter.rank
        if r == rank and adapter.slices == self.slices:  # it fills the position: A in one copy
            self.a_t[position].copy_(adapter.a_t)
            for b, b_j in zip(self.b, adapter.b, strict=True):
                b[position].copy_(b_j)
            return
        # What it does not fill must read as zero.
        self.a_t[position].zero_()
        for b in self.b:
            b[position].zero_()
        for j, k in enumerate(adapter.slices):
            i = self.slices.index(k)
            self.a_t[position, :, i * rank : i * rank + r] = adapter.a_t[:, j * r : (j + 1) * r]
            self.b[i][position, :r] = adapter.b[j]


class LayerAdapters(dict[int, AdapterSlices]):
    """One layer's `AdapterSlices` by slot, the `AdapterStack` of its recent batches, and the vectors of its recent
    batches' scaled adapters (`kernels.scales`)."""

    def __init__(self, max_stack_elements: int | None = None) -> None:
        super().__init__()
        self.stack: AdapterStack | None = None
        # What the layer's stack may hold at most (the model runner's share of the stacks' budget); None: no bound.
        self.max_stack_elements = max_stack_elements
        # field -> (the adapters it was stacked for, by identity; [1 + n, width]: zeros, then each one's vector)
        self._vector_tables: dict[str, tuple[tuple[int, ...], torch.Tensor | None]] = {}

    def vector_table(self, field: str, slots: Sequence[int]) -> torch.Tensor | None:
        """[1 + len(slots), width]: a row of zeros, then the `field` vector of each slot's adapter (zeros for one
        without it here); None when none has it. Kept while a step's scaled adapters are the last step's."""
        adapters = [self.get(slot) for slot in slots]
        key = tuple(id(adapter) for adapter in adapters)
        kept = self._vector_tables.get(field)
        if kept is not None and kept[0] == key:
            return kept[1]
        vectors = [None if adapter is None else getattr(adapter, field) for adapter in adapters]
        some = next((vector for vector in vectors if vector is not None), None)
        table = None
        if some is not None:
            zeros = torch.zeros_like(some)
            table = torch.stack([zeros, *(zeros if vector is None else vector for vector in vectors)])
        # The key holds ids of adapters `self` holds; one forgotten is dropped from here too (`forget`).
        self._vector_tables[field] = (key, table)
        return table

    @property
    def stack_bytes(self) -> int:
        """Bytes the layer's kept stack takes (0 without one)."""
        return 0 if self.stack is None else self.stack.nbytes

    def new_stack_capacity(self, adapters: Sequence[AdapterSlices], d_in: int, widths: Sequence[int]) -> int | None:
        """Positions of a new stack of just `adapters` within `max_stack_elements` (room to grow where it fits);
        None when not even they fit."""
        distinct = len({id(a) for a in adapters})
        slices = {k for a in adapters for k in a.slices}
        position = AdapterStack.position_elements(tuple(slices), max((a.rank for a in adapters), default=0), d_in,
                                                  widths)
        limit = self.max_stack_elements
        for capacity in (AdapterStack.capacity_for(distinct), distinct):
            if limit is None or capacity * position <= limit:
                return capacity
        return None

    def stack_for(self, adapters: Sequence[AdapterSlices], d_in: int, widths: Sequence[int],
                  dtype: torch.dtype, device: torch.device) -> tuple[AdapterStack, list[int]] | None:
        """The stack with every adapter of `adapters` (each with its weights, or targeting nothing) and their
        positions: the kept one where they fit, else a new one of just them; None when that would be larger than
        `max_stack_elements` (the kept one stays)."""
        positions = self.stack.place(adapters) if self.stack is not None else None
        if positions is None:
            capacity = self.new_stack_capacity(adapters, d_in, widths)
            if capacity is None:
                return None
            self.stack = None  # its memory goes before the new stack takes its own
            slices = tuple(sorted({k for a in adapters for k in a.slices}))
            rank = max((a.rank for a in adapters), default=0)
            self.stack = AdapterStack(slices, rank, capacity, d_in, widths, dtype, device)
            positions = self.stack.place(adapters)
        return self.stack, positions

    def forget(self, slot: int) -> None:
        """Drop the slot's adapter, from the stack too (its slot was cleared)."""
        adapter = self.pop(slot, None)
        if adapter is not None and self.stack is not None:
            self.stack.drop(adapter)
        if adapter is not None:  # an id in a kept table's key could otherwise be reused by a newer adapter
            self._vector_tables = {field: kept for field, kept in self._vector_tables.items()
                                   if id(adapter) not in kept[0]}
