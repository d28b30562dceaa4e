"""Talking to the server about models and adapters: discovery over `/v1/models`, and provisioning
synthetic adapters through lorahive's adapter REST API.

The upload contract: `POST /v1/adapters`, a multipart form with field `id` and files `adapter_config`
(adapter_config.json) and `adapter_model` (adapter_model.safetensors) -> 201 with the adapter's
metadata, 409 if the id exists, 429 with `Retry-After` while the server takes no more uploads at once (the
upload is sent again then); `DELETE /v1/adapters/{id}` -> 200 or 204; `GET /v1/adapters` lists.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.synthetic_adapters import AdapterKind, AdapterSpec, BaseDims, adapter_files, adapter_seed, spec_for

BUSY_RETRIES = 100  # 429s in a row before an upload gives up (lorahive says Retry-After: 1)
DIMS_FLAGS = "--hidden-size, --intermediate-size, --num-layers, --num-heads, --num-kv-heads and --head-dim"


class ProvisioningError(RuntimeError):
    """The server refused or failed an adapter operation; the message says which and why."""


class ProvisioningUnsupported(ProvisioningError):
    """The server has no adapter upload API."""


@dataclass(frozen=True)
class ServerInfo:
    base_model: str
    adapters: list[str]  # ids listed with this base model as their parent, in the server's order
    dims: BaseDims | None  # from the model card's `dims`, when the server publishes them
    models: list[dict[str, Any]] = field(default_factory=list)  # the raw /v1/models entries


async def discover(http: httpx.AsyncClient, url: str, model: str | None = None, headers: dict[str, str] | None = None
                   ) -> ServerInfo:
    """The base model (the first model with no `parent` unless `model` names one), its adapters (models
    whose `parent` is that base, as lorahive and vLLM list LoRA modules) and, if published, its dims:
    first a `dims` object on the `/v1/models` entry, then on `GET /v1/models/{id}`."""
    response = await http.get(f"{url}/v1/models", headers=headers)
    if response.status_code != 200:
        raise ProvisioningError(f"GET {url}/v1/models answered {response.status_code}: {response.text[:300]}")
    models = [m for m in response.json().get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)]
    if not models:
        raise ProvisioningError(f"GET {url}/v1/models lists no models")
    if model is None:
        base = next((m for m in models if not m.get("parent")), models[0])
    else:
        base = next((m for m in models if m["id"] == model), {"id": model})
    base_id = base["id"]
    adapters = [m["id"] for m in models if m.get("parent") == base_id and m["id"] != base_id]
    dims_raw = base.get("dims")
    if not isinstance(dims_raw, dict):
        card = await http.get(f"{url}/v1/models/{base_id}", headers=headers)
        if card.status_code == 200:
            dims_raw = card.json().get("dims")
    dims = None
    if isinstance(dims_raw, dict):
        try:
            dims = BaseDims.from_mapping(dims_raw)
        except (ValueError, TypeError):
            dims = None  # an unreadable `dims` is as good as none: the flags must say
    return ServerInfo(base_id, adapters, dims, models)


def resolve_dims(flags: dict[str, int | None], server: BaseDims | None, config_file: dict[str, Any] | None,
                 base_model: str) -> BaseDims:
    """The dims to shape synthetic adapters with: every flag given wins, then a `--model-config`
    file, then the server's model card. Without all of them, a clear error naming the flags."""
    values: dict[str, Any] = {}
    if server is not None:
        values |= {k: v for k, v in vars_of(server).items()}
    if config_file is not None:
        values |= vars_of(BaseDims.from_mapping(config_file))
    values |= {k: v for k, v in flags.items() if v is not None}
    try:
        return BaseDims.from_mapping(values)
    except (ValueError, TypeError) as exc:
        raise ProvisioningError(
            f"cannot shape adapters for '{base_model}': its model card publishes no 'dims' ({exc}). Give them "
            f"with {DIMS_FLAGS}, or --model-config with the checkpoint's config.json (lorahive's demo model: "
            "--hidden-size 256 --intermediate-size 688 --num-layers 4 --num-heads 8 --num-kv-heads 4 --head-dim 32)."
        ) from None


def vars_of(dims: BaseDims) -> dict[str, int]:
    return {k: getattr(dims, k) for k in BaseDims.__dataclass_fields__}


