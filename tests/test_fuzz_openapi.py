"""Schemathesis against the live server's own `/openapi.json`: every operation, as an admin, as a tenant and
without a key, with all of schemathesis' checks: no 5xx, only documented status codes, content types and headers,
bodies (JSON and each server-sent event) that match their schemas, schema-invalid input refused, declared auth
enforced, `Allow` listing the path's methods on a 405.

The server is the real one (uvicorn, the demo model's engine, an adapter store, a key file) with two adapters
uploaded first; half the generated path ids are theirs, so that cases reach past the 404. Schemathesis runs as its
command line would (`st run` with a config file, deterministic), bounded: the schema's own examples (streamed
requests among them), a dozen fuzzed cases per operation, the coverage phase once, and a server that caps
`max_tokens`; all runs together take about 40 s on two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.api.app import build_app
from server.api.auth import OPEN_PATHS, KeyRing
from server.api.lifecycle_routes import UNGATED_PATHS
from server.config import Settings
from server.engine import Engine
from tests.support.adapter_uploads import peft_multipart
from tests.support.fake_engine import FakeEngine
from tests.support.servers import serving_engine

KEY_TENANT, KEY_ADMIN = "fuzz-tenant-key-0123456789", "fuzz-admin-key-0123456789"
KEYS = {"admin": KEY_ADMIN, "tenant": KEY_TENANT, "no key": None}
# Schemathesis' coverage phase (boundary values, missing fields, undeclared methods: some 900 cases) probes
# validation, which is the same whoever calls, so it runs for the admin alone; every caller gets the schema's
# examples and the fuzzing phase.
COVERAGE = {"admin"}
# Uploaded before each run: one the tenant owns, one the admin owns that nobody made public (the tenant's 404).
FIXTURE_ADAPTERS = {"fuzz-tenant-adapter": KEY_TENANT, "fuzz-admin-adapter": KEY_ADMIN}
# Schema-valid requests that the server rightly refuses with a 400, so `positive_data_acceptance` cannot apply:
# whether a prompt fits the model's context and its token ids its vocabulary, the cross-field rules (top_logprobs
# needs logprobs, best_of must equal n) and the operator's limits on the generation routes, and whether uploaded
# bytes are a PEFT adapter for this base model, are beyond what JSON Schema can say. Every other check runs here.
SEMANTIC_400S = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/adapters"),
                 ("PUT", "/v1/adapters/{adapter_id}")]


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Engine]]:
    directory = tmp_path_factory.mktemp("fuzz")
    keys = directory / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": KEY_TENANT, "tenant": "acme", "role": "tenant"},
                                         {"key": KEY_ADMIN, "tenant": "ops", "role": "admin"}]}))
    # Small limits keep each generated request cheap; requests past them get 400s, which the document declares.
    settings = Settings(store=directory / "store", api_keys=keys, max_gpu_adapters=2, max_lora_rank=8,
                        max_tokens_limit=2, max_prompt_tokens=64, max_n=2)
    with serving_engine(settings) as served:
        yield served


@pytest.fixture(scope="module")
def document(server: tuple[str, Engine], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served `/openapi.json`, saved for `st run` (fetching it needs a key, which one run must not have)."""
    url, _ = server
    response = httpx.get(f"{url}/openapi.json", headers=bearer(KEY_ADMIN))
    assert response.status_code == 200, response.text
    path = tmp_path_factory.mktemp("openapi") / "openapi.json"
    path.write_text(response.text)
    return path


