"""Drives a run: sends each request at its arrival time (open loop) or when a slot frees (closed loop),
stops at the request count or the duration, and marks warm-up requests.

Warm-up comes first and on top of the measured part: `--num-requests 100 --warmup-requests 10` sends
110 requests and measures the last 100; `--num-requests 100 --warmup 10` sends for 10 s and then 100
more requests, and measures those 100; `--duration 60 --warmup 10` runs for 70 s and measures the
requests sent after the first 10. The second a request belongs to is its scheduled arrival in an open
loop or a trace (so the split does not depend on how late the client got to it), and the moment it is
sent where a concurrency limit decides that. A run stopped by the duration lets the requests already in
flight finish (they are measured), and sends no new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from loadtest.client import ClientConfig, RequestResult, make_http_client, send_request
from loadtest.progress import Progress
from loadtest.workload import RequestSpec


@dataclass(frozen=True)
class RunLimits:
    num_requests: int | None = None  # measured requests to send
    duration_s: float | None = None  # measured seconds during which requests are sent
    warmup_requests: int = 0
    warmup_s: float = 0.0
    concurrency: int | None = None  # requests in flight at most (closed loop, or a cap on an open loop)
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("a run needs a request count, a duration, or both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("the request count must be at least 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError("the duration must be positive")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("the concurrency must be at least 1")
        if self.warmup_requests < 0 or self.warmup_s < 0:
            raise ValueError("warm-up cannot be negative")

    @property
    def max_sent(self) -> int | None:
        """Requests sent in all, when known before the run (a warm-up in seconds sends as many as it takes)."""
        if self.num_requests is None or self.warmup_s > 0:
            return None
        return self.num_requests + self.warmup_requests

    def is_warmup(self, index: int, sent_at: float) -> bool:
        """Whether the `index`-th request, sent (or scheduled) `sent_at` seconds after the start, is warm-up."""
        return index < self.warmup_requests or sent_at < self.warmup_s

    @property
    def deadline_s(self) -> float | None:
        return None if self.duration_s is None else self.duration_s + self.warmup_s


@dataclass
class RunOutcome:
    results: list[RequestResult]  # in index order, warm-up included (flagged)
    wall_s: float  # the whole run, warm-up included
    interrupted: bool  # stopped by Ctrl-C: the results are partial


async def run_load(
    requests: Iterator[RequestSpec],
    client: ClientConfig,
    limits: RunLimits,
    progress: Progress | None = None,
    http: httpx.AsyncClient | None = None,
) -> RunOutcome:
    """Sends `requests` (arrival offsets set: open loop; None: closed loop, `limits.concurrency`
    workers) and returns every result."""
    progress = progress or Progress(None, None, enabled=False)
    own_http = http is None
    http = http or make_http_client(limits.request_timeout_s)
    slots = asyncio.Semaphore(limits.concurrency) if limits.concurrency else None
    stop = asyncio.Event()
    results: list[RequestResult] = []
    in_flight: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    # Ctrl-C stops sending and abandons the requests in flight; what finished is still reported.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
    ticker = asyncio.create_task(_tick(progress, stop))
    t0 = time.perf_counter()

    async def one(spec: RequestSpec, warmup: bool) -> None:
        try:
            result = await send_request(http, client, spec, t0)
            result.warmup = warmup
            results.append(result)
            progress.finished(result.success, result.output_tokens)
        finally:
            if slots is not None:
                slots.release()

    measured_sent = 0
    try:
        for spec in requests:
            if limits.num_requests is not None and measured_sent >= limits.num_requests:
                break
            deadline = limits.deadline_s
            if spec.arrival is not None:
                if deadline is not None and spec.arrival >= deadline:
                    break
                if await _sleep_or_stop(t0 + spec.arrival - time.perf_counter(), stop):
                    break
            if slots is not None and await _acquire_or_stop(slots, stop):
                break
            if stop.is_set() or (deadline is not None and time.perf_counter() - t0 >= deadline):
                if slots is not None:
                    slots.release()
                break
            sent_at = spec.arrival if spec.arrival is not None and slots is None else time.perf_counter() - t0
            warmup = limits.is_warmup(spec.index, sent_at)
            measured_sent += not warmup
            progress.started()
            task = asyncio.create_task(one(spec, warmup))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        # Let the requests in flight finish (or abandon them on Ctrl-C).
        halt = asyncio.ensure_future(stop.wait())
        while in_flight and not stop.is_set():
            await asyncio.wait(set(in_flight) | {halt}, return_when=asyncio.FIRST_COMPLETED)
        halt.cancel()
        interrupted = stop.is_set()
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        await ticker
        progress.close()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
        if own_http:
            await http.aclose()
    results.sort(key=lambda r: r.index)
    return RunOutcome(results, wall, interrupted)


async def _sleep_or_stop(delay: float, stop: asyncio.Event) -> bool:
    """Waits `delay` seconds; True if told to stop meanwhile."""
    if delay <= 0:
        return stop.is_set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


async def _acquire_or_stop(slots: asyncio.Semaphore, stop: asyncio.Event) -> bool:
    """Takes a slot; True (holding none) if told to stop first."""
    acquire = asyncio.ensure_future(slots.acquire())
    halt = asyncio.ensure_future(stop.wait())
    await asyncio.wait({acquire, halt}, return_when=asyncio.FIRST_COMPLETED)
    halt.cancel()
    if acquire.done() and not acquire.cancelled():
        if stop.is_set():
            slots.release()
            return True
        return False
    acquire.cancel()
    return True


async def _tick(progress: Progress, stop: asyncio.Event) -> None:
    while not stop.is_set():
        progress.tick()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)
