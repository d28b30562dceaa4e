"""The server's lifecycle: `/ready` and what makes it fail, in process; then SIGTERM to the real
`lorahive serve` process: it drains (new requests and /ready get 503, running ones go on), then exits 0;
past `--drain-timeout` the requests still running are cut with an error, and the exit is still 0."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import server.engine
from server.api import build_app
from server.config import Settings
from server.demo import DEMO_MODEL_NAME
from server.engine import Engine
from server.requests import GenerationRequest, SamplingParams
from server.runtime import build_engine
from tests.support.engines import ENGINE_SETTINGS, collect
from tests.support.openai_schema import assert_valid
from tests.support.servers import TIMEOUT_S, Server

RUNNING = re.compile(r"^lorahive_requests_running (\S+)$", re.M)


# ------------------------------------------------------------------------------------------------ /ready


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = build_engine(Settings(**(ENGINE_SETTINGS | {"store": tmp_path / "store"})))
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(build_app(engine), raise_server_exceptions=False) as test_client:
        yield test_client


def not_ready_reasons(client: TestClient) -> list[str]:
    response = client.get("/ready")
    if response.status_code == 200:
        assert response.json() == {"status": "ready"}
        return []
    assert response.status_code == 503 and response.json()["status"] == "not_ready"
    return response.json()["reasons"]


def test_ready_when_serving_and_health_regardless(client: TestClient, engine: Engine) -> None:
    assert not_ready_reasons(client) == []
    engine.shutdown()
    assert not_ready_reasons(client) == ["the engine thread is not running"]
    assert client.get("/health").json() == {"status": "ok"}  # alive, just not ready


def test_not_ready_while_the_store_cannot_be_read(client: TestClient, tmp_path: Path) -> None:
    (tmp_path / "store").rename(tmp_path / "elsewhere")
    [reason] = not_ready_reasons(client)
    assert "adapter store" in reason and "--store" in reason
    assert str(tmp_path) not in reason  # the probe needs no key: no server path in its answer
    (tmp_path / "elsewhere").rename(tmp_path / "store")
    assert not_ready_reasons(client) == []


def test_not_ready_while_a_step_hangs(
    client: TestClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.engine, "STALLED_STEP_S", 0.0)  # any step under way counts as hung
    assert not_ready_reasons(client) == []  # an idle engine waits for work: healthy, however long
    inside, release = threading.Event(), threading.Event()
    forward = engine.runner.model.forward

    def hanging_forward(*args: Any, **kwargs: Any) -> Any:
        inside.set()
        assert release.wait(60)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.runner.model, "forward", hanging_forward)
    request = GenerationRequest((1, 2, 3), SamplingParams(max_tokens=2, temperature=0.0))

    async def generate() -> None:
        await collect(engine.submit(request))

    generation = threading.Thread(target=asyncio.run, args=(generate(),))
    generation.start()
    assert inside.wait(60)
    [reason] = not_ready_reasons(client)
    assert "inside one step" in reason
    release.set()
    generation.join(60)
    deadline = time.monotonic() + 60  # ready again once the engine loop is back to waiting for work
    while not_ready_reasons(client):
        assert time.monotonic() < deadline, "still not ready after the step ended"
        time.sleep(0.01)


def test_draining_refuses_new_requests(client: TestClient) -> None:
    client.app.state.lifecycle.draining = True  # type: ignore[attr-defined]
    assert any("draining" in reason for reason in not_ready_reasons(client))
    response = client.post("/v1/completions", json={"model": DEMO_MODEL_NAME, "prompt": "hi"})
    assert response.status_code == 503 and response.headers["connection"] == "close"
    assert response.json()["error"]["code"] == "server_draining"
    assert client.get("/health").status_code == 200
    assert 'lorahive_requests_rejected_total{reason="draining"} 1.0' in client.get("/metrics").text


# ---------------------------------------------------------------------------------- SIGTERM, for real


def completion(max_tokens: int, stream: bool) -> dict:
    body = {"model": DEMO_MODEL_NAME, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True}
    return body | ({"stream": True, "stream_options": {"include_usage": True}} if stream else {})


def data_events(lines: Iterator[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def sigterm_and_wait_for_drain(server: Server) -> None:
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + TIMEOUT_S
    while (ready := httpx.get(f"{server.url}/ready", timeout=TIMEOUT_S)).status_code == 200:
        assert time.monotonic() < deadline, "/ready never went 503 after SIGTERM"
        time.sleep(0.02)
    assert ready.status_code == 503
    assert any("draining" in reason for reason in ready.json()["reasons"])


def assert_draining_refusal(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert_valid(response.json(), "ErrorResponse")
    assert response.json()["error"]["code"] == "server_draining"


def test_sigterm_lets_running_requests_finish_refuses_new_ones_and_exits_0(start_server) -> None:
    server = start_server(drain_timeout=TIMEOUT_S)
    with httpx.Client(timeout=TIMEOUT_S) as http, \
            http.stream("POST", f"{server.url}/v1/completions", json=completion(1000, stream=True)) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = data_events(next(lines) for _ in range(6))
        sigterm_and_wait_for_drain(server)
        # Draining: new work is refused, the probes and metrics still answer, the stream is still running.
        assert_draining_refusal(http.post(f"{server.url}/v1/completions", json=completion(4, stream=False)))
        assert_draining_refusal(http.get(f"{server.url}/v1/models"))
        assert http.get(f"{server.url}/health").status_code == 200
        metrics = http.get(f"{server.url}/metrics").text
        assert RUNNING.search(metrics).group(1) == "1.0"  # type: ignore[union-attr]
        assert 'lorahive_requests_rejected_total{reason="draining"} 2.0' in metrics
        rest = data_events(lines)
    events = first + rest
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all("error" not in chunk for chunk in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 1000
    assert server.process.wait(TIMEOUT_S) == 0
    assert "drained: no request left" in server.log.read_text()


def test_drain_timeout_cuts_running_requests_and_still_exits_0(start_server) -> None:
    server = start_server(drain_timeout=0.5)
    unary: dict[str, httpx.Response] = {}

    def unary_client() -> None:
        unary["response"] = httpx.post(f"{server.url}/v1/completions", json=completion(1500, stream=False),
                                       timeout=TIMEOUT_S)

    with httpx.Client(timeout=TIMEOUT_S) as http, \
            http.stream("POST", f"{server.url}/v1/completions", json=completion(1500, stream=True)) as response:
        lines = response.iter_lines()
        first = data_events(next(lines) for _ in range(6))
        other = threading.Thread(target=unary_client)
        other.start()
        deadline = time.monotonic() + TIMEOUT_S
        while RUNNING.search(http.get(f"{server.url}/metrics").text).group(1) != "2.0":  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the second request never ran"
            time.sleep(0.02)
        sigterm_and_wait_for_drain(server)
        rest = data_events(lines)
    other.join(TIMEOUT_S)
    events = first + rest
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert_valid(error, "ErrorResponse")
    assert error["error"]["code"] == "server_draining"
    assert len(events) < 1500  # cut long before its end
    assert_draining_refusal(unary["response"])  # the non-streamed request is cut with the same error
    assert server.process.wait(TIMEOUT_S) == 0
    assert "drain timeout: cutting 2 request(s)" in server.log.read_text()
