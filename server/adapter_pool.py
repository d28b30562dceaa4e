"""The device-side adapter slots: which adapter sits in which slot, LRU eviction, pins.

An adapter is written into a slot of every `LoRALinear` at once: its A rows zero-padded to the pool's max
rank and its B with the LoRA scale folded in, so the kernels do no scaling. A slot is pinned while any
scheduled sequence uses it and is never evicted then.
"""

from __future__ import annotations

from collections import OrderedDict

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
        self._slots: list[LoraAdapter | None] = [None] * num_slots
        self._pins = [0] * num_slots
        # id(adapter) -> slot, least recently used first. Keyed by identity so that a replaced adapter
        # (a new object under the same name) never aliases the old one's slot.
        self._lru: OrderedDict[int, int] = OrderedDict()
        self.loads = 0
        self.evictions = 0

    def slot_of(self, adapter: LoraAdapter) -> int | None:
        return self._lru.get(id(adapter))

    def acquire(self, adapter: LoraAdapter) -> int | None:
        """Pin `adapter` in a slot, loading it if needed; None when every slot is pinned by others."""
        slot = self._lru.get(id(adapter))
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self._load(slot, adapter)
        self._lru.move_to_end(id(adapter))
        self._pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        assert self._pins[slot] > 0, f"slot {slot} released more often than acquired"
        self._pins[slot] -= 1

    def pinned(self, slot: int) -> int:
        return self._pins[slot]

    def _free_slot(self) -> int | None:
        if None in self._slots:
            return self._slots.index(None)
        for key, slot in self._lru.items():  # least recently used first
            if self._pins[slot] == 0:
                del self._lru[key]
                self._slots[slot] = None
                self.evictions += 1
                return slot
        return None

    def _load(self, slot: int, adapter: LoraAdapter) -> None:
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter {adapter.adapter_id!r} has rank {adapter.rank} > max rank {self.max_rank}")
        for layer_index, module in self._layers:
            dtype, device = module.weight.dtype, module.weight.device
            slices: list[tuple[torch.Tensor, torch.Tensor] | None] = []
            for name in module.slice_names:
                weight = adapter.weights.get((layer_index, name))
                if weight is None:
                    slices.append(None)
                else:
                    b = weight.b * weight.scale  # folded in fp32, then cast once
                    slices.append((weight.a.to(device, dtype), b.to(device, dtype)))
            module.set_slot(slot, slices)
        self._slots[slot] = adapter
        self._lru[id(adapter)] = slot
        self.loads += 1
