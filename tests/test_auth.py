"""API keys, tenants and who sees which adapter.

The auth matrix reads its expected status codes from the README's table, so the documentation and the
server cannot drift apart: every cell is one request to a live server (the real engine on the demo
model, a real adapter store) by one kind of caller, for an adapter tenant A uploaded just before.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from adapters_store.peft_export import to_peft_files
from server import cli
from server.api import auth
from server.api.app import build_app
from server.api.auth import KeyFileError, KeyRing, Principal, load_api_keys
from server.config import Settings
from server.demo import DEMO_MODEL_NAME, build_demo_model
from server.engine import Engine
from tests.support.adapter_uploads import peft_multipart
from tests.support.api_keys import (
    KEY_A,
    KEY_ADMIN,
    KEY_B,
    KEY_FILE,
    KEYS_BY_CALLER,
    TENANT_A,
    TENANT_B,
    bearer,
    sha256_hex,
)
from tests.support.engines import make_adapter
from tests.support.fake_engine import FakeEngine
from tests.support.openai_schema import assert_valid
from tests.support.prometheus_text import value
from tests.support.servers import serving_engine

README = Path(__file__).resolve().parents[1] / "README.md"


# --------------------------------------------------------------------------------------------------
# The README's table


def readme_auth_table() -> tuple[list[str], dict[tuple[str, str], dict[str, int]]]:
    """(caller columns, {(method, path): {caller: status}}) from the table under "Authentication"."""
    section = README.read_text().split("## Authentication, tenants and limits", 1)[1]
    lines = iter(section.splitlines())
    header = next(line for line in lines if line.startswith("| route | no key |"))
    callers = [cell.strip() for cell in header.strip("|").split("|")[1:]]
    next(lines)  # the | --- | row
    table = {}
    for line in lines:
        if not line.startswith("|"):
            break
        route, *codes = (cell.strip() for cell in line.strip("|").split("|"))
        method, path = route.strip("`").split(" ", 1)
        table[(method, path)] = dict(zip(callers, map(int, codes), strict=True))
    return callers, table


CALLERS, AUTH_TABLE = readme_auth_table()


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        included = getattr(route, "original_router", None)  # recent FastAPI keeps an included router whole
        if included is not None:
            yield from api_routes(included.routes)
        elif isinstance(route, APIRoute):
            yield route


def served_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path) of the app's API routes, path parameters written `{id}` as in the README."""
    routes = set()
    for route in api_routes(app.routes):
        path = re.sub(r"\{[^}]+\}", "{id}", route.path)
        routes |= {(method, path) for method in route.methods - {"HEAD"}}
    return routes


def test_readme_table_has_every_route_and_caller() -> None:
    assert list(KEYS_BY_CALLER) == CALLERS
    assert served_routes(build_app(FakeEngine())) == set(AUTH_TABLE)


# --------------------------------------------------------------------------------------------------
# The matrix, against a live server


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(KEY_FILE))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, key_file: Path) -> Iterator[tuple[str, Engine]]:
    settings = Settings(store=tmp_path_factory.mktemp("store"), api_keys=key_file, max_gpu_adapters=2,
                        max_lora_rank=8)
    with serving_engine(settings) as served:
        yield served


def client_for(url: str, caller: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers=bearer(KEYS_BY_CALLER[caller]), timeout=60)


def upload(url: str, engine: Engine, caller: str, adapter_id: str) -> dict:
    with client_for(url, caller) as client:
        response = client.post("/v1/adapters", data={"id": adapter_id}, files=peft_multipart(engine, seed=1))
    assert response.status_code == 201, response.text
    return response.json()


def send(client: httpx.Client, engine: Engine, method: str, path: str, adapter_id: str) -> httpx.Response:
    """One request to the route `method path`, about the adapter `adapter_id`."""
    url = path.replace("{id}", adapter_id)
    generation = {"model": DEMO_MODEL_NAME, "adapter_id": adapter_id, "max_tokens": 2}
    if (method, path) == ("POST", "/v1/completions"):
        return client.post(url, json=generation | {"prompt": "hi"})
    if (method, path) == ("POST", "/v1/chat/completions"):
        return client.post(url, json=generation | {"messages": [{"role": "user", "content": "hi"}]})
    if (method, path) == ("POST", "/v1/adapters"):
        return client.post(url, data={"id": f"new-{uuid.uuid4().hex[:12]}"}, files=peft_multipart(engine, seed=2))
    if method == "PUT":
        return client.put(url, files=peft_multipart(engine, seed=3))
    if method == "PATCH":
        return client.patch(url, json={"public": True})
    return client.request(method, url)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("route", sorted(AUTH_TABLE), ids=" ".join)
