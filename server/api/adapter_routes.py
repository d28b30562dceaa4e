"""Adapter lifecycle over REST: upload, replace, list, inspect, mark public, delete.

Uploads are multipart forms carrying the PEFT files themselves (never a server-side path or a URL):
either `adapter_config` + `adapter_model`, or one `archive` (.tar.gz / .zip of a PEFT directory). Every
upload is parsed and checked against the served base model before anything is stored, and the store
writes atomically, so a refused or interrupted upload leaves nothing behind.

An adapter belongs to the tenant that uploaded it; who sees and changes what is `adapter_access`'s rule
(another tenant's private adapter is a 404, exactly like a missing one). Adapter ids are one namespace
for the whole server, so an upload under an id another tenant holds is a 409 like any taken id.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict

from adapters_store import (
    ADAPTER_ID_PATTERN,
    AdapterExistsError,
    AdapterFormatError,
    AdapterMissingError,
    StoreCorruptionError,
    StoreFullError,
    unpack_adapter_archive,
    validate_adapter_id,
)
from server.adapter_registry import AdapterIdReservedError, AdapterRegistry, AdapterVersion
from server.api.adapter_access import AccessDep, AdapterAccess
from server.api.errors import APIError, error_responses
from server.api.tenant_quotas import TenantQuotasDep
from server.requests import AdapterStatus

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
_INVALID_UPLOAD = "The id or the files are invalid (the message names the field), or not for the served model."
_NOT_FOUND = "No adapter of that id that the caller may see."
_NOT_YOURS = "The adapter is another tenant's public one: only its owner or an admin may change it."
_OVER_QUOTA = "The adapter's owner would go past --max-adapters-per-tenant or --max-store-bytes-per-tenant."
_STORE_FULL = "The adapter store is out of space; nothing was stored."
_ID_TAKEN = "An adapter of that id exists already (whoever holds it), or the id is the base model's served name."
_NOT_MULTIPART = "The body is not multipart/form-data."
# The ids the store accepts, documented on every field that names one (validate_adapter_id enforces it).
_ID_SCHEMA = {"pattern": ADAPTER_ID_PATTERN.pattern, "maxLength": 128}


class StoredFileInfo(BaseModel):
    sha256: str
    bytes: int


class AdapterInfo(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    version: int
    created_at: int
    updated_at: int
    kind: Literal["lora", "dora", "ia3", "prompt"]  # PEFT's kind: LoRA, DoRA (use_dora), IA3, prompt tuning
    rank: int  # 0 for IA3 and prompt tuning
    lora_alpha: float  # 0 for IA3 and prompt tuning
    num_virtual_tokens: int  # a soft prompt's length (prompt tuning); they take context but are not prompt tokens
    target_modules: list[str]
    bytes: int
    owner: str | None  # the tenant that uploaded it (None: uploaded while the server ran without keys)
    public: bool  # every tenant may use it (set by an admin)
    # The warmest tier holding it now: the serving device (a GPU, or the CPU on a CPU-only server), host memory,
    # or only the disk (a broken one stays there).
    location: Literal["device", "host", "disk"]
    # broken: its stored files failed at load (a PUT of good files cures it); unservable: this server's settings
    # cannot serve it (the error names the setting)
    status: AdapterStatus
    error: str | None  # why it is not ready
    requests_served: int  # requests for this id since the server started, across replaces (as the metrics count)
    last_used_at: int | None
    files: dict[str, StoredFileInfo]


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    has_more: bool
    first_id: str | None
    last_id: str | None


class AdapterPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    public: bool


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter.deleted"] = "adapter.deleted"
    deleted: bool = True


def get_registry(request: Request) -> AdapterRegistry:
    return request.app.state.engine.registry


def _location(request: Request, version: AdapterVersion) -> Literal["device", "host", "disk"]:
    if request.app.state.engine.pool.slot_of(version) is not None:
        return "device"
    return "host" if version.weights is not None else "disk"


def _info(request: Request, version: AdapterVersion) -> AdapterInfo:
    m = version.manifest
    status, error = get_registry(request).status(version)
    return AdapterInfo(
        id=m.id,
        version=m.version,
        created_at=int(m.created_at),
        updated_at=int(m.updated_at),
        kind=m.kind,
        num_virtual_tokens=m.num_virtual_tokens,
        rank=m.rank,
        lora_alpha=m.lora_alpha,
        target_modules=list(m.target_modules),
        bytes=m.num_bytes,
        owner=m.owner,
        public=m.public,
        location=_location(request, version),
        status=status,
        error=error,
        requests_served=version.requests_served,
        last_used_at=None if version.last_used is None else int(version.last_used),
        files={name: StoredFileInfo(sha256=f.sha256, bytes=f.size) for name, f in m.files.items()},
    )


RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]
OptionalFile = Annotated[UploadFile | None, File()]
AdapterId = Annotated[str, Path(json_schema_extra=_ID_SCHEMA)]


async def _adapter_files(
    registry: AdapterRegistry,
    adapter_config: UploadFile | None,
    adapter_model: UploadFile | None,
    archive: UploadFile | None,
) -> tuple[bytes, bytes]:
    """The two PEFT files from either upload form."""
    if archive is not None:
        if adapter_config is not None or adapter_model is not None:
            raise APIError(400, "Send either 'archive' or 'adapter_config' + 'adapter_model', not both.",
                           param="archive")
        # Unpacked from the spooled upload, never read whole into memory; the unpacked size is bounded too: a
        # small archive may expand enormously.
        try:
            return await asyncio.to_thread(unpack_adapter_archive, archive.file,
                                           max_total_bytes=registry.max_adapter_bytes)
        except AdapterFormatError as exc:
            raise APIError(400, f"Invalid archive: {exc.message}", param="archive", code="invalid_adapter") from exc
    missing = [name for name, f in (("adapter_config", adapter_config), ("adapter_model", adapter_model)) if f is None]
    if missing:
        raise APIError(400, f"Missing file field(s): {', '.join(missing)} (or send one 'archive').", param=missing[0],
                       code="missing_required_parameter")
    return await adapter_config.read(), await adapter_model.read()


async def _store(
    registry: AdapterRegistry, adapter_id: str, files: tuple[bytes, bytes], replace: bool, owner: str | None = None
) -> AdapterVersion:
    """Validate and store in a worker thread (parsing and fsync are blocking); map store errors to HTTP.

    `owner`: the tenant a created adapter belongs to (a replace keeps the adapter's owner)."""
    try:
        if replace:
            return await asyncio.to_thread(registry.replace, adapter_id, *files)
        return await asyncio.to_thread(registry.create, adapter_id, *files, owner=owner)
    except AdapterIdReservedError as exc:
        raise _id_reserved(adapter_id) from exc
    except AdapterFormatError as exc:
        raise APIError(400, f"Invalid adapter: {exc.message}", param=exc.field, code="invalid_adapter") from exc
    except AdapterExistsError as exc:
        raise _id_taken(adapter_id) from exc
    except AdapterMissingError as exc:
        raise _not_found(adapter_id) from exc
    except StoreFullError as exc:
        raise APIError(507, "The adapter store is out of space; nothing was stored.",
                       code="insufficient_storage") from exc


def _id_taken(adapter_id: str) -> APIError:
    return APIError(409, f"The adapter '{adapter_id}' already exists; to upload a new version, PUT /v1/adapters/"
                    f"{adapter_id} (`lorahive adapters upload {adapter_id} PATH --replace`).", param="id",
                    code="adapter_exists")


def _id_reserved(adapter_id: str) -> APIError:
    return APIError(409, f"'{adapter_id}' is the base model's served name, which requests always resolve to the base "
                    "model; choose another adapter id.", param="id", code="id_reserved")


def _not_found(adapter_id: str) -> APIError:
    # `id`: the adapter API's name for it (the path's {id}, the upload's field, the listing's key).
    return APIError(404, f"The adapter '{adapter_id}' does not exist.", param="id", code="model_not_found")


async def _multipart_body(request: Request) -> None:
    """Uploads are files: answer a JSON (or any other) body with what to send instead of "missing field"."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "multipart/form-data":
        raise APIError(415, f"{request.method} {request.url.path} takes multipart/form-data (got "
                       f"{media_type or 'no Content-Type'}): the files adapter_config and adapter_model, or one "
                       "archive" + (", and the field id" if request.method == "POST" else "") + ".",
                       code="unsupported_media_type")


def _checked_id(adapter_id: str) -> str:
    try:
        return validate_adapter_id(adapter_id)
    except AdapterFormatError as exc:
        raise APIError(400, exc.message, param="id", code="invalid_adapter_id") from exc


def _size(files: tuple[bytes, bytes]) -> int:
    return sum(len(data) for data in files)


@router.post("", status_code=201, response_model=AdapterInfo, dependencies=[Depends(_multipart_body)],
             responses=error_responses({
                 400: _INVALID_UPLOAD, 403: _OVER_QUOTA, 409: _ID_TAKEN, 415: _NOT_MULTIPART, 507: _STORE_FULL,
             }))
async def upload_adapter(
    request: Request,
    registry: RegistryDep,
    access: AccessDep,
    quotas: TenantQuotasDep,
    id: Annotated[str, Form(json_schema_extra=_ID_SCHEMA)],  # noqa: A002 - the form field's public name
    adapter_config: OptionalFile = None,
    adapter_model: OptionalFile = None,
    archive: OptionalFile = None,
) -> AdapterInfo:
    adapter_id = _checked_id(id)
    if adapter_id in registry.reserved_ids:
        raise _id_reserved(adapter_id)
    if registry.exists(adapter_id):  # cheap early answer; the store's atomic create still decides races
        raise _id_taken(adapter_id)
    files = await _adapter_files(registry, adapter_config, adapter_model, archive)
    owner = access.principal.tenant
    async with quotas.admitting(registry, owner, _size(files)):
        version = await _store(registry, adapter_id, files, replace=False, owner=owner)
    return _info(request, version)


@router.put("/{adapter_id}", response_model=AdapterInfo, dependencies=[Depends(_multipart_body)],
            responses=error_responses({
                400: _INVALID_UPLOAD, 403: f"{_NOT_YOURS} Or: {_OVER_QUOTA}", 404: _NOT_FOUND, 415: _NOT_MULTIPART,
                507: _STORE_FULL,
            }))
async def replace_adapter(
    request: Request,
    adapter_id: AdapterId,
    registry: RegistryDep,
    access: AccessDep,
    quotas: TenantQuotasDep,
    adapter_config: OptionalFile = None,
    adapter_model: OptionalFile = None,
    archive: OptionalFile = None,
) -> AdapterInfo:
    current = _modifiable(access, registry, _checked_id(adapter_id))
    files = await _adapter_files(registry, adapter_config, adapter_model, archive)
    async with quotas.admitting(registry, current.manifest.owner, _size(files), replaced_id=adapter_id):
        version = await _store(registry, adapter_id, files, replace=True)
    return _info(request, version)


@router.get("", response_model=AdapterList)
async def list_adapters(
    request: Request,
    registry: RegistryDep,
    access: AccessDep,
    after: Annotated[str | None, Query(description="list ids after this one")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AdapterList:
    """The adapters the caller may see, in id order; `has_more` and `last_id` page through those alone."""
    versions = (registry.version(i) for i in registry.ids(after=after))
    visible = (v for v in versions if v is not None and access.sees(v.manifest))
    page = list(itertools.islice(visible, limit + 1))  # one past the page says whether there is more
    data = [_info(request, v) for v in page[:limit]]
    return AdapterList(
        data=data,
        has_more=len(page) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


def _visible(access: AdapterAccess, registry: AdapterRegistry, adapter_id: str) -> AdapterVersion:
    """The adapter, if it exists and the caller may see it; otherwise the same 404 either way."""
    version = registry.version(adapter_id)
    if version is None or not access.sees(version.manifest):
        raise _not_found(adapter_id)
    return version


def _modifiable(access: AdapterAccess, registry: AdapterRegistry, adapter_id: str) -> AdapterVersion:
    version = _visible(access, registry, adapter_id)
    if not access.may_modify(version.manifest):  # visible without being ours: someone else's public adapter
        raise APIError(403, f"The adapter '{adapter_id}' belongs to another tenant; only its owner or an admin may "
                       "change it.", param="id", code="permission_denied")
    return version


@router.get("/{adapter_id}", response_model=AdapterInfo, responses=error_responses({404: _NOT_FOUND}))
async def get_adapter(request: Request, adapter_id: AdapterId, registry: RegistryDep, access: AccessDep) -> AdapterInfo:
    return _info(request, _visible(access, registry, adapter_id))


@router.patch("/{adapter_id}", response_model=AdapterInfo, responses=error_responses({
    403: "Only an admin may make an adapter public or private.", 404: _NOT_FOUND,
    409: "The adapter's manifest is damaged (code adapter_broken): PUT its files to restore it first.",
}))
async def patch_adapter(
    request: Request, adapter_id: AdapterId, body: AdapterPatch, registry: RegistryDep, access: AccessDep
) -> AdapterInfo:
    """`{"public": true}` lets every tenant see and use the adapter; admins only."""
    current = _visible(access, registry, adapter_id)
    if not access.principal.is_admin:
        raise APIError(403, "Only an admin may make an adapter public or private.", param="public",
                       code="permission_denied")
    try:
        version = await asyncio.to_thread(registry.set_public, adapter_id, body.public)
    except AdapterMissingError as exc:  # deleted by a concurrent request
        raise _not_found(adapter_id) from exc
    except StoreCorruptionError as exc:  # the flag lives in the manifest, which is damaged
        reason = current.load_error or exc.message
        raise APIError(409, f"The adapter '{adapter_id}' is broken ({reason}); restore it with PUT /v1/adapters/"
                       f"{adapter_id} first.", param="id", code="adapter_broken") from exc
    return _info(request, version)


@router.delete("/{adapter_id}", response_model=AdapterDeleted, responses=error_responses({
    403: _NOT_YOURS, 404: _NOT_FOUND,
}))
async def delete_adapter(adapter_id: AdapterId, registry: RegistryDep, access: AccessDep) -> AdapterDeleted:
    _modifiable(access, registry, adapter_id)
    try:
        await asyncio.to_thread(registry.delete, adapter_id)
    except AdapterMissingError as exc:  # deleted by a concurrent request
        raise _not_found(adapter_id) from exc
    return AdapterDeleted(id=adapter_id)

