"""The device tier of adapters: slots (rows of the page table), the pages they occupy, LRU eviction, pins.

An adapter of rank r is written into `pages_for_rank(r)` pages of every `LoRALinear` at once (`kernels.paging`
has the layout), with the LoRA scale folded into B so the kernels do no scaling. The tier has two limits:
`num_slots`, the distinct adapters resident at once, and pages, the device bytes (`max_bytes`, by default
enough for every slot to hold a max-rank adapter). Both are spent by rank, so a byte budget that fits 8
rank-64 adapters fits 32 rank-16 ones. A slot is pinned while any scheduled sequence uses it and is never
evicted then.

Slots are keyed by an opaque, identity-hashed key (the engine uses the adapter *version*), so a replaced
adapter never aliases the slot of its previous version, and a retired version can be discarded at once.

On CUDA every write to the pool (weights and page-table rows, loads and clears alike) goes on one side stream,
so a clear and the load that reuses its slot or pages can never land out of order. Weights come from pinned host
memory, so a copy issued while a step runs (`prefetch`) overlaps that step; before overwriting a slot or its
pages the side stream waits for an event recorded on the compute stream when the slot was last released (its
last use), and the compute stream waits for the side stream before the next step reads what it wrote.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable, Iterator
from contextlib import contextmanager

import torch

from adapters_store import LoraAdapter
from kernels import PageTable
from kernels.paging import SliceWeights, pages_for_rank
from server.lora_linear import LoRALinear
from server.model import Transformer


class AdapterSlotPool:
    def __init__(self, model: Transformer, num_slots: int, max_rank: int, max_bytes: int | None = None):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self._layers: list[tuple[int, LoRALinear]] = [
            (i, module) for i, block in enumerate(model.layers) for module in block.modules()
            if isinstance(module, LoRALinear)
        ]
        self.page_bytes = sum(module.page_bytes for _, module in self._layers)
        max_pages_per_adapter = pages_for_rank(max_rank)
        self.num_pages = num_slots * max_pages_per_adapter if max_bytes is None else max_bytes // self.page_bytes
        if self.num_pages < max_pages_per_adapter:
            raise ValueError(
                f"--max-gpu-adapter-bytes {max_bytes} holds {self.num_pages} pages of {self.page_bytes} bytes, but "
                f"one adapter of --max-lora-rank {max_rank} needs {max_pages_per_adapter}"
            )
        for _, module in self._layers:
            module.allocate_pages(1 + self.num_pages)  # + the zero page
        self.device = model.output.weight.device
        self.table = PageTable.empty(num_slots, max_rank, self.device)
        model.lora.table = self.table
        self._free_pages = list(range(self.num_pages, 0, -1))  # pop() hands out low page numbers first
        self._slot_pages: list[list[int]] = [[] for _ in range(num_slots)]
        self._keys: list[Hashable | None] = [None] * num_slots
        self._pins = [0] * num_slots
        self._lru: OrderedDict[Hashable, int] = OrderedDict()  # key -> slot, least recently used first
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Per slot, an event on the compute stream after the last step that read the slot (CUDA only).
        self._last_use: list[torch.cuda.Event | None] = [None] * num_slots
        self.loads = 0  # every load, prefetches included
        self.prefetches = 0
        self.evictions = 0

    @property
    def copies_overlap_compute(self) -> bool:
        """Whether weights go up on a side stream, so a `prefetch` during a step is worth doing."""
        return self._copy_stream is not None

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

    def acquire(self, key: Hashable, adapter: LoraAdapter | None) -> int | None:
        """Pin `key` in a slot, writing `adapter` there if it is not resident yet.

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

    def prefetch(self, key: Hashable, adapter: LoraAdapter, keep: Collection[Hashable]) -> bool:
        """Load `key` ahead of need, evicting only unpinned adapters not in `keep`; True if it is resident now.

        Called while a step runs, so on CUDA the copy overlaps that step. Not pinned."""
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
        if self._copy_stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._last_use[slot] = event

    def pinned(self, slot: int) -> int:
        return self._pins[slot]

    def _rank_of(self, adapter: LoraAdapter) -> int:
        """The rank rows actually written (the max over modules): the kernels skip every row past it."""
        rank = max((w.a.shape[0] for w in adapter.weights.values()), default=0)
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
        with self._copying():
            last_use = self._last_use[slot]
            if last_use is not None:  # nothing may overwrite the slot's row or pages before its last reader ran
                self._copy_stream.wait_event(last_use)
                self._last_use[slot] = None
            self.table.clear(slot)
        self._free_pages.extend(reversed(self._slot_pages[slot]))
        self._slot_pages[slot] = []
        self._keys[slot] = None

    def _load(self, slot: int, key: Hashable, adapter: LoraAdapter, rank: int) -> None:
        pages = [self._free_pages.pop() for _ in range(pages_for_rank(rank))]
        with self._copying():
            index = torch.tensor(pages, dtype=torch.int64).to(self.device, non_blocking=True)
            for layer_index, module in self._layers:
                slices: list[SliceWeights] = []
                for name in module.slice_names:
                    weight = adapter.weights.get((layer_index, name))
                    # The scale is folded in fp32 before `pack` casts to the layer's dtype once.
                    slices.append(None if weight is None else (weight.a, weight.b * weight.scale))
                packed = module.pack(slices, len(pages))
                if self._copy_stream is not None:
                    packed = (packed[0].pin_memory(), packed[1].pin_memory())  # so the copy is asynchronous
                module.write_pages(index, packed)
            self.table.assign(slot, rank, pages)
        self._slot_pages[slot] = pages
        self._keys[slot] = key
        self._lru[key] = slot
        self.loads += 1

    @contextmanager
    def _copying(self) -> Iterator[None]:
        """Device writes on the side stream (CUDA), ordered before everything the compute stream does next.

        They wait for no queued compute except a freed slot's last reader (`_clear` waits on that event): a step
        in flight pins every adapter it reads, so what a load overwrites is either free or was freed by a
        `_clear` earlier on this same stream."""
        if self._copy_stream is None:
            yield
            return
        with torch.cuda.stream(self._copy_stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