def test_auth_matrix(server: tuple[str, Engine], route: tuple[str, str], caller: str) -> None:
    url, engine = server
    adapter_id = f"owned-{uuid.uuid4().hex[:12]}"
    upload(url, engine, "tenant A (owner)", adapter_id)
    method, path = route
    with client_for(url, caller) as client:
        response = send(client, engine, method, path, adapter_id)
        expected = AUTH_TABLE[route][caller]
        assert response.status_code == expected, response.text
        if expected >= 400:
            assert_valid(response.json(), "ErrorResponse")
        if expected == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer"
            code = "missing_api_key" if KEYS_BY_CALLER[caller] is None else "invalid_api_key"
            assert response.json()["error"]["code"] == code
        if expected == 404:  # word for word what a missing adapter gets: its existence is not revealed
            missing = send(client, engine, method, path, "no-such-adapter")
            assert missing.status_code == 404
            assert response.json() == json.loads(missing.text.replace("no-such-adapter", adapter_id))


def test_lists_show_what_the_caller_may_see(server: tuple[str, Engine]) -> None:
    url, engine = server
    ours, theirs = f"mine-{uuid.uuid4().hex[:8]}", f"theirs-{uuid.uuid4().hex[:8]}"
    assert upload(url, engine, "tenant A (owner)", ours)["owner"] == TENANT_A
    assert upload(url, engine, "tenant B", theirs)["owner"] == TENANT_B

    def listed(caller: str) -> tuple[set[str], set[str]]:
        with client_for(url, caller) as client:
            models = {m["id"] for m in client.get("/v1/models").json()["data"]}
            adapters = {a["id"] for a in client.get("/v1/adapters", params={"limit": 1000}).json()["data"]}
        return models, adapters

    models, adapters = listed("tenant A (owner)")
    assert ours in models and ours in adapters and theirs not in models | adapters
    assert DEMO_MODEL_NAME in models
    models, adapters = listed("admin")
    assert {ours, theirs} <= models & adapters


def test_public_adapters(server: tuple[str, Engine]) -> None:
    url, engine = server
    adapter_id = f"shared-{uuid.uuid4().hex[:8]}"
    assert upload(url, engine, "tenant A (owner)", adapter_id)["public"] is False
    with client_for(url, "admin") as admin, client_for(url, "tenant B") as other, \
            client_for(url, "tenant A (owner)") as owner:
        marked = admin.patch(f"/v1/adapters/{adapter_id}", json={"public": True})
        assert marked.status_code == 200 and marked.json()["public"] is True and marked.json()["owner"] == TENANT_A
        for route in (("GET", "/v1/models/{id}"), ("POST", "/v1/completions"), ("GET", "/v1/adapters/{id}")):
            assert send(other, engine, *route, adapter_id).status_code == 200, route
        assert adapter_id in {m["id"] for m in other.get("/v1/models").json()["data"]}
        for route in (("PUT", "/v1/adapters/{id}"), ("PATCH", "/v1/adapters/{id}"), ("DELETE", "/v1/adapters/{id}")):
            refused = send(other, engine, *route, adapter_id)
            assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error", route
        assert owner.patch(f"/v1/adapters/{adapter_id}", json={"public": False}).status_code == 403  # admins only
        assert owner.get(f"/v1/adapters/{adapter_id}").json()["version"] == 1  # B's PUT changed nothing

        assert admin.patch(f"/v1/adapters/{adapter_id}", json={"public": False}).json()["public"] is False
        assert other.get(f"/v1/adapters/{adapter_id}").status_code == 404
        assert admin.patch(f"/v1/adapters/{adapter_id}", json={"public": "yes"}).status_code == 400
    # The flag is in the manifest: it outlives the registry's cache.
    assert engine.registry.store.manifest(adapter_id).public is False


def test_pagination_counts_only_visible_adapters(server: tuple[str, Engine]) -> None:
    url, engine = server
    prefix = f"pg{uuid.uuid4().hex[:6]}"
    owners = ["tenant A (owner)", "tenant B"] * 4
    for i, caller in enumerate(owners):  # A and B's adapters interleave in id order
        upload(url, engine, caller, f"{prefix}-{i}")
    mine = [f"{prefix}-{i}" for i, caller in enumerate(owners) if caller == "tenant A (owner)"]

    def pages(caller: str) -> list[list[str]]:
        found, after = [], f"{prefix}-"  # ids sort after the prefix itself
        with client_for(url, caller) as client:
            while True:
                page = client.get("/v1/adapters", params={"limit": 2, "after": after}).json()
                ids = [a["id"] for a in page["data"] if a["id"].startswith(prefix)]
                if ids:
                    found.append(ids)
                if not page["has_more"]:
                    return found
                assert page["last_id"] == page["data"][-1]["id"]
                after = page["last_id"]

    assert pages("tenant A (owner)") == [mine[:2], mine[2:]]  # full pages of A's own: B's are skipped
    assert sum(pages("admin"), []) == sorted(f"{prefix}-{i}" for i in range(len(owners)))


