"""Refuse request bodies over a size limit with a 413, before they are parsed or spooled.

FastAPI reads and parses a multipart form before any route code runs, so a limit checked in the route
would come after a 10 GB upload had already been written to a temporary file. This middleware checks
`Content-Length` up front and counts the bytes of bodies that do not declare one (or lie about it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response


class BodyLimit(NamedTuple):
    max_bytes: int
    setting: str  # the flag that sets it, named in the refusal


def _too_large(limit: BodyLimit) -> str:
    return (f"The request body is larger than this server accepts on this route: {limit.max_bytes} bytes, "
            f"set by {limit.setting}.")


class BodySizeLimit:
    """`limit_for(path)` gives the largest body accepted on that path."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], BodyLimit]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
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
