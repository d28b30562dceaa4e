"""What the LoRA layers keep of their adapters for the torch reference (`kernels.reference.add_lora`).

`AdapterSlices`: one adapter in one layer, the fused slices it targets and, on a CPU, their weights as its GEMMs
read them. `LayerAdapters`: a layer's adapters by slot. `StackGroup`: the layers of one shape, which read a batch's
adapters from one `AdapterStack`, a table per layer each token's rows are gathered from, kept from step to step
so that a batch whose adapters come and go a few at a time copies only the newcomers' weights, and placed once per
step for all the group's layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    """Adapters of the layers of one `StackGroup`, one table per layer, position p holding one slot's adapter in
    every layer: `a_t` [L, C, d_in, n * R] its A of each of `slices` (the fused slices the stack serves, n of them)
    in R-wide column blocks, `b[i]` [L, C, R, width of slices[i]] its B^T of slices[i], zeros wherever it has no
    weight (a slice or a layer it does not target, ranks past its own), R the largest rank it serves. Flattened
    to [C * d_in, n * R] and [C * R, width] per layer (`a_rows`, `b_rows`), a token of the adapter at p reads rows
    p * d_in ... and p * R ... of its layer's (the gathered way of `kernels.reference`). A batch's adapters the
    stack lacks are written over the positions of adapters that batch does not use, so only newcomers are copied;
    a batch that does not fit (more adapters than positions, a larger rank, another slice) gets a new stack
    (`StackGroup.stack_for`), where the group's bound on its stack's size leaves room."""

    def __init__(self, layers: Sequence[Mapping[int, AdapterSlices]], slices: tuple[int, ...], rank: int,
                 capacity: int, d_in: int, widths: Sequence[int], dtype: torch.dtype, device: torch.device):
        self.layers, self.slices, self.rank = layers, slices, rank
        self.a_t = torch.zeros(len(layers), capacity, d_in, len(slices) * rank, dtype=dtype, device=device)
        self.b = tuple(torch.zeros(len(layers), capacity, rank, widths[k], dtype=dtype, device=device)
                       for k in slices)
        # Per layer, as its tokens read them.
        self.a_rows = [a_t.flatten(0, 1) for a_t in self.a_t]
        self.b_rows = [tuple(b[layer].flatten(0, 1) for b in self.b) for layer in range(len(layers))]
        self.nbytes = self.a_t.nbytes + sum(b.nbytes for b in self.b)
        self.held: list[int | None] = [None] * capacity  # the slot at each position
        self._position: dict[int, int] = {}  # slot -> position

    @property
    def capacity(self) -> int:
        return len(self.held)

    @staticmethod
    def capacity_for(adapters: int) -> int:
        """Positions of a new stack for `adapters`: a few more, so that a batch growing by some need not rebuild."""
        return adapters + adapters // 4 + 1

    @staticmethod
    def position_elements(slices: Sequence[int], rank: int, d_in: int, widths: Sequence[int]) -> int:
        """Elements one position of a stack of `slices` at `rank` holds in one layer: A's rows and B's columns of
        each slice."""
        return rank * (len(slices) * d_in + sum(widths[k] for k in slices))

    def newcomers(self, slots: Sequence[int]) -> list[int] | None:
        """The slots of `slots` (distinct) whose adapters the stack would have to write; None when they do not
        fit."""
        new = [slot for slot in slots if slot not in self._position]
        if not new:  # the common step: the batch's adapters are the last one's, or some of them
            return new
        served = set(self.slices)
        fits = all(adapter.rank <= self.rank and served.issuperset(adapter.slices)
                   for slot in new for adapter in self._adapters(slot))
        reusable = self.capacity - (len(slots) - len(new))  # the positions no adapter of `slots` holds
        return new if fits and len(new) <= reusable else None

    def place(self, slots: Sequence[int]) -> list[int] | None:
        """Each slot's position (`slots` distinct), writing in the adapters the stack lacks; None (writing nothing)
        when they do not fit."""
        held = [self._position.get(slot) for slot in slots]
        if None not in held:  # the common step: no newcomer
            return held
        new = self.newcomers(slots)
        if new is None:
            return None
        wanted = set(slots)
        reusable = [p for p, held in enumerate(self.held) if held is None or held not in wanted]
        for slot, position in zip(new, reusable, strict=False):  # newcomers checked there are enough
            self._write(position, slot)
        return [self._position[slot] for slot in slots]

    def drop(self, slot: int) -> None:
        """Let go of the slot's adapter (its slot was cleared or loaded again): its position is free."""
        position = self._position.pop(slot, None)
        if position is not None:
            self.held[position] = None

    def _adapters(self, slot: int) -> list[AdapterSlices]:
        return [layer.get(slot, TARGETS_NOTHING) for layer in self.layers]

    def _write(self, position: int, slot: int) -> None:
        previous = self.held[position]
        if previous is not None:
            del self._position[previous]
        self.held[position], self._position[slot] = slot, position
        rank = self.rank
        for layer, adapter in enumerate(self._adapters(slot)):
            a_t, bs = self.a_t[layer, position], [b[layer, position] for b in self.b]
            r = adapter.rank
            if adapter.slices == self.slices and r == rank:  # it fills the position: A in one copy
                a_t.copy_(adapter.a_t)
                for b, b_j in zip(bs, adapter.b, strict=True):
                    b.copy_(b_j)
                continue
            # What it does not fill must read as zero.
            a_t.zero_()
            for b in bs:
                b.zero_()
            for j, k in enumerate(adapter.slices):
                i = self.slices.index(k)
                a_t[:, i * rank : i * rank + r] = adapter.a_t[:, j * r : (j + 1) * r]
                bs[i][:r] = adapter.b[j]


