"""A deadline for request bodies: a client that sends its body too slowly gets a 408 and its connection closes.

The deadline is `timeout_s` after the headers, plus one second for every `min_rate` bytes received (Apache's
mod_reqtimeout rule), so a large upload on a decent link always finishes, while a client that trickles or stalls
cannot hold a request, and what waits for it, open longer than its body's size allows. Only the wait for the body
is timed: once the last chunk is in, `receive` is the server's disconnect notice and waits as long as the response
runs.

The 408 is sent from here rather than raised: the app that was waiting for the body is told the client left
(`http.disconnect`), and whatever it answers to that is dropped.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response

DISCONNECT: Message = {"type": "http.disconnect"}


class BodyTimeout:
    def __init__(self, app: ASGIApp, timeout_s: float, min_rate: int) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.min_rate = min_rate  # bytes per second that earn one more second

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        received = 0
        body_done = False
        response_started = False
        answered_408 = False

        async def timed_receive() -> Message:
            nonlocal received, body_done, answered_408
            if answered_408:
                return DISCONNECT
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(started + self.timeout_s + received / self.min_rate):
                    message = await receive()
            except TimeoutError:
                if not response_started:
                    await self._request_timeout(scope, receive, send)
                    answered_408 = True
                return DISCONNECT
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if answered_408:
                return
            response_started = True
            await send(message)

        await self.app(scope, timed_receive, guarded_send)

    async def _request_timeout(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (f"The request body did not arrive in time: this server waits {self.timeout_s:g} s plus 1 s per "
                   f"{self.min_rate} bytes received (--body-timeout, --body-min-rate).")
        response = error_response(408, message, code="request_timeout", headers={"Connection": "close"})
        await response(scope, receive, send)
