"""Requests to the OpenAI-compatible routes of an app serving `FakeEngine`, and checks of what comes back: error
bodies (a refused limit names its flag), event streams and their chunks, the SamplingParams the engine got."""

from __future__ import annotations

import json
from typing import Any

import httpx
from fastapi.testclient import TestClient

from server.requests import SamplingParams
from tests.support.fake_engine import FakeEngine
from tests.support.openai_schema import assert_valid

BASE = "fake-base"  # FakeEngine's model_name
USER_HI = {"role": "user", "content": "hi"}


def completion(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/v1/completions", json={"model": BASE, "prompt": "hi", **body})


def chat(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": BASE, "messages": [USER_HI], **body})


def assert_error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert "detail" not in body
    assert_valid(body, "ErrorResponse")
    error = body["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert error["message"]
    return error


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an event stream, checking the framing on the way."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text
    assert text.endswith("data: [DONE]\n\n")
    events = [block for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    return [block[len("data: ") :] for block in events]


def stream_chunks(response: httpx.Response, schema: str) -> list[dict]:
    payloads = sse_events(response)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        assert_valid(chunk, schema)
    return chunks


def only_params(engine: FakeEngine) -> SamplingParams:
    assert len(engine.requests) == 1
    return engine.requests[0].params


def assert_limit(response: httpx.Response, status: int, param: str | None, code: str, flag: str) -> dict:
    error = assert_error(response, status, param, code)
    assert flag in error["message"], error
    return error