def restore_fixture_adapters(url: str, engine: Engine) -> None:
    """Upload the fixture adapters that a previous run's DELETE cases removed."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for seed, (adapter_id, owner_key) in enumerate(FIXTURE_ADAPTERS.items()):
            if client.get(f"/v1/adapters/{adapter_id}", headers=bearer(KEY_ADMIN)).status_code == 404:
                response = client.post("/v1/adapters", data={"id": adapter_id}, files=peft_multipart(engine, seed),
                                       headers=bearer(owner_key))
                assert response.status_code == 201, response.text


def config(caller: str) -> str:
    """`schemathesis.toml` for one run (the options are those of `st run`'s configuration file)."""
    key = KEYS[caller]
    ids = json.dumps(sorted(FIXTURE_ADAPTERS))
    lines = [
        "seed = 0",
        "workers = 1",
        "request-timeout = 60",
        "[generation]",
        "max-examples = 12",
        "deterministic = true",
        "[phases.coverage]",
        f"enabled = {json.dumps(caller in COVERAGE)}",
        "[phases.stateful]",
        "enabled = false",  # no links between operations to follow
        "[dictionaries.fixture-ids]",
        f"values = {ids}",
        "[parameters]",
        '"path.adapter_id" = { dictionary = "fixture-ids", probability = 0.5 }',
        '"path.model_id" = { dictionary = "fixture-ids", probability = 0.5 }',
    ]
    if key is None:
        # Without a key every route but the probes is a 401 before routing looks at the method, on purpose: the
        # server does not tell strangers which paths and methods exist (tests/test_auth.py). So an undeclared
        # method gets a 401 here, not the 405 this check wants.
        lines += ["[checks]", "unsupported_method.enabled = false"]
    else:
        lines += ["[auth.openapi.bearer]", f'bearer = "{key}"']
    for method, path in SEMANTIC_400S:
        lines += ["[[operations]]", f'include-method = "{method}"', f'include-path = "{path}"',
                  "checks.positive_data_acceptance.enabled = false"]
    return "\n".join(lines) + "\n"


def schemathesis_run(url: str, document: Path, caller: str, *filters: str) -> subprocess.CompletedProcess:
    config_file = document.with_name(f"schemathesis-{caller.replace(' ', '-')}.toml")
    config_file.write_text(config(caller))
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config_file), "run", str(document),
               "--url", url, *filters]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=document.parent)


def test_every_operation_declares_what_protects_it(document: Path) -> None:
    """The no-key run relies on this: schemathesis' `ignored_auth` check fails a 2xx to an operation that declares
    the key it needs and was sent none."""
    paths = json.loads(document.read_text())["paths"]
    for path, path_item in paths.items():
        for method, operation in path_item.items():
            assert ("security" in operation) == (path not in OPEN_PATHS), (method, path)
            assert "401" in operation["responses"] or path in OPEN_PATHS, (method, path)


@pytest.mark.parametrize("keys", [KeyRing(), KeyRing.parse({"keys": [{"key": KEY_ADMIN, "tenant": "ops",
                                                                    "role": "admin"}]}, "test keys")])
def test_middleware_answers_are_declared_where_they_apply(keys: KeyRing) -> None:
    """What the fuzzed server's settings leave out: a concurrency limit's 429, and an open server's document."""
    settings = Settings(max_concurrent_requests_per_tenant=1)
    paths = build_app(FakeEngine(), settings, keys).openapi()["paths"]
    for path, path_item in paths.items():
        for method, operation in path_item.items():
            responses = operation["responses"]
            guarded = path not in OPEN_PATHS
            assert ("429" in responses) == guarded and ("503" in responses or path in UNGATED_PATHS), (method, path)
            assert ("401" in responses) == ("security" in operation) == (guarded and not keys.is_open), (method, path)
            if guarded:
                assert responses["429"]["headers"]["Retry-After"]["required"] is True
            assert "422" not in responses and ("413" in responses) == ("requestBody" in operation), (method, path)


@pytest.mark.parametrize("caller", list(KEYS))
def test_schemathesis_finds_nothing(server: tuple[str, Engine], document: Path, caller: str) -> None:
    url, engine = server
    # With a key, DELETE runs last and on its own, so that earlier cases find the fixture adapters still there.
    runs = [["--exclude-method", "DELETE"], ["--include-method", "DELETE"]] if KEYS[caller] else [[]]
    for filters in runs:
        restore_fixture_adapters(url, engine)
        result = schemathesis_run(url, document, caller, *filters)
        assert result.returncode == 0, f"{' '.join(filters)}\n{result.stdout[-20000:]}\n{result.stderr[-5000:]}"