def test_startup_adapters_are_public(tmp_path: Path, key_file: Path) -> None:
    args = build_demo_model()[0].args
    config, weights = to_peft_files(make_adapter("x", args, 2, 4.0, ("q_proj",), seed=5))
    directory = tmp_path / "adapters" / "house"
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_bytes(config)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    settings = Settings(store=tmp_path / "store", adapters=tmp_path / "adapters", api_keys=key_file, max_lora_rank=8)
    with serving_engine(settings) as (url, _), client_for(url, "tenant B") as client:
        info = client.get("/v1/adapters/house").json()
        assert info["public"] is True and info["owner"] is None
        assert client.delete("/v1/adapters/house").status_code == 403


# --------------------------------------------------------------------------------------------------
# The HTTP layer alone (FakeEngine): the tenant reaches the engine, Bearer parsing, /metrics


@pytest.fixture
def fake_client() -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = FakeEngine()
    with TestClient(build_app(engine, keys=KeyRing.parse(KEY_FILE, "test keys"))) as client:
        yield client, engine


def test_the_tenant_reaches_the_engine(fake_client: tuple[TestClient, FakeEngine]) -> None:
    client, engine = fake_client
    for key in (KEY_A, KEY_ADMIN):
        response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=bearer(key))
        assert response.status_code == 200, response.text
    assert [r.tenant for r in engine.requests] == [TENANT_A, "ops"]


def test_an_open_server_sends_no_tenant() -> None:
    engine = FakeEngine()
    with TestClient(build_app(engine)) as client:
        assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                           headers=bearer("anything")).status_code == 200
    assert engine.requests[0].tenant is None


@pytest.mark.parametrize(("authorization", "status", "code"), [
    (f"bearer {KEY_A}", 200, None),  # the scheme is case-insensitive
    (f"Bearer   {KEY_A}  ", 200, None),
    (f"Basic {KEY_A}", 401, "missing_api_key"),
    ("Bearer", 401, "missing_api_key"),
    (f"Bearer {KEY_A}x", 401, "invalid_api_key"),
    (f"Bearer {sha256_hex(KEY_B)}", 401, "invalid_api_key"),  # the digest is not the key
])
def test_bearer_header(fake_client: tuple[TestClient, FakeEngine], authorization: str, status: int,
                       code: str | None) -> None:
    client, _ = fake_client
    response = client.get("/v1/models", headers={"Authorization": authorization})
    assert response.status_code == status
    if code is not None:
        assert response.json()["error"] == {"message": response.json()["error"]["message"],
                                            "type": "invalid_request_error", "param": None, "code": code}


def test_unknown_paths_need_a_key_too(fake_client: tuple[TestClient, FakeEngine]) -> None:
    client, _ = fake_client
    assert client.get("/v1/nothing-here").status_code == 401  # routes are not revealed to strangers
    assert client.get("/v1/nothing-here", headers=bearer(KEY_A)).status_code == 404
    assert client.get("/openapi.json").status_code == 401


def test_refusals_count_under_the_route_they_were_meant_for(fake_client: tuple[TestClient, FakeEngine]) -> None:
    """A 401 is answered before routing; the HTTP metrics still name the route, and only the unknown path is
    `unmatched`."""
    client, _ = fake_client

    def count(endpoint: str, method: str) -> float:
        return value(client.get("/metrics", headers=bearer(KEY_ADMIN)).text, "lorahive_http_requests_total",
                     endpoint=endpoint, method=method, status_code="401")

    before = {(e, m): count(e, m) for e, m in [("/v1/adapters/{adapter_id}", "DELETE"), ("unmatched", "GET")]}
    assert client.delete("/v1/adapters/someone-elses").status_code == 401
    assert client.get("/v1/nothing-here").status_code == 401
    assert {k: count(*k) - v for k, v in before.items()} == {("/v1/adapters/{adapter_id}", "DELETE"): 1,
                                                              ("unmatched", "GET"): 1}


# --------------------------------------------------------------------------------------------------
# The key file


