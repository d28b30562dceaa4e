"""The device-side adapter slots: which adapter sits in which slot, LRU eviction, pins.

An adapter is written into a slot of every `LoRALinear` at once: its A rows zero-padded to the pool's max
rank and its B with the LoRA scale folded in, so the kernels do no scaling. A slot is pinned while any
scheduled sequence uses it and is never evicted then.

Slots are keyed by an opaque, identity-hashed key (the engine uses the adapter *version*), so a replaced
adapter never aliases the slot of its previous version, and a retired version can be discarded at once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch

from adapters_store import LoraAdapter
from server.lora_linear import LoRALinear
from server.model import Transformer


class AdapterSlotPool:
    def __init__(self, model: Transformer, num_slots: int, max_rank: int):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self._layers: list[tuple[int, LoRALinear]] = [
            (i, module) for i, block in enumerate(model.layers) for module in block.modules()
            if isinstance(module, LoRALinear)
        ]
        for _, module in self._layers:
            module.allocate_slots(num_slots, max_rank)
        # Each slot's adapter rank (0: empty), read by the kernels through the model's LoRA context so that a
        # low-rank adapter costs low-rank work. Updated in place: a captured step would see new values.
        self.slot_ranks = torch.zeros(num_slots, dtype=torch.int32, device=model.output.weight.device)
        model.lora.slot_ranks = self.slot_ranks
        self._keys: list[Hashable | None] = [None] * num_slots
        self._bytes = [0] * num_slots  # the resident adapter's own (unpadded) weight bytes
        self._pins = [0] * num_slots
        self._lru: OrderedDict[Hashable, int] = OrderedDict()  # key -> slot, least recently used first
        self.loads = 0
        self.evictions = 0

    @property
    def resident_bytes(self) -> int:
        return sum(self._bytes)

    @property
    def resident_count(self) -> int:
        return len(self._lru)

    def slot_of(self, key: Hashable) -> int | None:
        return self._lru.get(key)

    def acquire(self, key: Hashable, adapter: LoraAdapter | None) -> int | None:
        """Pin `key` in a slot, writing `adapter` there if it is not resident yet.

        Returns None when every slot is pinned by others. `adapter` may be None only when the key is
        resident (the caller checks with `slot_of`)."""
        slot = self._lru.get(key)
        if slot is None:
            if adapter is None:
                raise ValueError("adapter weights are needed to load a slot")
            slot = self._free_slot()
            if slot is None:
                return None
            self._load(slot, key, adapter)
        self._lru.move_to_end(key)
        self._pins[slot] += 1
        return slot

    def discard(self, key: Hashable) -> None:
        """Free `key`'s slot now (a deleted or replaced version); it must not be pinned."""
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

    def _free_slot(self) -> int | None:
        if None in self._keys:
            return self._keys.index(None)
        for key, slot in self._lru.items():  # least recently used first
            if self._pins[slot] == 0:
                del self._lru[key]
                self._clear(slot)
                self.evictions += 1
                return slot
        return None

    def _clear(self, slot: int) -> None:
        for _, module in self._layers:
            module.clear_slot(slot)
        self._keys[slot] = None
        self._bytes[slot] = 0
        self.slot_ranks[slot] = 0

    def _load(self, slot: int, key: Hashable, adapter: LoraAdapter) -> None:
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter {adapter.adapter_id!r} has rank {adapter.rank} > max rank {self.max_rank}")
        # The rank rows actually written (the max over modules): the kernels skip every row past it.
        rank = max((w.a.shape[0] for w in adapter.weights.values()), default=0)
        if rank > self.max_rank:
            raise ValueError(f"adapter {adapter.adapter_id!r} has a module of rank {rank} > max rank {self.max_rank}")
        for layer_index, module in self._layers:
            dtype, device = module.weight.dtype, module.weight.device
            slices: list[tuple[torch.Tensor, torch.Tensor] | None] = []
            for name in module.slice_names:
                weight = adapter.weights.get((layer_index, name))
                if weight is None:
                    slices.append(None)
                else:
                    b = weight.b * weight.scale  # folded in fp32, then cast once
                    slices.append((weight.a.to(device, dtype, non_blocking=True), b.to(device, dtype)))
            module.set_slot(slot, slices)
        self._keys[slot] = key
        self._bytes[slot] = adapter.num_bytes
        self.slot_ranks[slot] = rank
        self._lru[key] = slot
        self.loads += 1
