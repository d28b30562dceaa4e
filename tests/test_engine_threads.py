"""Only the engine thread runs torch with several intra-op threads (`--engine-threads`); the main thread and every
thread lorahive starts beside it run with one, so no second OpenMP team slows the engine (server/torch_threads.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from server.api.app import build_app
from server.config import Settings
from server.engine import Engine
from tests.support.cli_runs import serve_error
from tests.support.engines import ENGINE_SETTINGS, generate_async, generate_one, greedy, prompt, start_engine

# Not the machine's count, so the engine thread shows the setting rather than torch's default.
ENGINE_THREADS = 3


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = start_engine({}, engine_threads=ENGINE_THREADS)
    try:
        yield engine
    finally:
        engine.shutdown()


def threads_on(executor) -> int:
    return executor.submit(torch.get_num_threads).result()


def test_the_engine_thread_alone_runs_torch_with_several_threads(engine: Engine) -> None:
    assert engine.torch_threads == ENGINE_THREADS
    assert torch.get_num_threads() == 1  # the thread that built and started the engine
    assert "lorahive-build" not in {t.name for t in threading.enumerate()}  # the builder exited, its team with it
    assert generate_one(engine, greedy((1, 2, 3), 4)).finish_reason == "length"
    pool = build_app(engine, Settings(**ENGINE_SETTINGS)).state.tokenization_pool
    # Threads lorahive starts beside the engine, started after it (their first torch op sets their count).
    assert threads_on(engine.registry._loader) == 1
    assert threads_on(pool._short) == 1
    assert threads_on(pool._long) == 1
    # Threads of others (anyio's workers, uvicorn's) started after the engine start at one too.
    other: list[int] = []
    thread = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert other == [1]


def test_routes_blocking_work_runs_with_one_thread(engine: Engine) -> None:
    """asyncio.to_thread, where routes unpack and store uploads, uses the app's own executor."""
    with TestClient(build_app(engine, Settings(**ENGINE_SETTINGS))) as client:
        assert client.portal.call(asyncio.to_thread, torch.get_num_threads) == 1
        assert client.portal.call(asyncio.to_thread, lambda: threading.current_thread().name).startswith(
            "lorahive-route")


def test_tokens_reach_the_event_loop_in_one_call_per_step(engine: Engine) -> None:
    """The engine thread wakes the event loop (and contends for the GIL with it) once per step, not per token."""
    async def run() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        from_engine: list[object] = []
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            if threading.current_thread().name == "lorahive-engine":
                from_engine.append(args[0])
            return call_soon_threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counted
        steps = engine.steps
        choices = await generate_async(engine, [greedy(prompt(i, 5), 6, ignore_eos=True) for i in range(8)])
        assert [c.finish_reason for (c,) in choices] == ["length"] * 8
        return len(from_engine), engine.steps - steps

    calls, steps = asyncio.run(run())
    assert calls <= steps  # 48 tokens in 6 steps: 48 calls when each token woke the loop


@pytest.mark.parametrize("value", ["0", "-2"])
def test_engine_threads_must_be_positive(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_error(["--engine-threads", value], capsys) == (
        f"error: --engine-threads {value}: input should be greater than 0")
