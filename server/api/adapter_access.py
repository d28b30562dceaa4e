"""Which adapters a caller may see and change.

An adapter belongs to the tenant that uploaded it. A tenant sees its own adapters and the public ones;
an admin sees all. An adapter a caller may not see answers exactly like one that does not exist (404),
so its existence is not revealed. Changing an adapter (replace, delete) is for its owner and admins;
a public adapter of someone else is visible, so changing it is refused with a 403 instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, Request

from server.api.auth import Principal, get_principal
from server.api.dependencies import AdapterTiers, EngineAPI


class Owned(Protocol):
    """Who an adapter belongs to (an adapter store `Manifest` is one)."""

    @property
    def owner(self) -> str | None: ...
    @property
    def public(self) -> bool: ...


@dataclass(frozen=True)
class Ownership:
    owner: str | None  # None: uploaded on a server running without keys
    public: bool


OwnershipLookup = Callable[[str], Owned | None]  # None: no such adapter


def engine_ownership(engine: EngineAPI) -> OwnershipLookup:
    """Who owns the adapters `engine` serves, read from its registry's manifests.

    An engine without a registry (the HTTP tests' stand-in) keeps no owners: its adapters are public."""
    if not isinstance(engine, AdapterTiers):
        return lambda adapter_id: Ownership(None, True) if engine.has_adapter(adapter_id) else None
    registry = engine.registry

    def lookup(adapter_id: str) -> Owned | None:
        version = registry.version(adapter_id)
        return None if version is None else version.manifest

    return lookup


@dataclass(frozen=True)
class AdapterAccess:
    """The caller and the way to learn who owns an adapter: everything an access decision needs."""

    principal: Principal
    ownership: OwnershipLookup

    def sees(self, adapter: Owned) -> bool:
        return self.principal.is_admin or adapter.public or adapter.owner == self.principal.tenant

    def may_modify(self, adapter: Owned) -> bool:
        return self.principal.is_admin or adapter.owner == self.principal.tenant

    def visible(self, adapter_id: str) -> bool:
        """True if the adapter exists and the caller may see it."""
        adapter = self.ownership(adapter_id)
        return adapter is not None and self.sees(adapter)


def get_adapter_access(request: Request, principal: Annotated[Principal, Depends(get_principal)]) -> AdapterAccess:
    return AdapterAccess(principal, engine_ownership(request.app.state.engine))


AccessDep = Annotated[AdapterAccess, Depends(get_adapter_access)]
