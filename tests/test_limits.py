"""The operator's limits: each refused with its 4xx, the request field as `param`, and a message naming
the flag. Request-shape limits and the body size against `FakeEngine`; per-tenant store quotas against
the real engine and store; in-flight requests per tenant over a real socket, released when a stream
ends and when its client goes away."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api.app import build_app
from server.api.auth import KeyRing
from server.config import Settings
from tests.support.adapter_uploads import BIG, SMALL, multipart
from tests.support.fake_engine import FakeEngine
from tests.support.openai_http import assert_limit
from tests.support.openai_schema import assert_valid
from tests.support.servers import running_server, serving_engine
from tests.support.tenant_keys import KEY_FILE, bearer

USER_HI = {"role": "user", "content": "hi"}


# --------------------------------------------------------------------------------------------------
# One request's shape


@pytest.fixture
def limited() -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = FakeEngine()
    settings = Settings(max_n=2, max_stop_strings=1, max_tokens_limit=5, max_prompt_tokens=30, max_request_bytes=2000)
    with TestClient(build_app(engine, settings)) as client:
        yield client, engine


def completion(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1} | body)


def chat(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"messages": [USER_HI], "max_tokens": 1} | body)


@pytest.mark.parametrize(("send", "fields", "param", "flag"), [
    (completion, {"n": 3}, "n", "--max-n of 2"),
    (chat, {"n": 3}, "n", "--max-n of 2"),
    (completion, {"stop": ["x", "y"]}, "stop", "--max-stop-strings of 1"),
    (chat, {"stop": ["x", "y"]}, "stop", "--max-stop-strings of 1"),
    (completion, {"max_tokens": 6}, "max_tokens", "--max-tokens-limit of 5"),
    (chat, {"max_tokens": 6}, "max_tokens", "--max-tokens-limit of 5"),
    (chat, {"max_tokens": None, "max_completion_tokens": 6}, "max_completion_tokens", "--max-tokens-limit of 5"),
    (completion, {"prompt": "a" * 30}, "prompt", "--max-prompt-tokens of 30"),  # 31 tokens with BOS
    (completion, {"prompt": ["a" * 15, "b" * 15]}, "prompt", "--max-prompt-tokens of 30"),  # 16 + 16
    (completion, {"prompt": [97] * 31}, "prompt", "--max-prompt-tokens of 30"),
    (chat, {"messages": [{"role": "user", "content": "a" * 10}]}, "messages", "--max-prompt-tokens of 30"),
])
def test_request_limits(limited: tuple[TestClient, FakeEngine], send: Any, fields: dict, param: str,
                        flag: str) -> None:
    client, engine = limited
    assert_limit(send(client, **fields), 400, param, "limit_exceeded", flag)
    assert engine.requests == []  # refused before the engine saw anything


@pytest.mark.parametrize(("send", "fields"), [
    (completion, {"n": 2, "stop": "x", "max_tokens": 5, "prompt": "a" * 29}),
    (completion, {"prompt": ["a" * 14, "b" * 14]}),
    (chat, {"n": 2, "stop": ["x"], "max_completion_tokens": 5}),
])
def test_requests_at_the_limits_pass(limited: tuple[TestClient, FakeEngine], send: Any, fields: dict) -> None:
    client, _ = limited
    assert send(client, **fields).status_code == 200


def test_a_default_max_tokens_is_brought_within_the_limit(limited: tuple[TestClient, FakeEngine]) -> None:
    client, engine = limited
    assert completion(client, max_tokens=None).status_code == 200  # OpenAI's default is 16
    assert chat(client, max_tokens=None).status_code == 200  # the room left in the context
    assert [r.params.max_tokens for r in engine.requests] == [5, 5]


def test_body_size_limits_name_their_flag() -> None:
    settings = Settings(max_request_bytes=2000, max_adapter_bytes=1000)
    with TestClient(build_app(FakeEngine(), settings)) as client:
        response = client.post("/v1/completions", json={"prompt": "a" * 3000})
        assert_limit(response, 413, None, "request_too_large", "2000 bytes, set by --max-request-bytes")
        response = client.post("/v1/adapters", data={"id": "big"}, files={"archive": ("a.zip", b"\0" * 2**21)})
        assert_limit(response, 413, None, "request_too_large", "--max-adapter-bytes")


# --------------------------------------------------------------------------------------------------
# What a tenant may keep in the store


SMALL_BYTES, BIG_BYTES = sum(map(len, SMALL)), sum(map(len, BIG))
MAX_STORE_BYTES = 2 * BIG_BYTES + SMALL_BYTES - 1  # two big and one small adapter do not fit


@pytest.fixture(scope="module")
def store_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.json"
    key_file.write_text(json.dumps(KEY_FILE))
    settings = Settings(store=tmp_path_factory.mktemp("store"), api_keys=key_file, max_lora_rank=8,
                        max_adapters_per_tenant=3, max_store_bytes_per_tenant=MAX_STORE_BYTES)
    with serving_engine(settings) as (url, _):
        yield url


def upload(client: httpx.Client, adapter_id: str, files: tuple[bytes, bytes], tenant: str) -> httpx.Response:
    return client.post("/v1/adapters", data={"id": adapter_id}, files=multipart(*files), headers=bearer(tenant))


def replace(client: httpx.Client, adapter_id: str, files: tuple[bytes, bytes], tenant: str) -> httpx.Response:
    return client.put(f"/v1/adapters/{adapter_id}", files=multipart(*files), headers=bearer(tenant))


def assert_quota(response: httpx.Response, flag: str) -> None:
    error = assert_limit(response, 403, response.json()["error"]["param"], "quota_exceeded", flag)
    assert error["type"] == "insufficient_quota"


def test_adapters_per_tenant(store_server: str) -> None:
    with httpx.Client(base_url=store_server, timeout=60) as client:
        for i in range(3):
            assert upload(client, f"count-{i}", SMALL, "globex").status_code == 201
        assert_quota(upload(client, "count-3", SMALL, "globex"), "--max-adapters-per-tenant")
        assert upload(client, "count-other", SMALL, "ops").status_code == 201  # another tenant's own quota
        assert client.delete("/v1/adapters/count-0", headers=bearer("globex")).status_code == 200
        assert upload(client, "count-3", SMALL, "globex").status_code == 201
        assert replace(client, "count-3", SMALL, "globex").status_code == 200  # a replace adds no adapter


def test_store_bytes_per_tenant(store_server: str) -> None:
    with httpx.Client(base_url=store_server, timeout=60) as client:
        assert upload(client, "bytes-0", BIG, "acme").status_code == 201
        assert upload(client, "bytes-1", BIG, "acme").status_code == 201
        assert_quota(upload(client, "bytes-2", SMALL, "acme"), "--max-store-bytes-per-tenant")
        assert client.get("/v1/adapters/bytes-2", headers=bearer("acme")).status_code == 404  # nothing stored
        # A replace counts the new files instead of the old ones.
        assert replace(client, "bytes-1", SMALL, "acme").status_code == 200
        assert upload(client, "bytes-2", SMALL, "acme").status_code == 201
        assert_quota(replace(client, "bytes-2", BIG, "acme"), "--max-store-bytes-per-tenant")
        # The owner's quota, whoever uploads: an admin replacing acme's adapter is held to it too.
        assert_quota(replace(client, "bytes-1", BIG, "ops"), "--max-store-bytes-per-tenant")
        versions = [client.get(f"/v1/adapters/bytes-{i}", headers=bearer("acme")).json()["version"] for i in range(3)]
        assert versions == [1, 2, 1]  # the refused replaces changed nothing


def test_concurrent_uploads_cannot_share_the_last_place(store_server: str) -> None:
    async def race() -> list[int]:
        async with httpx.AsyncClient(base_url=store_server, timeout=60) as client:
            for i in range(2):
                response = await client.post("/v1/adapters", data={"id": f"race-{i}"}, files=multipart(*SMALL),
                                             headers=bearer("initech"))
                assert response.status_code == 201
            both = await asyncio.gather(*(
                client.post("/v1/adapters", data={"id": f"race-last-{i}"}, files=multipart(*SMALL),
                            headers=bearer("initech"))
                for i in range(2)
            ))
            return sorted(r.status_code for r in both)

    assert asyncio.run(race()) == [201, 403]


# --------------------------------------------------------------------------------------------------
# Requests in flight per tenant


@pytest.fixture
def one_at_a_time() -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine(delay=0.2)
    app = build_app(engine, Settings(max_concurrent_requests_per_tenant=1), KeyRing.parse(KEY_FILE, "test keys"))
    with running_server(app) as url:
        yield url, engine


SHORT = {"prompt": "hi", "max_tokens": 1}


def eventually_admitted(http: httpx.Client, url: str, headers: dict[str, str]) -> httpx.Response:
    """The server frees a request's place just after its last byte left: ask again until it has."""
    for _ in range(200):
        response = http.post(url + "/v1/completions", json=SHORT, headers=headers)
        if response.status_code != 429:
            return response
        time.sleep(0.05)
    return response


