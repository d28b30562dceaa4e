"""The device tier of adapters: slots (rows of the page table), the memory they occupy, LRU eviction, pins.

The tier is sized by memory, not by a count: `max_bytes` (by default what start-up gives it, see
`server/runtime.py`), spent by what each adapter really needs, and slots are as many as that memory could hold
of the smallest adapters (`num_slots` caps them where given), so hundreds of small adapters are resident at
once and a batch may mix as many as it has sequences. A slot is pinned while any scheduled sequence uses it and
is never evicted then.

Two ways to hold an adapter, as the model runner says (`paged`):
- in pages (a GPU, or the Triton kernels anywhere): an adapter of rank r is written into `pages_for_rank(r)`
  pages of every `LoRALinear` at once (`kernels.paging` has the layout), with the LoRA scale folded into B so the
  kernels do no scaling; memory is spent in pages of `page_bytes`, so a budget that fits 8 rank-64 adapters fits
  32 rank-16 ones.
- as the host tier's own buffer (a CPU with the torch kernels, where device memory is host memory): the runner
  reads the packed weights where they are, nothing is copied, and memory is spent by the adapter's packed bytes.

Slots are keyed by an opaque, identity-hashed key (the engine uses the adapter *version*), so a replaced
adapter never aliases the slot of its previous version, and a retired version can be discarded at once.

The pool only decides: which slot and pages an adapter gets, what to evict. It touches no device memory.
Each decision that changes device memory is queued as a `PoolWrite` (`LoadAdapter`, `ClearSlot`), in order;
the engine hands them to the model runner (`server/model_runner.py`), which alone writes the pages and the
page table, in that order. A slot's pages are only reused after a `ClearSlot` queued before the load.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable
from dataclasses import dataclass

from kernels.paging import PAGE_RANK, pages_for_rank
from server.adapter_packer import PackedAdapter


@dataclass(frozen=True)
class LoadAdapter:
    """Write `adapter` into `pages` and point `slot`'s page-table row at them (for the pool's `key`)."""

    slot: int
    pages: tuple[int, ...]
    adapter: PackedAdapter
    key: Hashable


@dataclass(frozen=True)
class ClearSlot:
    """Point `slot`'s page-table row back at the zero page, once its last reader ran; its pages are free."""

    slot: int


PoolWrite = LoadAdapter | ClearSlot


def written_rank(adapter: PackedAdapter) -> int:
    """The rank rows an adapter actually writes (the max over modules): the kernels skip every row past it."""
    return max((w.a.shape[0] for w in adapter.weights.values()), default=0)


