"""`GET /metrics` (Prometheus text format) and the middleware counting HTTP requests per route.

The endpoint label is the matched route's template (`/v1/adapters/{adapter_id}`), never the raw path,
so its values are bounded by the routes (requests refused before routing too); a path no route matches
counts as `unmatched`. Streamed responses are counted when they end, with the status their first message
sent.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.route_matching import routes_matching_path
from server.metrics import Metrics

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


class HTTPMetrics:
    """Counts every HTTP request by route template, method and status code."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    @staticmethod
    def _endpoint(scope: Scope) -> str:
        """The route's path template: the one the router matched (it records it in the shared scope), or, for a
        request answered before routing (a 401, a 503 while draining), the first route whose path matches."""
        route = scope.get("route") or next(routes_matching_path(scope), None)
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.observe_http(self._endpoint(scope), scope["method"], status)
