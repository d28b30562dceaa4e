"""`--max-adapters-per-tenant` and `--max-store-bytes-per-tenant`: what one tenant may keep in the store.

Usage is counted from the adapters' manifests (owner and file sizes), so it is right after a restart and
needs no bookkeeping of its own. A tenant's uploads are checked and stored one at a time, so two
concurrent uploads cannot both fit in the room that was left for one. An upload over a quota is a 403
naming the flag; the adapter's owner pays for it, whoever uploads (an admin replacing a tenant's
adapter changes that tenant's usage).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server.adapter_registry import AdapterRegistry
from server.api.errors import APIError
from server.api.request_limits import flag
from server.config import Settings

QUOTA_EXCEEDED = "quota_exceeded"


def _who(tenant: str | None) -> str:
    return "the server's anonymous callers" if tenant is None else f"tenant '{tenant}'"


@dataclass
class TenantQuotas:
    max_adapters: int | None
    max_bytes: int | None
    _locks: defaultdict[str | None, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantQuotas:
        return cls(settings.max_adapters_per_tenant, settings.max_store_bytes_per_tenant)

    @asynccontextmanager
    async def admitting(
        self, registry: AdapterRegistry, owner: str | None, new_bytes: int, replaced_id: str | None = None
    ) -> AsyncIterator[None]:
        """Hold `owner`'s turn while an adapter of `new_bytes` is stored (`replaced_id`: the adapter it
        replaces); APIError 403 if that would take `owner` over a quota."""
        if self.max_adapters is None and self.max_bytes is None:
            yield
            return
        async with self._locks[owner]:
            count, used = await asyncio.to_thread(_usage, registry, owner, replaced_id)
            if replaced_id is None and self.max_adapters is not None and count + 1 > self.max_adapters:
                raise APIError(
                    403,
                    f"{_who(owner).capitalize()} already has {count} adapter(s): this server's "
                    f"{flag('max_adapters_per_tenant')} is {self.max_adapters}. Delete one first.",
                    param="id", code=QUOTA_EXCEEDED, error_type="insufficient_quota",
                )
            if self.max_bytes is not None and used + new_bytes > self.max_bytes:
                raise APIError(
                    403,
                    f"This upload of {new_bytes} bytes would take {_who(owner)} to {used + new_bytes} bytes in the "
                    f"adapter store: this server's {flag('max_store_bytes_per_tenant')} is {self.max_bytes}.",
                    code=QUOTA_EXCEEDED, error_type="insufficient_quota",
                )
            yield


def _usage(registry: AdapterRegistry, owner: str | None, excluded_id: str | None) -> tuple[int, int]:
    """(adapters, bytes) `owner` keeps in the store, leaving out `excluded_id` from the bytes."""
    count = used = 0
    for adapter_id in registry.ids():
        version = registry.version(adapter_id)
        if version is None or version.manifest.owner != owner:
            continue
        count += 1
        if adapter_id != excluded_id:
            used += version.manifest.num_bytes
    return count, used


def get_tenant_quotas(request: Request) -> TenantQuotas:
    return request.app.state.tenant_quotas


TenantQuotasDep = Annotated[TenantQuotas, Depends(get_tenant_quotas)]
