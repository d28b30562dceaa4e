"""Who runs torch with how many intra-op threads: the engine thread with `--engine-threads`, every other thread
with one.

Why: torch's CPU ops parallelise with OpenMP, and libgomp keeps one team of worker threads for every thread
that ever ran a parallel region, for as long as that thread lives. Once two threads own teams there are more
OpenMP threads than cores; libgomp then stops spinning between parallel regions, and every small op of the
engine pays a futex wake (a decode step's LoRA ops 2-3x slower, benchmarks/engine_thread.py). So only the
engine thread may own a team. The main thread is limited to one thread before it runs any op (doing it later
is too late: its team stays); threads that may run torch work beside the engine (the adapter loader, the
tokenizers, the routes' executors) get one thread from `single_threaded_executor`; heavy start-up work (model
loading, the memory profile) runs with the engine's count on a thread that exits, which releases its team.

`torch.set_num_threads` sets the calling thread's own count, and also the count a thread that has not yet run
torch starts with. The engine's `set_num_threads(N)` would hand N to every thread created afterwards (anyio's
workers, uvicorn's), so the thread that started the engine sets one again once the engine has set its count.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


@functools.cache
def default_threads() -> int:
    """torch's own intra-op count for this process (the machine's cores, or OMP_NUM_THREADS), read before any
    thread of this process is limited to one."""
    return torch.get_num_threads()


def limit_current_thread() -> None:
    """Run torch with one intra-op thread here, and make that the count of threads that start torch later.
    Idempotent; on the main thread, call it before the first torch op."""
    default_threads()
    torch.set_num_threads(1)


def single_threaded_executor(max_workers: int, thread_name_prefix: str, background: bool = False) -> ThreadPoolExecutor:
    """A thread pool whose threads run torch with one intra-op thread, whenever they are created. `background`
    threads also run at a lower scheduling priority (Linux), so that where cores are short the engine thread
    runs first and their work takes the time left over."""
    initializer = _background_thread if background else limit_current_thread
    return ThreadPoolExecutor(max_workers, thread_name_prefix=thread_name_prefix, initializer=initializer)


def _background_thread() -> None:
    limit_current_thread()
    if sys.platform == "linux":  # there `who` may name a thread; elsewhere it would name a process
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def engine_threads(setting: int | None) -> int:
    """The engine thread's intra-op count: `--engine-threads`, or torch's default."""
    return default_threads() if setting is None else setting


class TorchThread(threading.Thread):
    """A daemon thread that runs `work` with `num_threads` intra-op threads. `start` returns once the thread has
    set its count (`num_threads` then holds what torch reports there), leaving the caller, and every thread
    started later, at one."""

    def __init__(self, work: Callable[[], None], name: str, num_threads: int):
        if num_threads < 1:
            raise ValueError(f"a torch thread needs at least 1 intra-op thread, got {num_threads}")
        super().__init__(name=name, daemon=True)
        self._work = work
        self._requested = num_threads
        self._ready = threading.Event()
        self.num_threads: int | None = None  # as torch reports it on the thread, once started

    def run(self) -> None:
        torch.set_num_threads(self._requested)
        self.num_threads = torch.get_num_threads()
        self._ready.set()
        self._work()

    def start(self) -> None:
        super().start()
        self._ready.wait()
        limit_current_thread()  # set_num_threads in `run` also became the count of threads started from now on


def run_on_exiting_thread(work: Callable[[], T], name: str, num_threads: int) -> T:
    """`work()` on a thread of its own with `num_threads` intra-op threads; its result, or its exception.

    The thread exits when `work` returns, and its OpenMP team with it, so heavy one-off work (loading a model)
    gets the cores without leaving a second team beside the engine's."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the caller, which raises it as its own
            failure.append(exc)

    thread = TorchThread(run, name, num_threads)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