def test_clear_and_digest_keys_resolve() -> None:
    keys = KeyRing.parse(KEY_FILE, "test keys")
    assert keys.resolve(KEY_A.encode()) == Principal(TENANT_A, "tenant")
    assert keys.resolve(KEY_B.encode()) == Principal(TENANT_B, "tenant")
    assert keys.resolve(KEY_ADMIN.encode()) == Principal("ops", "admin")
    assert keys.resolve(b"nope") is None and keys.resolve(b"") is None
    assert not keys.is_open and KeyRing().is_open


def test_every_entry_is_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the first entry's key costs as many comparisons as no key at all."""
    keys = KeyRing.parse(KEY_FILE, "test keys")
    compared: list[int] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(len(b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented in (KEY_A, KEY_ADMIN, "unknown"):
        compared.clear()
        keys.resolve(presented.encode())
        assert compared == [32] * len(KEY_FILE["keys"])  # one digest comparison per entry


def entry(**fields: Any) -> dict[str, Any]:
    return {"key": "k-0123456789", "tenant": "acme", "role": "tenant"} | fields


@pytest.mark.parametrize(("data", "message"), [
    ([], "expected a JSON object"),
    ({"keys": []}, "non-empty list"),
    ({"keys": [entry()], "extra": 1}, "expected a JSON object"),
    ({"keys": ["k"]}, "entry 1 of 'keys': must be a JSON object"),
    ({"keys": [entry(role="root")]}, "'role' must be one of 'tenant', 'admin'"),
    ({"keys": [{"key": "k-0123456789", "role": "tenant"}]}, "'tenant' is required"),
    ({"keys": [entry(tenant="")]}, "'tenant' is required"),
    ({"keys": [entry(tenant="a b")]}, "'tenant' is required"),
    ({"keys": [entry(sha256=sha256_hex("x"))]}, "exactly one of 'key'"),
    ({"keys": [{"tenant": "acme", "role": "tenant"}]}, "exactly one of 'key'"),
    ({"keys": [entry(key=None, sha256="abc123")]}, "'sha256' must be 64 hexadecimal"),
    ({"keys": [entry(key=None, sha256="g" * 64)]}, "'sha256' must be 64 hexadecimal"),
    ({"keys": [entry(key="has space")]}, "visible ASCII"),
    ({"keys": [entry(key="")]}, "visible ASCII"),
    ({"keys": [entry(), entry(tenant="other")]}, "entries 1 and 2 of 'keys' hold the same key"),
    ({"keys": [entry(), entry(key=None, sha256=sha256_hex("k-0123456789"), role="admin")]}, "entries 1 and 2"),
    ({"keys": [entry(tenat="acme")]}, "unknown field(s) 'tenat'"),
])
def test_bad_key_files_are_refused(tmp_path: Path, data: Any, message: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(data))
    with pytest.raises(KeyFileError) as raised:
        load_api_keys(path)
    assert message in str(raised.value)
    assert "k-0123456789" not in str(raised.value)  # never quote a key


def test_unreadable_key_files(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    with pytest.raises(KeyFileError, match="cannot read"):
        load_api_keys(path)
    path.write_text('{"keys": [{"key": "secret-value", "tenant": "a", "role": "tenant"},]}')
    with pytest.raises(KeyFileError, match="not valid JSON") as raised:
        load_api_keys(path)
    assert "secret-value" not in str(raised.value)


def test_serve_stops_on_a_bad_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [entry(role="root")]}))
    monkeypatch.setattr("server.runtime.build_engine", lambda settings: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--api-keys", str(path)])
    assert exited.value.code == 2
    assert "entry 1 of 'keys'" in capsys.readouterr().err


class _StopBeforeTheModel(Exception):
    pass


def _no_model(settings: Settings) -> Engine:
    raise _StopBeforeTheModel


@pytest.mark.parametrize("with_keys", [False, True])
def test_start_up_log_says_who_may_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture, with_keys: bool) -> None:
    """`serve` reads the keys and says who may call before it loads the model (stopped there)."""
    monkeypatch.setattr("server.runtime.build_engine", _no_model)
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEY_FILE))
    with caplog.at_level(logging.INFO, logger="lorahive.auth"), pytest.raises(_StopBeforeTheModel):
        cli.serve(Settings(api_keys=path if with_keys else None, port=0))  # port 0: whatever is free
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if with_keys:
        assert warnings == [] and "3 key(s) for 3 tenant(s), 1 of them admin" in caplog.text
        assert all(key not in caplog.text for key in (KEY_A, KEY_B, KEY_ADMIN, sha256_hex(KEY_B)))
    else:
        assert len(warnings) == 1 and "runs OPEN" in warnings[0]
