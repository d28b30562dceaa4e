"""`--max-concurrent-requests-per-tenant`: a tenant's requests in flight at once, counted at the HTTP layer;
`--max-concurrent-uploads-per-tenant` and `--max-concurrent-uploads`: adapter uploads in flight.

A request counts from the moment it is authenticated until its response has ended: for a stream that is
its last event, or the client going away (Starlette returns from the response when it sees the
disconnect, and the generation routes abort the engine work then). One more is refused with a 429 and
`Retry-After`. The server's anonymous callers (no key file) are one tenant here.

Uploads are counted before their body is read: each may hold up to `--max-adapter-bytes` in memory and a
worker thread while it is checked, so the caps bound both, and one tenant's uploads leave room for others'.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import Principal
from server.api.errors import error_response
from server.api.request_limits import flag

RETRY_AFTER_SECONDS = 1


def _too_many(message: str) -> ASGIApp:
    return error_response(429, message, error_type="rate_limit_error", code="rate_limit_exceeded",
                          headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


@contextmanager
def _counted(in_flight: Counter[str | None], tenant: str | None, send: Send) -> Iterator[Send]:
    """Count one request of `tenant` until its response's last body message goes out (or the app ends without
    one); yields the `send` that does so. Released before that message is sent, not when the app returns: a
    client that sends its next request as soon as it has the response must not find this one still counted."""
    in_flight[tenant] += 1
    counted = True

    def release() -> None:
        nonlocal counted
        if counted:
            counted = False
            in_flight[tenant] -= 1
            if not in_flight[tenant]:
                del in_flight[tenant]

    async def send_releasing(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            release()
        await send(message)

    try:
        yield send_releasing
    finally:
        release()


class TenantConcurrencyLimit:
    """Runs inside `Authentication`, which leaves the principal in the request's state."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        # One event loop runs every request's middleware: no lock is needed around the counts.
        self.in_flight: Counter[str | None] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal: Principal | None = scope.get("state", {}).get("principal")
        if principal is None:  # an open route (/health, /metrics): not a tenant's request
            await self.app(scope, receive, send)
            return
        tenant = principal.tenant
        if self.in_flight[tenant] >= self.limit:
            message = (f"Too many requests in flight for this tenant: this server's "
                       f"{flag('max_concurrent_requests_per_tenant')} is {self.limit}. Retry when one has finished.")
            await _too_many(message)(scope, receive, send)
            return
        with _counted(self.in_flight, tenant, send) as counted_send:
            await self.app(scope, receive, counted_send)


class UploadConcurrencyLimit:
    """Runs inside `Authentication`; `is_upload(scope)` tells an upload from any other request."""

    def __init__(self, app: ASGIApp, per_tenant: int, in_all: int, is_upload: Callable[[Scope], bool]) -> None:
        self.app = app
        self.per_tenant = per_tenant
        self.in_all = in_all
        self.is_upload = is_upload
        self.in_flight: Counter[str | None] = Counter()  # one event loop: no lock, as above

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal: Principal | None = scope.get("state", {}).get("principal")
        if principal is None or not self.is_upload(scope):
            await self.app(scope, receive, send)
            return
        tenant = principal.tenant
        if self.in_flight[tenant] >= self.per_tenant:
            message = (f"Too many adapter uploads in flight for this tenant: this server's "
                       f"{flag('max_concurrent_uploads_per_tenant')} is {self.per_tenant}. Retry when one has "
                       "finished.")
        elif self.in_flight.total() >= self.in_all:
            message = (f"Too many adapter uploads in flight on this server: its {flag('max_concurrent_uploads')} "
                       f"is {self.in_all}. Retry in a moment.")
        else:
            with _counted(self.in_flight, tenant, send) as counted_send:
                await self.app(scope, receive, counted_send)
            return
        await _too_many(message)(scope, receive, send)
