"""The bound on requests waiting for admission, shared fairly between tenants."""

from __future__ import annotations

import threading
from collections import Counter


class WaitingQuota:
    """Counts the requests accepted but not yet admitted into a batch, per tenant, and decides whether
    one more may wait.

    Rule, with Q the capacity and T the number of tenants holding waiting requests (counting the one
    asking): a request may wait while fewer than Q wait in all; past that, only if its tenant holds fewer
    than Q / T of the waiting requests. Hence:

    - A tenant holding fewer than Q / T waiting requests is never refused, however many requests other
      tenants send: a flooding tenant fills the queue, but cannot take another tenant's share of it.
    - One tenant alone (every request, when the server runs without API keys) never holds more than Q.
    - The k-th largest holding never exceeds ceil(Q / k) (true after an acceptance under Q, since k holdings
      of at least h_k sum to at most Q; an acceptance past Q leaves its tenant at most ceil(Q / T), which
      bounds every rank up to T), so with N tenants waiting the queue holds at most
      ceil(Q/1) + ceil(Q/2) + ... + ceil(Q/N) < Q * (1 + ln N) + N requests: a flood overshoots Q only by
      the other tenants' shares.

    `None` is a tenant like any other. Thread-safe: the event loop enters, the engine thread leaves.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"the waiting queue must hold at least one request, got {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._tenant_of: dict[str, str | None] = {}  # request id -> tenant, while it waits
        self._held: Counter[str | None] = Counter()  # tenant -> requests waiting (no zero entries)

    def enter(self, request_id: str, tenant: str | None) -> bool:
        """Count `request_id` as waiting for `tenant`; False (and nothing counted) if the rule refuses it."""
        with self._lock:
            if len(self._tenant_of) >= self.capacity:
                tenants = len(self._held) + (tenant not in self._held)
                if self._held[tenant] * tenants >= self.capacity:  # held >= Q / T, in integers
                    return False
            self._tenant_of[request_id] = tenant
            self._held[tenant] += 1
            return True

    def leave(self, request_id: str) -> None:
        """`request_id` was admitted, or ended before it was; a request not counted is ignored."""
        with self._lock:
            if request_id not in self._tenant_of:
                return
            tenant = self._tenant_of.pop(request_id)
            self._held[tenant] -= 1
            if not self._held[tenant]:
                del self._held[tenant]

    def held(self, tenant: str | None) -> int:
        with self._lock:
            return self._held[tenant]

    def __len__(self) -> int:
        with self._lock:
            return len(self._tenant_of)