class StackGroup:
    """LoRA layers of one shape (input width, fused slices' widths) whose batches are read from one kept
    `AdapterStack`: a step places its adapters once for all of them (a model runner's step has one of every
    shape per transformer block, so per-layer placement would repeat the same Python in every block), and
    `max_elements`, the group's share of the stacks' budget, bounds its size (None: no bound)."""

    def __init__(self, max_elements: int | None = None) -> None:
        self.layers: list[LayerAdapters] = []
        self.max_elements = max_elements
        self.stack: AdapterStack | None = None

    def join(self, layer: LayerAdapters) -> int:
        """Add a layer; its index in the group (the stack's layer it reads)."""
        self.layers.append(layer)
        self.stack = None  # one table per layer: a stack made before this one has none for it
        return len(self.layers) - 1

    @property
    def nbytes(self) -> int:
        """Bytes the kept stack takes (0 without one)."""
        return 0 if self.stack is None else self.stack.nbytes

    def new_stack(self, slots: Sequence[int], d_in: int,
                  widths: Sequence[int]) -> tuple[tuple[int, ...], int, int] | None:
        """(slices, rank, positions) of a new stack of just `slots`' adapters: every slice any of them targets in any
        of the group's layers, at the largest rank, with room to grow where `max_elements` allows; None when not
        even they fit."""
        adapters = [layer[slot] for slot in slots for layer in self.layers if slot in layer]
        slices = tuple(sorted({k for a in adapters for k in a.slices}))
        rank = max((a.rank for a in adapters), default=0)
        per_position = len(self.layers) * AdapterStack.position_elements(slices, rank, d_in, widths)
        for capacity in (AdapterStack.capacity_for(len(slots)), len(slots)):
            if self.max_elements is None or capacity * per_position <= self.max_elements:
                return slices, rank, capacity
        return None

    def stack_for(self, slots: Sequence[int], d_in: int, widths: Sequence[int], dtype: torch.dtype,
                  device: torch.device) -> tuple[AdapterStack, list[int]] | None:
        """The stack with the adapters of every one of `slots` (distinct; each adapter with its weights, or
        targeting nothing, in every layer) and their positions: the kept one where they fit, else a new one of
        just them; None when that would be larger than `max_elements` (the kept one stays)."""
        positions = self.stack.place(slots) if self.stack is not None else None
        if positions is None:
            shape = self.new_stack(slots, d_in, widths)
            if shape is None:
                return None
            self.stack = None  # its memory goes before the new stack takes its own
            self.stack = AdapterStack(self.layers, *shape, d_in, widths, dtype, device)
            positions = self.stack.place(slots)
        return self.stack, positions

    def drop(self, slot: int) -> None:
        """Let go of the slot's adapter in the stack (its slot was cleared or loaded again)."""
        # getattr: `copy.deepcopy` of a model refills its layers' adapters before their group has its attributes.
        stack = getattr(self, "stack", None)
        if stack is not None:
            stack.drop(slot)


class LayerAdapters(dict[int, AdapterSlices]):
    """One layer's `AdapterSlices` by slot, the `StackGroup` it reads batches of many adapters with (a group of
    its own unless given one), and the vectors of its recent batches' scaled adapters (`kernels.scales`)."""

    def __init__(self, group: StackGroup | None = None) -> None:
        super().__init__()
        self.group = StackGroup() if group is None else group
        self.member = self.group.join(self)  # its layer in the group's stack
        self._weighted: bool | None = None  # `weighted`, worked out again after a change
        # field -> (the adapters it was stacked for, by identity; [1 + n, width]: zeros, then each one's vector)
        self._vector_tables: dict[str, tuple[tuple[int, ...], torch.Tensor | None]] = {}

    def __setitem__(self, slot: int, adapter: AdapterSlices) -> None:
        super().__setitem__(slot, adapter)
        self.group.drop(slot)  # a slot loaded again: the stack must not serve what it held before
        self._weighted = None

    @property
    def weighted(self) -> bool:
        """Whether any of its adapters targets a slice here."""
        if self._weighted is None:
            self._weighted = any(adapter.slices for adapter in self.values())
        return self._weighted

    @property
    def stack(self) -> AdapterStack | None:
        """The kept stack of the layer's group."""
        return self.group.stack

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

    def forget(self, slot: int) -> None:
        """Drop the slot's adapter, from the group's stack too (its slot was cleared)."""
        adapter = self.pop(slot, None)
        self.group.drop(slot)
        self._weighted = None
        if adapter is not None:  # an id in a kept table's key could otherwise be reused by a newer adapter
            self._vector_tables = {field: kept for field, kept in self._vector_tables.items()
                                   if id(adapter) not in kept[0]}
