"""The device tier of adapters: slots (rows of the page table), the pages they occupy, LRU eviction, pins.

An adapter of rank r is written into `pages_for_rank(r)` pages of every `LoRALinear` at once (`kernels.paging`
has the layout), with the LoRA scale folded into B so the kernels do no scaling. The tier has two limits:
`num_slots`, the distinct adapters resident at once, and pages, the device bytes (`max_bytes`, by default
enough for every slot to hold a max-rank adapter). Both are spent by rank, so a byte budget that fits 8
rank-64 adapters fits 32 rank-16 ones. A slot is pinned while any scheduled sequence uses it and is never
evicted then.

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

from kernels.paging import pages_for_rank
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


class AdapterSlotPool:
    """Host-side bookkeeping of the device tier; `page_bytes` is one page across every LoRA layer of the model
    (`server.model_runner.adapter_page_bytes`)."""

    def __init__(self, num_slots: int, max_rank: int, page_bytes: int, max_bytes: int | None = None):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.page_bytes = page_bytes
        max_pages_per_adapter = pages_for_rank(max_rank)
        self.num_pages = num_slots * max_pages_per_adapter if max_bytes is None else max_bytes // self.page_bytes
        if self.num_pages < max_pages_per_adapter:
            raise ValueError(
                f"--max-gpu-adapter-bytes {max_bytes} holds {self.num_pages} pages of {self.page_bytes} bytes, but "
                f"one adapter of --max-lora-rank {max_rank} needs {max_pages_per_adapter}"
            )
        self._free_pages = list(range(self.num_pages, 0, -1))  # pop() hands out low page numbers first
        self._slot_pages: list[list[int]] = [[] for _ in range(num_slots)]
        self._keys: list[Hashable | None] = [None] * num_slots
        self._pins = [0] * num_slots
        self._lru: OrderedDict[Hashable, int] = OrderedDict()  # key -> slot, least recently used first
        self._writes: list[PoolWrite] = []  # decided, not yet handed to the model runner
        self.loads = 0  # every load, prefetches included
        self.prefetches = 0
        self.evictions = 0

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def resident_bytes(self) -> int:
        """Device bytes the resident adapters occupy: whole pages, so a rank-8 adapter counts a 16-rank page."""
        return (self.num_pages - len(self._free_pages)) * self.page_bytes

    @property
    def resident_count(self) -> int:
        return len(self._lru)

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
            rank = self._rank_of(adapter)
            slot = self._make_room(pages_for_rank(rank))
            if slot is None:
                return None
            self._load(slot, key, adapter, rank)
        self._lru.move_to_end(key)
        self._pins[slot] += 1
        return slot

    def prefetch(self, key: Hashable, adapter: PackedAdapter, keep: Collection[Hashable]) -> bool:
        """Load `key` ahead of need, evicting only unpinned adapters not in `keep`; True if it is resident now.

        Decided while a step runs, so on CUDA the runner's copy overlaps that step. Not pinned."""
        if key in self._lru:
            return True
        rank = self._rank_of(adapter)
        slot = self._make_room(pages_for_rank(rank), keep)
        if slot is None:
            return False
        self._load(slot, key, adapter, rank)
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

    def _rank_of(self, adapter: PackedAdapter) -> int:
        """The rank rows actually written (the max over modules): the kernels skip every row past it."""
        rank = written_rank(adapter)
        if max(rank, adapter.rank) > self.max_rank:
            raise ValueError(f"adapter {adapter.adapter_id!r} has rank {max(rank, adapter.rank)} > max rank "
                             f"{self.max_rank}")
        return rank

    def _make_room(self, pages_needed: int, keep: Collection[Hashable] = ()) -> int | None:
        """A free slot with `pages_needed` free pages, evicting least recently used unpinned adapters not in
        `keep`; None (evicting nothing) when even evicting every one of them would not make enough room."""
        free_pages = len(self._free_pages)
        has_slot = None in self._keys
        victims: list[Hashable] = []
        for key, slot in self._lru.items():  # least recently used first
            if free_pages >= pages_needed and has_slot:
                break
            if self._pins[slot] == 0 and key not in keep:
                victims.append(key)
                free_pages += len(self._slot_pages[slot])
                has_slot = True
        if free_pages < pages_needed or not has_slot:
            return None
        for key in victims:
            self._clear(self._lru.pop(key))
            self.evictions += 1
        return self._keys.index(None)

    def _clear(self, slot: int) -> None:
        self._writes.append(ClearSlot(slot))
        self._free_pages.extend(reversed(self._slot_pages[slot]))
        self._slot_pages[slot] = []
        self._keys[slot] = None

    def _load(self, slot: int, key: Hashable, adapter: PackedAdapter, rank: int) -> None:
        pages = [self._free_pages.pop() for _ in range(pages_for_rank(rank))]
        self._writes.append(LoadAdapter(slot, tuple(pages), adapter, key))
        self._slot_pages[slot] = pages
        self._keys[slot] = key
        self._lru[key] = slot
        self.loads += 1
