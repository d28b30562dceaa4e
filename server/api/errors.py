"""Every error leaves the server in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

OpenAI's SDKs read that body to build their exception (`openai.NotFoundError`, ...), so FastAPI's default
`{"detail": ...}` would reach users as an opaque failure. Handlers here cover request validation,
malformed JSON, unknown routes and methods, the engine's `RequestError`s, and - through a small ASGI
middleware - anything unexpected (500 with an error id that is also in the server log).
"""

from __future__ import annotations

import difflib
import logging
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.protocol import CUSTOM_ERROR_CODES
from server.api.route_matching import routes_matching_path
from server.requests import (
    AdapterBrokenError,
    AdapterChangedError,
    AdapterNotFoundError,
    EngineStepError,
    QueueFullError,
    RequestError,
    ServerDrainingError,
)

log = logging.getLogger("lorahive.api")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# OpenAI's error `type` by status, for HTTP errors raised by routing or by other routers' dependencies.
_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
# The `code` of a client error whose raiser named none: clients branch on `code`, so a 4xx never leaves it null.
# Statuses not listed use their HTTP phrase ("conflict", "unsupported_media_type", ...).
_CODE_BY_STATUS = {400: "invalid_request", 404: "not_found", 413: "request_too_large", 429: "rate_limit_exceeded"}
_PHRASES = {status.value: status.phrase for status in HTTPStatus}
UNKNOWN_PARAMETER = "unknown_parameter"


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_responses(descriptions: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: each status it may answer with, in OpenAI's error shape, and why."""
    return {status: {"model": ErrorResponse, "description": text} for status, text in descriptions.items()}


def error_response(
    status_code: int,
    message: str,
    *,
    error_type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    if code is None and 400 <= status_code < 500:
        code = _default_code(status_code)
    info = ErrorInfo(message=_encodable(message), type=error_type, param=_encodable(param), code=code)
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status_code, headers=headers)


def _default_code(status: int) -> str:
    phrase = _PHRASES.get(status, "invalid request")
    return _CODE_BY_STATUS.get(status) or phrase.lower().replace(" ", "_").replace("-", "_")


def _encodable(text: str | None) -> str | None:
    """`text` that UTF-8 can encode: a message or param may quote client input holding a lone surrogate, and the
    body of the error about it must not fail in turn."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def internal_error_body(error_id: str) -> dict[str, Any]:
    """The body of a 500 (also sent as an SSE event when a stream fails after its headers went out)."""
    message = f"The server had an error while processing your request (error id {error_id})."
    return ErrorResponse(error=ErrorInfo(message=message, type=SERVER_ERROR)).model_dump()


class APIError(Exception):
    """An error a route raises with its own status (409, 413, 507, ...), answered in OpenAI's shape."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,  # default: from the status, as for any HTTP error
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type


def _type_for(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, SERVER_ERROR if status >= 500 else INVALID_REQUEST)


def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    kind = exc.error_type or _type_for(exc.status_code)
    return error_response(exc.status_code, exc.message, error_type=kind, param=exc.param, code=exc.code)


def _param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    parts = loc[1:] if loc and loc[0] == "body" else loc
    return ".".join(str(p) for p in parts) or None


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"type": "value_error", "loc": ("body",), "msg": "Invalid request."}
    kind, loc, msg = first["type"], tuple(first["loc"]), first["msg"]
    param = _param_from_loc(loc)
    code: str | None
    if kind == "json_invalid":
        # FastAPI reports the character position as the location; that is not a parameter name.
        reason = first.get("ctx", {}).get("error", "invalid JSON")
        message, param, code = (
            f"We could not parse the JSON body of your request ({reason}).",
            None,
            "invalid_json",
        )
    elif kind in CUSTOM_ERROR_CODES:
        message, code = msg, kind  # our own validators already write a whole sentence
    elif kind == "string_unicode":  # pydantic's verdict on a field name that is not valid Unicode
        message = ("A field name or key in the request holds a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                   "without its pair), which is not valid Unicode; send valid UTF-8 text.")
        code = "invalid_value"
    elif param is None:
        message = "The request body must be a JSON object (sent with Content-Type: application/json)."
        code = "invalid_body"
    elif kind == "missing":
        message, code = f"Missing required parameter: '{param}'.", "missing_required_parameter"
    elif kind == "extra_forbidden":
        hint = _did_you_mean(request, loc) or " GET /openapi.json lists the fields this route takes."
        message, code = f"Unknown parameter: '{param}'.{hint}", UNKNOWN_PARAMETER
    else:
        code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
        message = f"Invalid value for '{param}': {msg}."
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more problem(s) in the request.)"
    return error_response(400, message, param=param, code=code)


