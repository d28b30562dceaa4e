"""The HTTP connections of `lorahive serve`: a deadline for every request's headers and a cap on open connections.

uvicorn's h11 protocol waits for a request's headers for as long as the client takes (a client sending one byte a
second holds its connection, and a worker's attention, forever) and accepts every connection it is offered.
`GuardedH11Protocol` adds the two bounds; the body's deadline is an ASGI middleware's
(server/api/body_timeout.py), since only the app knows when it reads the body.

A connection *waits for a head* from the moment it opens, and again from the end of each response until the next
request's headers are complete. Past `header_timeout` it is closed: with a 408 when part of a head came, silently
when nothing did (a 408 on an idle keep-alive connection can cross a request the client is just sending, which
would then read the 408 as its answer). At the cap, a new connection displaces the connection that has waited for a
head the longest (an idle keep-alive connection or a slow client; a client with a request running is never
displaced), so connections left open by slow or idle clients cannot lock out a client with a request to make; when
every connection has a request running, the newcomer gets a 503 and is closed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float  # seconds a connection may wait for a complete request head (--header-timeout)
    max_connections: int  # open connections at most (--max-connections)


def _raw_error(status: str, error_type: str, message: str, code: str, extra_headers: str = "") -> bytes:
    """A whole HTTP/1.1 error response in OpenAI's shape, for moments when no request is being answered."""
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra_headers}\r\n")
    return head.encode() + body


HEAD_TIMED_OUT = _raw_error(
    "408 Request Timeout", "invalid_request_error",
    "The request's headers did not arrive in time (--header-timeout); send them at once.", "request_timeout",
)
TOO_MANY_CONNECTIONS = _raw_error(
    "503 Service Unavailable", "server_error", "The server has as many connections open as it accepts "
    "(--max-connections), each with a request running; retry shortly.", "too_many_connections", "retry-after: 1\r\n",
)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for request heads and a cap on connections (`ConnectionLimits`)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, limits: ConnectionLimits) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.waiting_since: float | None = None  # when it began to wait for a request head; None while serving
        self._head_started = False  # some bytes of the awaited head have come
        self._head_deadline: asyncio.TimerHandle | None = None

    # The connection's life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        at_cap = len(self.connections) >= self.limits.max_connections
        displaced = at_cap and self._displace_longest_waiting()
        super().connection_made(transport)
        if at_cap and not displaced:
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self._wait_for_head()

    def data_received(self, data: bytes) -> None:
        if self.waiting_since is not None:
            self._head_started = True
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's head is complete: its body is the app's to time
            self._stop_waiting()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()  # may start a pipelined request at once
        if self.cycle is cycle and not self.transport.is_closing():
            self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self.waiting_since is not None:  # between requests or in the middle of a head: nothing to finish
            self._close_waiting()
            return
        super().shutdown()

    # Waiting for a head

    def _wait_for_head(self) -> None:
        self._stop_waiting()
        self.waiting_since = self.loop.time()
        self._head_started = False
        self._head_deadline = self.loop.call_later(self.limits.header_timeout, self._close_waiting)

    def _stop_waiting(self) -> None:
        self.waiting_since = None
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _close_waiting(self) -> None:
        head_started = self._head_started
        self._stop_waiting()
        if self.transport.is_closing():
            return
        if head_started:
            self.transport.write(HEAD_TIMED_OUT)
        self.transport.close()

    def _displace_longest_waiting(self) -> bool:
        """Close the connection that has waited for a head the longest; False if none waits."""
        waiting = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c.waiting_since is not None]
        if not waiting:
            return False
        min(waiting, key=lambda c: c.waiting_since or 0.0)._close_waiting()
        return True
