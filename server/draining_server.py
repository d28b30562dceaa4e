"""`lorahive serve`'s HTTP server: uvicorn, with SIGTERM meaning "drain, then exit 0" rather than "stop now"."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.api.lifecycle_routes import Lifecycle
from server.config import Settings
from server.connection_guard import ConnectionLimits, GuardedH11Protocol

log = logging.getLogger("lorahive.server")

# After the drain timeout cut the last requests, how long their clients get to receive the final error.
CUT_GRACE_S = 2.0
# Once uvicorn has asked every connection to close, how long before the ones still open are dropped: their
# clients neither finish sending nor read what they are sent.
CLOSE_GRACE_S = 1.0
# uvicorn cancels the requests still running this long after its shutdown began (logging a traceback for each):
# by then the dropped connections' requests have seen their client leave and ended.
CANCEL_AFTER_S = CLOSE_GRACE_S + 2.0


def serve_app(app: FastAPI, settings: Settings, cut: Callable[[], None]) -> None:
    """Serve `app` (from `build_app`) on the settings' host and port until SIGTERM has drained it, or SIGINT
    stopped it. `cut` ends every request still running when the drain times out."""
    # uvicorn's own wait for connections after the drain is bounded too: past it, it cancels what is left.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            http=guarded_protocol(settings),  # type: ignore[arg-type]
                            timeout_graceful_shutdown=CANCEL_AFTER_S)
    server = DrainingServer(config, app.state.lifecycle, settings.drain_timeout, cut)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises SIGINT once it has stopped: a normal end
        server.run()


def guarded_protocol(settings: Settings) -> Callable[..., GuardedH11Protocol]:
    """uvicorn's `http` protocol for `lorahive serve`: h11 whatever is installed (the guard extends uvicorn's h11
    protocol), with the settings' deadline for request heads and cap on connections."""
    limits = ConnectionLimits(header_timeout=settings.header_timeout, max_connections=settings.max_connections)
    return functools.partial(GuardedH11Protocol, limits=limits)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM starts a drain.

    Draining: `lifecycle.draining` makes the app answer new requests with 503 and `/ready` with 503 (so a load
    balancer stops sending traffic here) while the requests already in flight go on. The server stops once
    none is left, or once `drain_timeout` seconds have passed: then `cut` ends whatever still runs (its clients
    get a final error, not a hang) and the server stops when those answers are out, or `CUT_GRACE_S` later.
    uvicorn's shutdown follows (listeners closed, idle connections closed); connections still open `CLOSE_GRACE_S`
    later are dropped, so slow clients cannot stretch the exit past `drain_timeout + CUT_GRACE_S + CLOSE_GRACE_S`.
    uvicorn re-raises the signals it handled once it is done, which would end the process by SIGTERM; a drained
    SIGTERM is not re-raised, so the process exits 0. SIGINT, and a second SIGTERM, keep uvicorn's meaning: stop now.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout: float,
                 cut: Callable[[], None]) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout = drain_timeout
        self.cut = cut
        self._drain_deadline: float | None = None
        self._drain_logged = False
        self._cut_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: only flips state. The event loop's next tick (every 0.1 s) does the work.
        if sig == signal.SIGTERM and self._drain_deadline is None:
            self.lifecycle.draining = True
            self._drain_deadline = time.monotonic() + self.drain_timeout
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self._drain_deadline is None:
            return False
        if not self._drain_logged:
            self._drain_logged = True
            log.info("SIGTERM: draining %d request(s) in flight, for at most %.1f s (--drain-timeout)",
                     self.lifecycle.in_flight, self.drain_timeout)
        if self.lifecycle.in_flight == 0:
            log.info("drained: no request left, shutting down")
            return True
        now = time.monotonic()
        if self._cut_at is None and now >= self._drain_deadline:
            self._cut_at = now
            log.warning("drain timeout: cutting %d request(s) still in flight", self.lifecycle.in_flight)
            self.cut()
        elif self._cut_at is not None and now - self._cut_at >= CUT_GRACE_S:
            log.warning("%d request(s) still in flight %.0f s after the cut; shutting down anyway",
                        self.lifecycle.in_flight, CUT_GRACE_S)
            return True
        return False

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        dropping = asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._drop_connections)
        try:
            await super().shutdown(sockets)
        finally:
            dropping.cancel()

    def _drop_connections(self) -> None:
        """Abort every connection still open: a request on one sees its client leave and ends."""
        connections = list(self.server_state.connections)
        if connections:
            log.warning("dropping %d connection(s) still open %.0f s after shutdown began (clients that neither "
                        "send nor read)", len(connections), CLOSE_GRACE_S)
        for connection in connections:
            connection.transport.abort()