async def upload_adapter(
    http: httpx.AsyncClient, url: str, adapter_id: str, config: bytes, weights: bytes,
    headers: dict[str, str] | None = None,
) -> bool:
    """Uploads one adapter; True if created, False if the id already existed (409)."""
    for _ in range(BUSY_RETRIES):
        response = await http.post(
            f"{url}/v1/adapters",
            data={"id": adapter_id},
            files={
                "adapter_config": ("adapter_config.json", config, "application/json"),
                "adapter_model": ("adapter_model.safetensors", weights, "application/octet-stream"),
            },
            headers=headers,
        )
        if response.status_code != 429:  # the server's upload caps: come back when it says
            break
        await asyncio.sleep(_retry_after(response))
    if response.status_code in (200, 201):
        return True
    if response.status_code == 409:
        return False
    if response.status_code in (404, 405):
        raise ProvisioningUnsupported(
            f"POST {url}/v1/adapters answered {response.status_code}: this server has no adapter upload API. "
            "Serve adapters from disk instead: `lorahive-loadtest write-adapters DIR --count N ...` then "
            "`lorahive serve --adapters DIR`."
        )
    raise ProvisioningError(f"uploading adapter '{adapter_id}' failed: {response.status_code} {_message(response)}")


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(float(response.headers.get("Retry-After", "1")), 0.0)
    except ValueError:  # an HTTP date: not worth parsing for a one-second wait
        return 1.0


async def delete_adapter(http: httpx.AsyncClient, url: str, adapter_id: str, headers: dict[str, str] | None = None
                         ) -> bool:
    """Deletes one adapter; True if deleted, False if it was not there."""
    response = await http.delete(f"{url}/v1/adapters/{adapter_id}", headers=headers)
    if response.status_code in (200, 202, 204):
        return True
    if response.status_code == 404:
        return False
    raise ProvisioningError(f"deleting adapter '{adapter_id}' failed: {response.status_code} {_message(response)}")


@dataclass
class ProvisionOutcome:
    created: list[str] = field(default_factory=list)  # uploaded by us: ours to delete afterwards
    existing: list[str] = field(default_factory=list)  # already there (409): used, never deleted


async def provision(
    http: httpx.AsyncClient,
    url: str,
    ids: Sequence[str],
    dims: BaseDims,
    spec: AdapterSpec,
    seed: int = 0,
    base_model: str | None = None,
    parallel: int = 4,
    headers: dict[str, str] | None = None,
    on_done: Callable[[int], None] | None = None,
    outcome: ProvisionOutcome | None = None,
    kinds: Sequence[AdapterKind] = (),
) -> ProvisionOutcome:
    """Uploads a synthetic adapter for each id, of `kinds` in turn (see `spec_for`), `parallel` at a time
    (weights are generated in a worker thread so the event loop keeps the uploads going). Pass `outcome` to
    learn what was created even when a later upload fails; the first failure cancels the uploads still running."""
    outcome = outcome if outcome is not None else ProvisionOutcome()
    gate = asyncio.Semaphore(parallel)

    async def one(index: int, adapter_id: str) -> None:
        async with gate:
            config, weights = await asyncio.to_thread(
                adapter_files, dims, spec_for(spec, kinds, index), adapter_seed(seed, index), base_model)
            created = await upload_adapter(http, url, adapter_id, config, weights, headers)
            (outcome.created if created else outcome.existing).append(adapter_id)
            if on_done is not None:
                on_done(len(outcome.created) + len(outcome.existing))

    if not ids:
        return outcome
    # One upload first: a server without the API fails once, with one clear message, not N times.
    await one(0, ids[0])
    try:
        async with asyncio.TaskGroup() as group:
            for index, adapter_id in enumerate(ids[1:], 1):
                group.create_task(one(index, adapter_id))
    except BaseExceptionGroup as grouped:
        raise grouped.exceptions[0] from None
    return outcome


async def cleanup(http: httpx.AsyncClient, url: str, ids: Sequence[str], headers: dict[str, str] | None = None
                  ) -> list[str]:
    """Deletes `ids`; returns the messages of those that failed (a failed delete must not hide the run)."""
    failures = []
    for adapter_id in ids:
        try:
            await delete_adapter(http, url, adapter_id, headers)
        except (ProvisioningError, httpx.HTTPError) as exc:
            failures.append(str(exc))
    return failures


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    except (json.JSONDecodeError, AttributeError, ValueError):
        pass
    return response.text[:300]
