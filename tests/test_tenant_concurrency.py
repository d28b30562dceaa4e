"""The per-tenant caps of server/api/tenant_concurrency.py count a request until its response has gone out, not
until the app's coroutine returns: a client that sends its next request as soon as it has read a response must
find that response's request no longer counted."""

from __future__ import annotations

import asyncio

import pytest

from server.api.auth import Principal
from server.api.tenant_concurrency import TenantConcurrencyLimit, UploadConcurrencyLimit


def limiter(kind: str, app):
    if kind == "uploads":
        return UploadConcurrencyLimit(app, per_tenant=1, in_all=8, is_upload=lambda scope: True)
    return TenantConcurrencyLimit(app, limit=1)


async def call(middleware, path: str, statuses: list[int]) -> None:
    """One POST of tenant acme through `middleware`; the status it answers goes to `statuses`."""
    scope = {"type": "http", "path": path, "method": "POST", "headers": [],
             "state": {"principal": Principal("acme", "tenant")}}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await middleware(scope, receive, send)


@pytest.mark.parametrize("kind", ["requests", "uploads"])
def test_a_request_stops_counting_when_its_response_has_gone_out(kind: str) -> None:
    async def scenario() -> list[int]:
        tail = asyncio.Event()

        async def app(scope, receive, send) -> None:  # answers, then still runs a while (logging, cleanup)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok", "more_body": False})
            if scope["path"] == "/first":
                await tail.wait()

        middleware = limiter(kind, app)
        statuses: list[int] = []

        first = asyncio.create_task(call(middleware, "/first", statuses))
        while not statuses:  # the first response is out; its app has not returned
            await asyncio.sleep(0)
        await call(middleware, "/second", statuses)
        tail.set()
        await first
        assert not middleware.in_flight, "every count released"
        return statuses

    assert asyncio.run(scenario()) == [200, 200]


@pytest.mark.parametrize("kind", ["requests", "uploads"])
def test_one_more_request_while_a_response_is_still_going_out_is_refused(kind: str) -> None:
    async def scenario() -> list[int]:
        streaming = asyncio.Event()
        finish = asyncio.Event()

        async def app(scope, receive, send) -> None:  # a stream: its last event comes later
            await send({"type": "http.response.start", "status": 200, "headers": []})
            if scope["path"] == "/first":
                await send({"type": "http.response.body", "body": b"data", "more_body": True})
                streaming.set()
                await finish.wait()
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        middleware = limiter(kind, app)
        statuses: list[int] = []

        first = asyncio.create_task(call(middleware, "/first", statuses))
        await streaming.wait()
        await call(middleware, "/second", statuses)
        finish.set()
        await first
        return statuses

    assert asyncio.run(scenario()) == [200, 429]
