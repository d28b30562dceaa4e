"""Streaming a request's output: merging its engine streams, the server-sent events response, and noticing a
client that went away, so that engine work nobody will read is aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Coroutine, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.dependencies import RequestStreamAPI
from server.requests import ChoiceDelta

T = TypeVar("T")


async def merge_streams(streams: Sequence[RequestStreamAPI]) -> AsyncGenerator[tuple[int, ChoiceDelta], None]:
    """Yields `(stream position, delta)` from all streams as soon as any has output, so one slow prompt
    does not hold back the others. Streams not yet finished when the consumer stops (client gone,
    cancellation, an error) are aborted, which frees their engine resources."""
    queue: asyncio.Queue[tuple[int, ChoiceDelta | BaseException | None]] = asyncio.Queue()

    async def pump(position: int, stream: RequestStreamAPI) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((position, delta))
            queue.put_nowait((position, None))
        except Exception as exc:  # handed to the consumer, which re-raises it in the request's task
            queue.put_nowait((position, exc))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    live = set(range(len(streams)))
    try:
        while live:
            position, item = await queue.get()
            if item is None:
                live.discard(position)
            elif isinstance(item, BaseException):
                live.discard(position)
                raise item
            else:
                yield position, item
    finally:
        for position in live:
            streams[position].abort()
        for task in pumps:
            task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Runs `work`, cancelling it (and so aborting its engine streams) if the client disconnects first:
    uvicorn does not cancel a handler whose client left, so a non-streamed generation would otherwise
    run to `max_tokens` for nobody. Returns None if the client left."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()  # the client left first
        await asyncio.wait((task,))  # let its cleanup (aborting the engine streams) run now
        return None
    finally:
        watcher.cancel()
        task.cancel()  # a no-op when done; covers this handler being cancelled itself


class EventStream(StreamingResponse):
    """`text/event-stream` whose generator is always closed when the response ends.

    Starlette stops iterating when the client disconnects, but if that happens while a chunk is being
    sent it leaves the generator suspended at its `yield`; closing it here runs its `finally` (which
    aborts the engine streams) now rather than whenever the garbage collector gets to it.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
