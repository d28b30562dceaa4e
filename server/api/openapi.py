"""`/openapi.json` that says what the server really answers.

FastAPI writes each route's own responses (its `response_model` and `responses=`). What it cannot know is added
here, so that a client generated from the document, or a fuzzer checking the server against it, meets no surprise:

* A request that fails validation gets a 400 in OpenAI's error shape (server/api/errors.py), not FastAPI's 422.
* The middleware answers for the routes it guards: 401 without a valid key (only when the server has keys), 429
  past the per-tenant concurrency limit (only when one is set) and, on the upload routes, past the upload caps,
  413 for a body over its limit, 503 while draining,
  500 for an unexpected failure. Each goes to exactly the operations its middleware guards, chosen by the same path
  sets the middleware reads, so a new route cannot be left out.
* A multipart form cannot carry null: FastAPI writes `T | None` for an optional file part, which reads "send null"
  where the client in fact leaves the part out.
* The generation routes answer `text/event-stream` when `stream` is true: each event's `data` is one JSON chunk (or
  an error body when a stream fails after its 200) and the last one is `[DONE]`. It is described with `itemSchema`,
  one event's schema, as OpenAPI 3.2 and FastAPI's own event-stream routes do.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.api.auth import OPEN_PATHS
from server.api.errors import ErrorResponse
from server.api.lifecycle_routes import UNGATED_PATHS

SCHEMAS = "#/components/schemas/"
BEARER = "bearer"  # the security scheme's name in the document
_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


@dataclass(frozen=True)
class Guards:
    """The optional middleware in front of the routes (server/api/app.py decides which run)."""

    keys_required: bool  # Authentication turns away requests without a valid key
    concurrency_limited: bool  # TenantConcurrencyLimit answers 429 past --max-concurrent-requests-per-tenant


def install_openapi(app: FastAPI, guards: Guards, event_streams: Mapping[str, type[BaseModel]]) -> None:
    """Serve the amended document. `event_streams`: path of a generation route -> the model of one streamed chunk."""
    build = app.openapi  # FastAPI's: builds the document from the routes (and caches it on the app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = amend(build(), guards, event_streams)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def amend(document: dict[str, Any], guards: Guards, event_streams: Mapping[str, type[BaseModel]]) -> dict[str, Any]:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    _add_models(schemas, [ErrorResponse, *event_streams.values()])
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    if guards.keys_required:
        description = "An API key of the server's --api-keys file, sent as 'Authorization: Bearer <key>'."
        document["components"]["securitySchemes"] = {BEARER: {"type": "http", "scheme": "bearer",
                                                              "description": description}}
    for path, model in event_streams.items():
        if path not in document["paths"]:
            raise KeyError(f"no route {path} to describe the event stream of")
        for operation in _methods(document["paths"][path]):
            content = operation["responses"]["200"].setdefault("content", {})
            content["text/event-stream"] = {"itemSchema": _event(SCHEMAS + model.__name__)}
    for path, operation in _operations(document):
        responses = operation["responses"]
        if responses.pop("422", None) is not None:
            _declare(responses, 400, "The request does not match this operation's parameters.")
        body = operation.get("requestBody", {}).get("content", {})
        if "multipart/form-data" in body:
            _no_null_parts(schemas, body["multipart/form-data"]["schema"])
            _declare(responses, 429, "Too many adapter uploads are in flight (--max-concurrent-uploads-per-tenant, "
                                     "--max-concurrent-uploads).")
        if body:
            _declare(responses, 413, "The body is over this server's limit (--max-request-bytes, uploads "
                                     "--max-adapter-bytes).")
        if path not in OPEN_PATHS:
            if guards.keys_required:
                operation["security"] = [{BEARER: []}]
                _declare(responses, 401, "No API key, or one this server does not know.",
                         headers={"WWW-Authenticate": _header("Always `Bearer`.", {"type": "string"})})
            if guards.concurrency_limited:
                _declare(responses, 429, "Too many of this tenant's requests are in flight "
                                         "(--max-concurrent-requests-per-tenant).")
        if path not in UNGATED_PATHS:
            _declare(responses, 503, "The server is draining after SIGTERM and takes no new requests.")
        _declare(responses, 500, "The server failed; the message carries the error id of its log entry.")
        if "429" in responses:  # every refusal for load says when to come back (both limits send it)
            retry = _header("Seconds to wait before retrying.", {"type": "integer", "minimum": 0})
            responses["429"].setdefault("headers", {})["Retry-After"] = retry
        operation["responses"] = dict(sorted(responses.items()))
    return document


def _methods(path_item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (operation for method, operation in path_item.items() if method in _HTTP_METHODS)


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, path_item in document["paths"].items():
        for operation in _methods(path_item):
            yield path, operation


def _add_models(schemas: dict[str, Any], models: list[type[BaseModel]]) -> None:
    """Put the models (and the models they use) among the components, keeping the ones FastAPI wrote."""
    _, definitions = models_json_schema([(m, "serialization") for m in models], ref_template=SCHEMAS + "{model}")
    for name, schema in definitions.get("$defs", {}).items():
        schemas.setdefault(name, schema)


def _declare(responses: dict[str, Any], status: int, description: str,
             headers: dict[str, Any] | None = None) -> None:
    """Document an error answer; a route that declared the status already keeps its own description."""
    response = responses.setdefault(str(status), {"description": description})
    response.setdefault("content", {"application/json": {"schema": {"$ref": SCHEMAS + ErrorResponse.__name__}}})
    if headers:
        response.setdefault("headers", {}).update(headers)


def _header(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "required": True, "schema": schema}


def _no_null_parts(schemas: dict[str, Any], form: dict[str, Any]) -> None:
    """Optional parts of a multipart form are left out, never sent as null: drop the null branch."""
    ref = form.get("$ref", "")
    properties = schemas[ref.removeprefix(SCHEMAS)]["properties"] if ref else form.get("properties", {})
    for name, schema in properties.items():
        branches = [b for b in schema.get("anyOf", ()) if b != {"type": "null"}]
        if "anyOf" in schema and len(branches) == 1:
            properties[name] = {k: v for k, v in schema.items() if k != "anyOf"} | branches[0]


def _event(chunk_ref: str) -> dict[str, Any]:
    """One server-sent event of a generation stream."""
    payload = {"anyOf": [{"$ref": chunk_ref}, {"$ref": SCHEMAS + ErrorResponse.__name__}]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"anyOf": [
                {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
                {"const": "[DONE]", "description": "The end of the stream."},
            ]},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
    }
