"""Where prompts are tokenized: threads of their own, off the event loop and off asyncio's default executor.

Tokenizing holds a thread for as long as it takes, seconds for a prompt of megabytes. So that this delays
no one else, prompts run in two lanes. Short prompts (up to `SHORT_PROMPT_BYTES`) have a lane of their own:
a short request never waits behind a long one. Long prompts run on `--tokenizer-workers` threads, at most
`--max-concurrent-tokenizations-per-tenant` of one tenant's at once, so one tenant's flood of long prompts
leaves workers to the other tenants. A tenant's further long prompts wait for its turn rather than being
refused: the request is already in memory, and `--max-concurrent-requests-per-tenant` bounds how many wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from server.config import Settings
from server.torch_threads import single_threaded_executor

T = TypeVar("T")
# A short prompt tokenizes in milliseconds; two threads keep one slow short prompt from holding up the next.
SHORT_PROMPT_BYTES = 64 * 2**10
SHORT_LANE_WORKERS = 2


class TokenizationPool:
    def __init__(self, workers: int, per_tenant: int) -> None:
        # Tokenizers are no torch work, but a thread of ours that ever runs an op must not claim the engine's cores.
        self._short = single_threaded_executor(SHORT_LANE_WORKERS, "lorahive-tokenize-short")
        self._long = single_threaded_executor(workers, "lorahive-tokenize-long")
        self._per_tenant = per_tenant
        self._tenant_turns: dict[str | None, asyncio.Semaphore] = {}  # tenants come from the key file: bounded

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenizationPool:
        return cls(settings.tokenizer_workers, settings.max_concurrent_tokenizations_per_tenant)

    async def run(self, tenant: str | None, size: int, work: Callable[..., T], *args: object) -> T:
        """`work(*args)` on a tokenizer thread: the short lane when the prompt's `size` (its UTF-8 bytes, or
        token ids) is small, else the long lane within the tenant's turns."""
        loop = asyncio.get_running_loop()
        if size <= SHORT_PROMPT_BYTES:
            return await loop.run_in_executor(self._short, work, *args)
        turns = self._tenant_turns.setdefault(tenant, asyncio.Semaphore(self._per_tenant))
        await turns.acquire()
        try:
            future = self._long.submit(work, *args)
        except BaseException:
            turns.release()
            raise
        # The turn ends when the thread is done, not when the request stops waiting (its client gone): a running
        # tokenization cannot be stopped, and the cap counts threads at work. (A queued one is cancelled with the
        # request, which also ends the turn.)
        future.add_done_callback(lambda _: _release_on(loop, turns))
        return await asyncio.wrap_future(future, loop=loop)


def _release_on(loop: asyncio.AbstractEventLoop, turns: asyncio.Semaphore) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (the server stopped): nobody waits any more
        loop.call_soon_threadsafe(turns.release)


def get_tokenization_pool(request: Request) -> TokenizationPool:
    return request.app.state.tokenization_pool


TokenizationPoolDep = Annotated[TokenizationPool, Depends(get_tokenization_pool)]