def test_a_stream_holds_its_place_until_it_ends(one_at_a_time: tuple[str, FakeEngine]) -> None:
    url, engine = one_at_a_time
    body = {"prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", url + "/v1/completions", json=body, headers=bearer("acme")) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")
            refused = http.post(url + "/v1/completions", json=SHORT, headers=bearer("acme"))
            error = assert_limit(refused, 429, None, "rate_limit_exceeded", "--max-concurrent-requests-per-tenant")
            assert error["type"] == "rate_limit_error" and refused.headers["Retry-After"] == "1"
            assert http.post(url + "/v1/completions", json=SHORT, headers=bearer("globex")).status_code == 200
            assert http.get(url + "/health").status_code == 200  # probes are nobody's requests
            assert "data: [DONE]" in list(lines)
        assert engine.streams[0].finished
        assert eventually_admitted(http, url, bearer("acme")).status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_place(one_at_a_time: tuple[str, FakeEngine], stream: bool) -> None:
    url, engine = one_at_a_time
    body = {"prompt": "hi", "max_tokens": 100, "stream": stream}
    with httpx.Client(timeout=10) as http:
        if stream:
            with http.stream("POST", url + "/v1/completions", json=body, headers=bearer("acme")) as response:
                assert next(response.iter_lines()).startswith("data: {")
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(url + "/v1/completions", json=body, headers=bearer("acme"), timeout=0.5)
        assert engine.streams[0].aborted.wait(10)
        assert eventually_admitted(http, url, bearer("acme")).status_code == 200
    assert not engine.streams[0].finished  # the place came back because the client left, not at the end


def test_anonymous_callers_are_one_tenant() -> None:
    engine = FakeEngine(delay=0.2)
    with running_server(build_app(engine, Settings(max_concurrent_requests_per_tenant=1))) as url, \
            httpx.Client(timeout=10) as http:
        body = {"prompt": "hi", "max_tokens": 3, "stream": True}
        with http.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": "Bearer one"}):
            refused = http.post(url + "/v1/completions", json=SHORT, headers={"Authorization": "Bearer two"})
            assert refused.status_code == 429
            assert_valid(refused.json(), "ErrorResponse")
