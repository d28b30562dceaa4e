"""Calling an ASGI app in this process as an HTTP server would, and reading its answer as it streams: how a Ray
Serve replica hands requests to the lorahive app it hosts (`server/ray_serving.py`) without a socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from urllib.parse import unquote


async def asgi_answer(app: Callable, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes) -> AsyncIterator[tuple[int, list[tuple[str, str]]] | bytes]:
    """`app`'s answer to one HTTP request, called in this process: (status, headers), then each piece of the body
    as the app sends it. Closing the iterator before the end is the client leaving: the app sees a disconnect."""
    path, _, query = target.partition("?")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": unquote(path), "raw_path": path.encode(), "query_string": query.encode(),
        "root_path": "", "headers": [(name.lower().encode("latin-1"), value.encode("latin-1"))
                                     for name, value in headers],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
    }
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    requested = False

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        start = await messages.get()
        if start is None:
            task.result()  # raises what the app raised
            raise RuntimeError("the app ended without answering")
        yield start["status"], [(name.decode("latin-1"), value.decode("latin-1")) for name, value in start["headers"]]
        while (message := await messages.get()) is not None:
            if message["type"] != "http.response.body":
                continue
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body"):
                break
    finally:
        gone.set()  # the answer is out, or its reader left: either way the app may stop listening
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task
