"""Refuse request bodies over a size limit with a 413, before they are parsed or spooled.

FastAPI reads and parses a multipart form before any route code runs, so a limit checked in the route
would come after a 10 GB upload had already been written to a temporary file. This middleware checks
`Content-Length` up front and counts the bytes of bodies that do not declare one (or lie about it).

Only adapter uploads, multipart forms sent to the two upload routes, get the upload limit: any other body
on those paths (a JSON PATCH, a JSON body sent where a form belongs) is parsed in memory and gets the JSON
one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response

_ADAPTERS = "/v1/adapters"


def is_adapter_upload(scope: Scope) -> bool:
    """A multipart form to `POST /v1/adapters` or `PUT /v1/adapters/{id}`."""
    path, method = scope["path"], scope.get("method")
    content_type = dict(scope["headers"]).get(b"content-type", b"")
    upload_route = (method == "POST" and path == _ADAPTERS) or (method == "PUT" and path.startswith(_ADAPTERS + "/"))
    return upload_route and content_type.split(b";")[0].strip().lower() == b"multipart/form-data"


class BodyLimit(NamedTuple):
    max_bytes: int
    setting: str  # the flag that sets it, named in the refusal


def _too_large(limit: BodyLimit) -> str:
    return (f"The request body is larger than this server accepts on this route: {limit.max_bytes} bytes, "
            f"set by {limit.setting}.")


class BodySizeLimit:
    """`limit_for(scope)` gives the largest body accepted for that request."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], BodyLimit]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit.max_bytes:
            await error_response(413, _too_large(limit), code="request_too_large")(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit.max_bytes:
                # An HTTPException, not our own type: FastAPI turns any other error raised while it reads a
                # body into a 400, but lets this one through to the OpenAI-shaped 413 handler.
                raise HTTPException(413, _too_large(limit))
            return message

        await self.app(scope, counting_receive, send)
