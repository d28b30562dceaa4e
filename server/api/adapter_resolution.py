"""Which adapter a generation request names: `model` (the base model's name, or an adapter's id) or `adapter_id`.

An adapter the caller may not see is "not found", like one that is not there; when `model` names nothing, the
error says what this server serves.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.api.adapter_access import AdapterAccess
from server.api.dependencies import EngineAPI
from server.api.protocol import BaseGenerationRequest
from server.requests import AdapterNotFoundError, RequestError


def model_not_found(engine: EngineAPI, name: str, param: str) -> AdapterNotFoundError:
    error = AdapterNotFoundError(name, param=param)
    if param == "model":  # the client may not know about adapters at all: say what is served
        error.message = (
            f"The model '{name}' does not exist; this server serves '{engine.model_name}' and its adapters "
            "(see GET /v1/models)."
        )
    return error


@dataclass(frozen=True)
class ResolvedAdapter:
    id: str | None  # None: the base model alone
    param: str  # the request field that chose it, named in errors


def resolve_adapter(engine: EngineAPI, access: AdapterAccess, body: BaseGenerationRequest) -> ResolvedAdapter:
    """The adapter the request names, in `model` or `adapter_id` (with `model` naming the base model, or naming
    the same adapter). One the caller may not see is "not found", like one that is not there."""
    named_by_model = _adapter_named_by_model(engine, access, body.model)
    if body.adapter_id is None:
        return ResolvedAdapter(named_by_model, "model")
    if not access.visible(body.adapter_id):
        raise model_not_found(engine, body.adapter_id, "adapter_id")
    if named_by_model is not None and named_by_model != body.adapter_id:
        raise RequestError(
            f"'model' names the adapter '{named_by_model}' and 'adapter_id' the adapter '{body.adapter_id}'; "
            f"name one adapter, or set 'model' to the base model '{engine.model_name}'.",
            param="adapter_id",
            code="conflicting_parameters",
        )
    return ResolvedAdapter(body.adapter_id, "adapter_id")


def _adapter_named_by_model(engine: EngineAPI, access: AdapterAccess, model: str | None) -> str | None:
    # The base model's name wins over an adapter of the same name: the base must always be reachable.
    if model is None or model == engine.model_name:
        return None
    if access.visible(model):
        return model
    raise model_not_found(engine, model, "model")
