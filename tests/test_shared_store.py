"""Two servers on one `--store`: what one of them changes reaches the other within its revalidation bound.

Each server is the real engine on the demo model behind its own app, both over ONE store directory, with
`--store-revalidate-seconds 0` (the bound is then "the next request"). The bound itself is checked on two
registries with a fake clock. Whatever the order, no request gets a 500.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapters_store import TARGET_MODULES, AdapterStore, BaseModelShape
from adapters_store.peft_export import to_peft_files
from server.adapter_registry import AdapterRegistry, AdapterVersion
from server.api.app import build_app
from server.api.auth import KeyRing
from server.config import Settings
from server.demo import build_demo_model
from server.engine import Engine
from server.model import ModelArgs
from server.runtime import build_engine
from tests.support.adapter_uploads import multipart, peft_files
from tests.support.api_keys import KEY_A, KEY_ADMIN, KEY_B, KEY_FILE, bearer
from tests.support.engines import ENGINE_SETTINGS, make_adapter, prompt

CALLERS = {"owner": KEY_A, "other": KEY_B, "admin": KEY_ADMIN}
PROMPT = list(prompt(3, 10))
Client = Callable[[str], TestClient]  # caller -> a client of one server with that caller's key


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Client, Client, Engine]]:
    """(clients of server A, clients of server B, A's engine): two servers sharing `tmp_path` as their store."""
    settings = Settings(**(ENGINE_SETTINGS | {"store": tmp_path, "store_revalidate_seconds": 0}))
    keys = KeyRing.parse(KEY_FILE, "test keys")
    with ExitStack() as stack:
        engines, apps = [], []
        for _ in range(2):
            engine = build_engine(settings)
            engine.start()
            stack.callback(engine.shutdown)
            engines.append(engine)
            apps.append(build_app(engine, settings, keys))

        def clients_of(app: Any) -> Client:
            def client(caller: str) -> TestClient:
                test_client = TestClient(app, headers=bearer(CALLERS[caller]), raise_server_exceptions=False)
                return stack.enter_context(test_client)
            return client

        yield clients_of(apps[0]), clients_of(apps[1]), engines[0]


def upload(client: TestClient, adapter_id: str, files: tuple[bytes, bytes]) -> None:
    response = client.post("/v1/adapters", data={"id": adapter_id}, files=multipart(*files))
    assert response.status_code == 201, response.text


def complete(client: TestClient, adapter_id: str) -> Any:
    """The completion's response (checked to be no 500)."""
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "adapter_id": adapter_id}
    response = client.post("/v1/completions", json=body)
    assert response.status_code != 500, response.text
    return response


def text(client: TestClient, adapter_id: str) -> str:
    response = complete(client, adapter_id)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def assert_not_found(client: TestClient, adapter_id: str) -> None:
    """Every route of `client`'s server answers as if `adapter_id` did not exist."""
    response = complete(client, adapter_id)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found", response.text
    assert client.get(f"/v1/adapters/{adapter_id}").status_code == 404
    assert adapter_id not in [a["id"] for a in client.get("/v1/adapters").json()["data"]]
    assert adapter_id not in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_an_upload_on_one_server_is_served_by_the_other(servers):
    a, b, engine = servers
    upload(a("owner"), "shared", peft_files(engine, seed=1))
    assert text(b("owner"), "shared") == text(a("owner"), "shared")
    assert "shared" in [m["id"] for m in b("owner").get("/v1/models").json()["data"]]
    assert_not_found(b("other"), "shared")  # still private to its owner on the other server


def test_a_delete_on_one_server_stops_the_other_serving_it(servers):
    a, b, engine = servers
    upload(a("owner"), "doomed", peft_files(engine, seed=1))
    text(b("owner"), "doomed")  # B has it cached and its weights loaded
    assert a("owner").delete("/v1/adapters/doomed").status_code == 200
    assert_not_found(b("owner"), "doomed")


def test_making_an_adapter_private_on_one_server_revokes_it_on_the_other(servers):
    a, b, engine = servers
    upload(a("owner"), "lent", peft_files(engine, seed=1))
    assert a("admin").patch("/v1/adapters/lent", json={"public": True}).status_code == 200
    text(b("other"), "lent")  # another tenant uses it through B while it is public
    assert a("admin").patch("/v1/adapters/lent", json={"public": False}).status_code == 200
    assert_not_found(b("other"), "lent")
    assert b("owner").get("/v1/adapters/lent").json()["public"] is False
    text(b("owner"), "lent")


@pytest.mark.parametrize("loaded_on_b", [True, False], ids=["loaded", "only-looked-up"])
def test_a_replace_on_one_server_is_served_by_the_other(servers, loaded_on_b: bool):
    a, b, engine = servers
    upload(a("owner"), "evolving", peft_files(engine, seed=1))
    if loaded_on_b:
        old = text(b("owner"), "evolving")
    else:  # B knows version 1 but never read its weights: the reported 500 ("version 1 was replaced ...")
        assert b("owner").get("/v1/adapters/evolving").json()["version"] == 1
    put = a("owner").put("/v1/adapters/evolving", files=multipart(*peft_files(engine, seed=2)))
    assert put.status_code == 200, put.text
    new = text(a("owner"), "evolving")
    assert text(b("owner"), "evolving") == new
    assert b("owner").get("/v1/adapters/evolving").json()["version"] == 2
    if loaded_on_b:
        assert new != old


