"""A client that disconnects, streaming or not, through a real uvicorn server on the real engine: its
sequence is gone within one engine step, its KV blocks and adapter pin are given back, and /metrics
counts the abort."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from server.config import Settings
from server.demo import DEMO_MODEL_NAME
from server.engine import Engine
from tests.support.engines import ENGINE_SETTINGS, TIMEOUT_S, assert_idle, make_adapter
from tests.support.servers import serving_engine

ADAPTER = "cancel-me"
# Far more tokens than the test waits for: left alone, the request would run for thousands of steps.
BODY = {"model": DEMO_MODEL_NAME, "adapter_id": ADAPTER, "prompt": "Tell me everything.", "max_tokens": 1500,
        "ignore_eos": True}
ABORTS = re.compile(r'^lorahive_requests_finished_total\{finish_reason="abort"\} (\S+)$', re.M)


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[str, Engine]]:
    with serving_engine(Settings(**ENGINE_SETTINGS)) as (url, engine):
        engine.registry.add(make_adapter(ADAPTER, engine.args, 8, 16.0, ("q_proj", "v_proj"), seed=7))
        yield url, engine


@pytest.fixture
def abort_steps(live: tuple[str, Engine], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`engine.steps` right after each call of `Engine.abort` (made on the server's event loop when the client
    goes). Read after posting: any step the engine starts later drains the abort first."""
    _, engine = live
    steps: list[int] = []
    abort = engine.abort

    def recording_abort(request_id: str) -> None:
        abort(request_id)
        steps.append(engine.steps)

    monkeypatch.setattr(engine, "abort", recording_abort)
    return steps


def aborts_counted(url: str) -> float:
    match = ABORTS.search(httpx.get(f"{url}/metrics").text)
    assert match is not None
    return float(match.group(1))


def pins(engine: Engine) -> int:
    return sum(engine.pool.pinned(slot) for slot in range(engine.pool.num_slots))


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def assert_aborted_within_one_step(engine: Engine, abort_steps: list[int]) -> None:
    """Once the abort is posted, at most the step already under way completes: then the engine drains its
    inbox, drops the sequence, and (nothing else running) stops stepping."""
    wait_for(lambda: len(abort_steps) == 1, "the server to abort the engine request")
    wait_for(lambda: not engine.scheduler.has_work(), "the engine to drop the sequence")
    assert engine.steps - abort_steps[0] <= 1
    assert_idle(engine)  # every KV block free, no adapter slot pinned


def test_streaming_client_disconnect(live: tuple[str, Engine], abort_steps: list[int]) -> None:
    url, engine = live
    aborts_before = aborts_counted(url)
    with httpx.Client(timeout=TIMEOUT_S) as http, \
            http.stream("POST", f"{url}/v1/completions", json=BODY | {"stream": True}) as response:
        assert response.status_code == 200
        events = response.iter_lines()
        received = [line for line in (next(events) for _ in range(10)) if line.startswith("data: {")]
        assert all(json.loads(line[6:])["choices"][0]["finish_reason"] is None for line in received)
        # Mid-generation: the sequence holds KV blocks and pins its adapter's slot.
        assert engine.allocator.num_used > 0 and pins(engine) == 1
    # Leaving the block closed the connection after a few chunks.
    assert_aborted_within_one_step(engine, abort_steps)
    assert aborts_counted(url) == aborts_before + 1


def test_non_streaming_client_disconnect(live: tuple[str, Engine], abort_steps: list[int]) -> None:
    url, engine = live
    aborts_before = aborts_counted(url)
    parts = urlsplit(url)
    payload = json.dumps(BODY).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT_S) as client:
        client.sendall(head + payload)
        steps_at_send = engine.steps
        # The answer comes only at the end; wait until the request is generating, then hang up.
        wait_for(lambda: engine.steps >= steps_at_send + 5 and engine.scheduler.running, "generation to start")
        assert engine.allocator.num_used > 0 and pins(engine) == 1
    assert_aborted_within_one_step(engine, abort_steps)
    assert aborts_counted(url) == aborts_before + 1


def test_disconnect_leaves_other_requests_running(live: tuple[str, Engine], abort_steps: list[int]) -> None:
    """The abort takes out the leaving client's sequence only: a concurrent request completes in full."""
    url, engine = live
    answer: dict[str, object] = {}

    def other_client() -> None:
        body = {"model": DEMO_MODEL_NAME, "prompt": "Stay.", "max_tokens": 200, "ignore_eos": True}
        answer.update(httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT_S).json())

    with httpx.Client(timeout=TIMEOUT_S) as http, \
            http.stream("POST", f"{url}/v1/completions", json=BODY | {"stream": True}) as response:
        events = response.iter_lines()
        next(events)
        other = threading.Thread(target=other_client)
        other.start()
        wait_for(lambda: len(engine.scheduler.running) == 2 or not other.is_alive(), "both requests to run")
    other.join(TIMEOUT_S)
    wait_for(lambda: len(abort_steps) == 1, "the server to abort the engine request")
    assert answer["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert answer["usage"]["completion_tokens"] == 200  # type: ignore[index]
    wait_for(lambda: not engine.scheduler.has_work(), "the engine to finish")
    assert_idle(engine)