def _did_you_mean(request: Request, loc: tuple[int | str, ...]) -> str:
    """For an unknown top-level body field, the route's closest field name (typos are the usual cause)."""
    body_field = getattr(request.scope.get("route"), "body_field", None)
    model = body_field.field_info.annotation if body_field is not None else None
    if len(loc) != 2 or not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[1]), list(model.model_fields), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _request_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return request_error_response(exc)


def request_error_response(exc: RequestError) -> JSONResponse:
    """The answer to an engine refusal (also sent in-band when a stream ends with one)."""
    if isinstance(exc, AdapterBrokenError):  # the server's stored copy is at fault, not the request
        return error_response(503, exc.message, error_type=SERVER_ERROR, param=exc.param, code=exc.code)
    if isinstance(exc, QueueFullError):
        return error_response(429, exc.message, error_type=_type_for(429), code=exc.code,
                              headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, AdapterChangedError):  # a transient state of the store: the same request will succeed
        return error_response(503, exc.message, error_type=SERVER_ERROR, param=exc.param, code=exc.code,
                              headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, ServerDrainingError):
        return error_response(503, exc.message, error_type=SERVER_ERROR, code=exc.code)
    status = 404 if isinstance(exc, AdapterNotFoundError) else 400
    return error_response(status, exc.message, param=exc.param, code=exc.code)


def engine_error_response(exc: EngineStepError) -> JSONResponse:
    """A 500 carrying the id under which the engine logged the cause (no second log line needed)."""
    return JSONResponse(internal_error_body(exc.error_id), status_code=500)


def _engine_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineStepError)
    return engine_error_response(exc)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    message = str(exc.detail)
    headers = exc.headers
    code = None
    if message == HTTPStatus(status).phrase:  # Starlette's bare "Not Found" / "Method Not Allowed"
        if status == 404:
            message, code = f"Unknown request URL: {request.method} {request.url.path}.", "unknown_url"
        elif status == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
            headers = {**(headers or {}), "Allow": ", ".join(sorted(_allowed_methods(request)))}
    return error_response(status, message, error_type=_type_for(status), code=code, headers=headers)


def _allowed_methods(request: Request) -> set[str]:
    """Every method some route serves at this path. Starlette's 405 names only the first route that matched the
    path, and FastAPI makes one route per method, so `GET` and `POST` on one path would each hide the other."""
    methods: set[str] = set()
    for route in routes_matching_path(request.scope):
        methods |= getattr(route, "methods", None) or set()
    return methods


class _UnhandledErrorMiddleware:
    """Turns an unexpected exception into a logged 500 in OpenAI's shape.

    A plain `Exception` handler would do the same, but Starlette re-raises after calling it, so the server
    logs a second traceback without the error id; catching here gives one log line per failure.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("unhandled error %s in %s %s", error_id, scope.get("method"), scope.get("path"))
            if started:  # too late for a clean error body; let the server drop the connection
                raise
            await JSONResponse(internal_error_body(error_id), status_code=500)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RequestError, _request_error)  # AdapterNotFoundError: 404, AdapterBrokenError: 503
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(EngineStepError, _engine_error)
    app.add_middleware(_UnhandledErrorMiddleware)
