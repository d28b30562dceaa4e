"""The host-memory tier of the adapter cache: adapter versions' weights, packed for the device pages
(`server/adapter_packer.py`), within a byte budget that counts the packed bytes, the least recently used dropped
first.

It sits between the store on disk and the device slots (see server/adapter_registry.py for the tiers). It keeps
no lock of its own: `AdapterRegistry` calls it with its lock held, as part of its bookkeeping of versions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.adapter_packer import PackedAdapter

if TYPE_CHECKING:
    from server.adapter_registry import AdapterVersion


@dataclass
class HostTierStats:
    host: int = 0  # bytes of packed weights held in host memory
    host_adapters: int = 0
    loads_from_disk: int = 0
    host_evictions: int = 0


class AdapterHostCache:
    """The versions whose weights are in host memory, least recently used first."""

    def __init__(self, budget_bytes: int, pinned_ids: frozenset[str] = frozenset()) -> None:
        self.budget_bytes = budget_bytes
        self.pinned_ids = pinned_ids  # adapters never dropped
        self.stats = HostTierStats()
        self._lru: OrderedDict[AdapterVersion, None] = OrderedDict()

    def __iter__(self) -> Iterator[AdapterVersion]:
        return iter(self._lru)

    def __contains__(self, version: object) -> bool:
        return version in self._lru

    def keep(self, version: AdapterVersion, adapter: PackedAdapter) -> None:
        """Put weights in the host tier, then drop least recently used copies over budget.

        Copies of idle versions go first; then those of waiting requests, which can be read from disk
        again. Never dropped: pinned adapters, and retired versions still in use (their files are gone).
        """
        version.weights = adapter
        self._lru[version] = None
        self.stats.host += adapter.num_bytes
        self.stats.host_adapters += 1
        for idle_only in (True, False):
            for victim in list(self._lru):
                if self.stats.host <= self.budget_bytes:
                    return
                if victim is version or victim.retired or victim.adapter_id in self.pinned_ids:
                    continue
                if victim.users == 0 or not idle_only:
                    self.drop(victim)
                    self.stats.host_evictions += 1

    def drop(self, version: AdapterVersion) -> None:
        if version.weights is None:
            return
        self.stats.host -= version.weights.num_bytes
        self.stats.host_adapters -= 1
        version.weights = None
        self._lru.pop(version, None)

    def touch(self, version: AdapterVersion) -> None:
        if version in self._lru:
            self._lru.move_to_end(version)
