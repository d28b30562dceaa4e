"""server/asgi_call.py: an app called in process answers as over HTTP, streams as it sends, and sees its client
leave when the reader stops early."""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from server.asgi_call import asgi_answer


def app(left: asyncio.Event) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"path": request.url.path, "query": dict(request.query_params),
                             "body": (await request.body()).decode(), "key": request.headers.get("x-key")},
                            status_code=201, headers={"x-answer": "yes"})

    async def stream(request: Request) -> StreamingResponse:
        async def events():
            sent = 0
            try:
                for sent in range(1000):
                    yield f"data: {sent}\n\n"
                    await asyncio.sleep(0.001)
            finally:  # starlette stops the stream when its client leaves
                if sent < 999:
                    left.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def broken(request: Request) -> JSONResponse:
        raise RuntimeError("boom")

    return Starlette(routes=[Route("/echo/{name}", echo, methods=["POST"]), Route("/stream", stream),
                             Route("/broken", broken)])


def test_a_request_in_process_is_answered_as_over_http() -> None:
    async def scenario() -> list:
        return [part async for part in asgi_answer(app(asyncio.Event()), "POST", "/echo/a%20b?x=1&y=2",
                                                   [("X-Key", "k")], b"hello")]

    (status, headers), *body = asyncio.run(scenario())
    assert status == 201 and ("x-answer", "yes") in headers
    assert b"".join(body) == b'{"path":"/echo/a b","query":{"x":"1","y":"2"},"body":"hello","key":"k"}'


def test_a_stream_arrives_piece_by_piece_and_a_reader_that_stops_is_a_client_that_left() -> None:
    left = asyncio.Event()

    async def scenario() -> list[bytes]:
        answer = asgi_answer(app(left), "GET", "/stream", [], b"")
        (status, _), pieces = await anext(answer), []
        assert status == 200
        async for piece in answer:
            pieces.append(piece)
            if len(pieces) == 3:
                break
        await answer.aclose()
        await asyncio.wait_for(left.wait(), timeout=5)  # the app saw http.disconnect and stopped
        return pieces

    assert asyncio.run(scenario()) == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]


def test_an_app_that_fails_before_answering_raises_its_error() -> None:
    """A bare ASGI app that raises before `http.response.start`: the caller gets that error, not a hang. (Starlette's
    own apps answer such a failure with a 500 first, which comes back as the answer.)"""

    async def failing(scope, receive, send) -> None:
        raise RuntimeError("boom")

    async def first(application, path: str):
        return await anext(asgi_answer(application, "GET", path, [], b""))

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(first(failing, "/"))
    status, _ = asyncio.run(first(app(asyncio.Event()), "/broken"))
    assert status == 500
