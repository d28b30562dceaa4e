"""`--max-concurrent-requests-per-tenant`: a tenant's requests in flight at once, counted at the HTTP layer.

A request counts from the moment it is authenticated until its response has ended: for a stream that is
its last event, or the client going away (Starlette returns from the response when it sees the
disconnect, and the generation routes abort the engine work then). One more is refused with a 429 and
`Retry-After`. The server's anonymous callers (no key file) are one tenant here.
"""

from __future__ import annotations

from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.auth import Principal
from server.api.errors import error_response
from server.api.request_limits import flag

RETRY_AFTER_SECONDS = 1


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
            response = error_response(429, message, error_type="rate_limit_error", code="rate_limit_exceeded",
                                      headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            await response(scope, receive, send)
            return
        self.in_flight[tenant] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[tenant] -= 1
            if not self.in_flight[tenant]:
                del self.in_flight[tenant]