def _change_before_b_reads(b_engine: Engine, change: Callable[[], None], monkeypatch) -> None:
    """Run `change` (another server's write) between B binding a request and B reading its weights."""
    store = b_engine.registry.store
    read = store.read

    def read_after_change(adapter_id: str):
        monkeypatch.setattr(store, "read", read)  # once
        change()
        return read(adapter_id)

    monkeypatch.setattr(store, "read", read_after_change)


@pytest.mark.parametrize("change", ["replace", "delete"])
def test_a_request_whose_version_went_away_before_it_loaded_may_retry(servers, change: str, monkeypatch):
    a, b, engine = servers
    upload(a("owner"), "moving", peft_files(engine, seed=1))

    def change_on_a() -> None:
        if change == "replace":
            response = a("owner").put("/v1/adapters/moving", files=multipart(*peft_files(engine, seed=2)))
        else:
            response = a("owner").delete("/v1/adapters/moving")
        assert response.status_code == 200, response.text

    _change_before_b_reads(b("owner").app.state.engine, change_on_a, monkeypatch)
    response = complete(b("owner"), "moving")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "adapter_changed" and response.headers["Retry-After"] == "1"
    if change == "replace":  # the retry binds to version 2
        assert text(b("owner"), "moving") == text(a("owner"), "moving")
    else:
        assert_not_found(b("owner"), "moving")


# --------------------------------------------------------------------------------------------------
# The bound, on two registries over one store with a clock the test moves


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def demo_args() -> ModelArgs:
    return build_demo_model()[0].args


@pytest.fixture
def registries(tmp_path: Path, demo_args: ModelArgs) -> Iterator[tuple[AdapterRegistry, AdapterRegistry, FakeClock]]:
    """Two registries over one store, as two servers would have, revalidating after 1 s of `clock`."""
    shape = BaseModelShape(num_layers=demo_args.n_layers, module_dims=demo_args.lora_module_dims)
    clock = FakeClock()
    a, b = (AdapterRegistry(AdapterStore(tmp_path), shape, max_rank=16, host_budget_bytes=2**30, revalidate_s=1.0,
                            clock=clock) for _ in range(2))
    yield a, b, clock
    a.close()
    b.close()


def adapter_files(args: ModelArgs, seed: int) -> tuple[bytes, bytes]:
    return to_peft_files(make_adapter("x", args, 4, 8.0, TARGET_MODULES, seed))


def load(registry: AdapterRegistry, version: AdapterVersion) -> None:
    """Read `version` from the store into host memory, and wait until that load has ended (loaded or failed)."""
    ended = threading.Event()
    registry.on_loaded = lambda loaded: ended.set()
    registry.request_load(version)
    assert ended.wait(60)


def test_changes_show_on_the_other_registry_within_the_bound(registries, demo_args):
    a, b, clock = registries
    a.create("x", *adapter_files(demo_args, 1), owner="acme")
    assert b.version("x").manifest.version == 1  # a miss reads the store at once

    a.replace("x", *adapter_files(demo_args, 2))
    clock.now = 0.9
    assert b.version("x").manifest.version == 1  # within the bound the cached manifest serves
    clock.now = 1.0
    assert b.version("x").manifest.version == 2

    a.set_public("x", True)
    clock.now = 2.0
    assert b.version("x").manifest.public is True

    a.delete("x")
    clock.now = 2.5
    assert b.exists("x")
    clock.now = 3.0
    assert not b.exists("x")


def test_a_request_bound_before_the_other_replaced_finishes_on_its_host_copy(registries, demo_args):
    a, b, clock = registries
    a.create("x", *adapter_files(demo_args, 1))
    old = b.bind("x")
    load(b, old)
    assert old.weights is not None
    a.replace("x", *adapter_files(demo_args, 2))
    clock.now = 1.0
    new = b.bind("x")
    assert new is not old and new.manifest.version == 2
    assert new.requests_served == 2  # the id's count goes on across a replace made elsewhere, as locally
    assert old.retired and old.weights is not None  # kept for the request still bound to it
    b.unbind(old)
    assert old.weights is None  # freed with its last user
    b.unbind(new)


def test_a_version_that_went_away_before_it_loaded_is_gone_and_the_next_lookup_reads_the_store(registries, demo_args):
    a, b, clock = registries
    a.create("x", *adapter_files(demo_args, 1))
    old = b.bind("x")
    a.replace("x", *adapter_files(demo_args, 2))
    load(b, old)
    assert old.gone and old.retired and not old.broken and old.weights is None
    assert b.version("x").manifest.version == 2  # at once: the failed load showed the store had moved on
    b.unbind(old)


@pytest.mark.parametrize("write", ["revoke", "delete"])
def test_a_read_that_a_write_of_ours_overtook_never_undoes_it(registries, demo_args, write: str, monkeypatch):
    """A revalidation reads the store without a lock: if this server revokes or deletes the adapter while that
    read is under way, the older state it read must not come back."""
    registry, _, clock = registries
    registry.create("x", *adapter_files(demo_args, 1), owner="acme", public=True)
    manifest = registry.store.manifest

    def read_then_write(adapter_id: str):
        monkeypatch.setattr(registry.store, "manifest", manifest)  # once
        before = manifest(adapter_id)
        if write == "revoke":
            registry.set_public("x", False)
        else:
            registry.delete("x")
        return before  # what the store held when this read began

    clock.now = 1.0  # the cached manifest is due for a read
    monkeypatch.setattr(registry.store, "manifest", read_then_write)
    version = registry.version("x")
    clock.now = 1.5  # within the bound of the write: what the registry shows now is what it keeps showing
    if write == "revoke":
        assert version.manifest.public is False and registry.version("x").manifest.public is False
    else:
        assert version is None and not registry.exists("x")