def adapter_pages(adapter: PackedAdapter, prompt_rows_per_page: int) -> int:
    """Pages an adapter takes in every LoRA layer: those of its rank rows, one for its vectors (DoRA's scale, IA3's)
    where it has them (`server.lora_linear.LoRALinear.write_pages`), and those its soft prompt fills at
    `prompt_rows_per_page` embeddings a page (`server.model_runner.soft_prompt_rows_per_page`)."""
    prompt_pages = -(-adapter.num_virtual_tokens // prompt_rows_per_page) if adapter.num_virtual_tokens else 0
    return pages_for_rank(written_rank(adapter)) + adapter.has_vectors + prompt_pages


def max_rank_adapter_bytes(max_rank: int, page_bytes: int, paged: bool) -> int:
    """What the largest adapter takes of the tier, a DoRA adapter of `max_rank` on every module: its pages and its
    vectors' page, or (held as the host tier's buffer) its packed bytes, a page being `PAGE_RANK` rank rows of
    every module (its magnitudes take less than one more rank row)."""
    return (pages_for_rank(max_rank) + 1) * page_bytes if paged else (max_rank + 1) * page_bytes // PAGE_RANK


# Slots of a tier that holds adapters as host buffers when no cap is given: page-table rows cost a few bytes.
HOST_TIER_SLOTS = 4096


class AdapterSlotPool:
    """Host-side bookkeeping of the device tier; `page_bytes` is one page across every LoRA layer of the model
    (`server.model_runner.adapter_page_bytes`). `max_bytes` None: enough pages for `num_slots` max-rank adapters."""

    def __init__(self, num_slots: int | None, max_rank: int, page_bytes: int, max_bytes: int | None = None,
                 paged: bool = True, prompt_rows_per_page: int = 1):
        if max_bytes is None and num_slots is None:
            raise ValueError("the device tier needs a byte budget or a slot count")
        self.max_rank = max_rank
        self.page_bytes = page_bytes
        self.paged = paged
        self.prompt_rows_per_page = prompt_rows_per_page
        # The memory unit: a page, or a byte of packed weights.
        self.unit_bytes = page_bytes if paged else 1
        one = max_rank_adapter_bytes(max_rank, page_bytes, paged)
        if max_bytes is None:
            max_bytes = num_slots * max_rank_adapter_bytes(max_rank, page_bytes, paged=True)
        self.capacity_units = max_bytes // self.unit_bytes
        if self.capacity_units * self.unit_bytes < one:
            raise ValueError(
                f"--max-gpu-adapter-bytes {max_bytes} holds {self.capacity_units * self.unit_bytes} bytes of adapter "
                f"{'pages' if paged else 'weights'}, but one adapter of --max-lora-rank {max_rank} on every module "
                f"needs {one}"
            )
        most = self.capacity_units if paged else HOST_TIER_SLOTS  # a paged adapter takes a page at least
        self.num_slots = min(num_slots, most) if num_slots is not None else most
        self._free_units = self.capacity_units
        self._free_pages = list(range(self.capacity_units, 0, -1)) if paged else []  # pop() hands out low pages first
        self._slot_pages: list[list[int]] = [[] for _ in range(self.num_slots)]
        self._slot_units = [0] * self.num_slots
        self._free_slots = list(range(self.num_slots - 1, -1, -1))  # pop() hands out low slots first
        self._pins = [0] * self.num_slots
        self._lru: OrderedDict[Hashable, int] = OrderedDict()  # key -> slot, least recently used first
        self._writes: list[PoolWrite] = []  # decided, not yet handed to the model runner
        self.loads = 0  # every load, prefetches included
        self.prefetches = 0
        self.evictions = 0

    @property
    def num_pages(self) -> int:
        """Pages of every LoRA layer the model runner allocates (0: it holds host buffers instead)."""
        return self.capacity_units if self.paged else 0

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_units * self.unit_bytes

    @property
    def resident_bytes(self) -> int:
        """Device bytes the resident adapters occupy: whole pages where paged (a rank-8 adapter counts a 16-rank
        page), else their packed bytes."""
        return (self.capacity_units - self._free_units) * self.unit_bytes

    @property
    def resident_count(self) -> int:
        return len(self._lru)

    @property
    def resident_keys(self) -> list[Hashable]:
        """The keys of the resident adapters, least recently used first."""
        return list(self._lru)

    def slot_items(self) -> list[tuple[Hashable, int]]:
        """(key, slot) of each resident adapter; a copy made in one C call, so another thread may read it while
        the engine thread loads and evicts."""
        return list(self._lru.items())

    @property
    def max_rank_adapters(self) -> int:
        """Adapters of `max_rank` on every module the tier holds at once: its slots and its memory allow."""
        return min(self.num_slots, self.capacity_bytes // max_rank_adapter_bytes(self.max_rank, self.page_bytes,
                                                                                  self.paged))

    def slot_of(self, key: Hashable) -> int | None:
        return self._lru.get(key)

    def acquire(self, key: Hashable, adapter: PackedAdapter | None) -> int | None:
        """Pin `key` in a slot, queuing a load of `adapter` there if it is not resident yet.

        Returns None when the slots or pages it needs are all held by pinned adapters. `adapter` may be None
        only when the key is resident (the caller checks with `slot_of`)."""
        slot = self._lru.get(key)
        if slot is None:
            if adapter is None:
                raise ValueError("adapter weights are needed to load a slot")
            units = self._units_of(adapter)
            slot = self._make_room(units)
            if slot is None:
                return None
            self._load(slot, key, adapter, units)
        self._lru.move_to_end(key)
        self._pins[slot] += 1
        return slot

    def prefetch(self, key: Hashable, adapter: PackedAdapter, keep: Collection[Hashable]) -> bool:
        """Load `key` ahead of need, evicting only unpinned adapters not in `keep`; True if it is resident now.

        Decided while a step runs, so on CUDA the runner's copy overlaps that step. Not pinned."""
        if key in self._lru:
            return True
        units = self._units_of(adapter)
        slot = self._make_room(units, keep)
        if slot is None:
            return False
        self._load(slot, key, adapter, units)
        self.prefetches += 1
        return True

    def discard(self, key: Hashable) -> None:
        """Free `key`'s slot and pages now (a deleted or replaced version); it must not be pinned."""
        slot = self._lru.pop(key, None)
        if slot is None:
            return
        assert self._pins[slot] == 0, f"discarding pinned slot {slot}"
        self._clear(slot)

    def release(self, slot: int) -> None:
        assert self._pins[slot] > 0, f"slot {slot} released more often than acquired"
        self._pins[slot] -= 1

    def pinned(self, slot: int) -> int:
        return self._pins[slot]

    @property
    def pinned_count(self) -> int:
        """Slots that a scheduled sequence holds now."""
        return sum(1 for pins in self._pins if pins)

    def take_writes(self) -> list[PoolWrite]:
        """The device writes decided since the last call, in the order they must land."""
        writes, self._writes = self._writes, []
        return writes

    def _units_of(self, adapter: PackedAdapter) -> int:
        """What the adapter takes of the tier: pages for the rank rows it writes (the max over modules; the kernels
        skip every row past it) and its vectors, or its packed bytes."""
        rank = written_rank(adapter)
        if max(rank, adapter.rank) > self.max_rank:
            raise ValueError(f"adapter {adapter.adapter_id!r} has rank {max(rank, adapter.rank)} > max rank "
                             f"{self.max_rank}")
        units = adapter_pages(adapter, self.prompt_rows_per_page) if self.paged else adapter.num_bytes
        if units > self.capacity_units:  # it could never be served: say so rather than wait for room forever
            raise ValueError(f"adapter {adapter.adapter_id!r} needs {units * self.unit_bytes} bytes of the device "
                             f"tier, which holds {self.capacity_bytes}")
        return units

    def _make_room(self, units_needed: int, keep: Collection[Hashable] = ()) -> int | None:
        """A free slot with `units_needed` free units, evicting least recently used unpinned adapters not in
        `keep`; None (evicting nothing) when even evicting every one of them would not make enough room."""
        free_units = self._free_units
        has_slot = bool(self._free_slots)
        victims: list[Hashable] = []
        for key, slot in self._lru.items():  # least recently used first
            if free_units >= units_needed and has_slot:
                break
            if self._pins[slot] == 0 and key not in keep:
                victims.append(key)
                free_units += self._slot_units[slot]
                has_slot = True
        if free_units < units_needed or not has_slot:
            return None
        for key in victims:
            self._clear(self._lru.pop(key))
            self.evictions += 1
        return self._free_slots.pop()

    def _clear(self, slot: int) -> None:
        self._writes.append(ClearSlot(slot))
        self._free_pages.extend(reversed(self._slot_pages[slot]))
        self._free_units += self._slot_units[slot]
        self._slot_pages[slot], self._slot_units[slot] = [], 0
        self._free_slots.append(slot)

    def _load(self, slot: int, key: Hashable, adapter: PackedAdapter, units: int) -> None:
        pages = [self._free_pages.pop() for _ in range(units)] if self.paged else []
        self._writes.append(LoadAdapter(slot, tuple(pages), adapter, key))
        self._slot_pages[slot], self._slot_units[slot] = pages, units
        self._free_units -= units
        self._lru[key] = slot
        self.loads += 1
