"""The adapter API's answers where a client or an operator goes wrong, over real HTTP.

Adapters the server's settings cannot serve (stored under a larger `--max-lora-rank`, or under the base
model's served name), refusals that say what to do, and what `location` and `requests_served` mean.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters_store import TARGET_MODULES, AdapterStore
from adapters_store.peft_export import to_peft_files
from server.config import Settings
from server.demo import DEMO_MODEL_NAME, build_demo_model
from server.engine import Engine
from server.runtime import build_engine
from tests.support.adapter_uploads import MAX_RANK, PROMPT, multipart, peft_files, upload
from tests.support.engines import make_adapter
from tests.support.prometheus_text import value
from tests.support.servers import serving_engine


def demo_peft_files(rank: int, seed: int = 0, alpha: float | None = None) -> tuple[bytes, bytes]:
    """PEFT files of an adapter for the demo model, made without a running server."""
    args = build_demo_model(0)[0].args
    return to_peft_files(make_adapter("x", args, rank, alpha or 2.0 * rank, TARGET_MODULES, seed))


def store_directly(store: Path, adapter_id: str, files: tuple[bytes, bytes], rank: int) -> None:
    """Write an adapter into a store the way an earlier server with other settings did: no checks."""
    AdapterStore(store).create(adapter_id, *files, rank=rank, lora_alpha=2.0 * rank, target_modules=TARGET_MODULES)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] is not None, error
    return error


def completion(client: httpx.Client, **fields: object) -> httpx.Response:
    return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **fields})


# ------------------------------------------------------------------------ adapters these settings cannot serve


def test_stored_adapters_these_settings_cannot_serve_are_warned_of_listed_and_refused(tmp_path, caplog):
    store = tmp_path / "store"
    store_directly(store, "wide", demo_peft_files(rank=2 * MAX_RANK), rank=2 * MAX_RANK)
    store_directly(store, DEMO_MODEL_NAME, demo_peft_files(rank=8), rank=8)  # stored under another --served-model-name
    with caplog.at_level(logging.INFO), serving_engine(
        Settings(store=store, max_lora_rank=MAX_RANK, max_gpu_adapters=2)
    ) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        warned = [r.getMessage() for r in caplog.records if "cannot be served" in r.getMessage()]
        assert any("wide" in m and "--max-lora-rank" in m for m in warned), warned
        assert any(DEMO_MODEL_NAME in m and "served name" in m for m in warned), warned

        listed = {a["id"]: a for a in client.get("/v1/adapters").json()["data"]}
        wide = client.get("/v1/adapters/wide").json()
        assert listed["wide"] == wide
        assert wide["status"] == "unservable" and f"--max-lora-rank {MAX_RANK}" in wide["error"]
        assert listed[DEMO_MODEL_NAME]["status"] == "unservable" and "served name" in listed[DEMO_MODEL_NAME]["error"]

        cards = client.get("/v1/models").json()["data"]
        assert [c["id"] for c in cards].count(DEMO_MODEL_NAME) == 1  # the base model's card alone
        (wide_card,) = (c for c in cards if c["id"] == "wide")
        assert wide_card["status"] == "unservable" and wide_card["error"] == wide["error"]

        for request in ({"adapter_id": "wide"}, {"model": "wide"}):
            error = error_of(completion(client, **request), 400)
            assert error["code"] == "adapter_not_servable" and "--max-lora-rank" in error["message"]
        assert completion(client, model=DEMO_MODEL_NAME).status_code == 200  # the name still reaches the base

        cured = client.put("/v1/adapters/wide", files=multipart(*demo_peft_files(rank=8)))
        assert cured.status_code == 200 and cured.json()["status"] == "ready" and cured.json()["error"] is None
        assert completion(client, adapter_id="wide").status_code == 200


def test_start_up_import_skips_a_directory_named_as_the_base_model(tmp_path, caplog):
    adapters = tmp_path / "adapters"
    for name in (DEMO_MODEL_NAME, "imported"):
        (adapters / name).mkdir(parents=True)
        config, weights = demo_peft_files(rank=8)
        (adapters / name / "adapter_config.json").write_bytes(config)
        (adapters / name / "adapter_model.safetensors").write_bytes(weights)
    with caplog.at_level(logging.INFO):
        engine = build_engine(Settings(store=tmp_path / "store", adapters=adapters, max_lora_rank=MAX_RANK,
                                       model_runner_process=False))  # never started: the import alone
    try:
        assert engine.adapter_ids() == ["imported"]
        assert any(DEMO_MODEL_NAME in r.getMessage() and "served name" in r.getMessage() for r in caplog.records)
    finally:
        engine.registry.close()


# ---------------------------------------------------------------------------------------- a running server


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Engine]]:
    store = tmp_path_factory.mktemp("store")
    with serving_engine(Settings(store=store, max_gpu_adapters=2, max_lora_rank=MAX_RANK, device="cpu")) as served:
        yield served


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


def test_an_adapter_may_not_take_the_base_models_name(client, server):
    error = error_of(upload(client, server[1].model_name, peft_files(server[1], seed=1)), 409)
    assert error["param"] == "id" and error["code"] == "id_reserved" and "base model" in error["message"]
    assert client.get(f"/v1/adapters/{server[1].model_name}").status_code == 404  # nothing was stored
    assert [c["id"] for c in client.get("/v1/models").json()["data"]].count(server[1].model_name) == 1


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_a_missing_adapter_names_the_id(client, method):
    body = {"json": {"public": True}} if method == "PATCH" else {}
    error = error_of(client.request(method, "/v1/adapters/no-such-adapter", **body), 404)
    assert error["param"] == "id" and error["code"] == "model_not_found"


@pytest.mark.parametrize("method, path", [("POST", "/v1/adapters"), ("PUT", "/v1/adapters/anything")])
def test_a_json_upload_is_told_to_send_multipart(client, method, path):
    error = error_of(client.request(method, path, json={"id": "a", "adapter_config": {"r": 8}}), 415)
    assert "multipart/form-data" in error["message"] and "adapter_config" in error["message"]


def test_the_409_for_a_taken_id_says_how_to_replace(client, server):
    assert upload(client, "taken", peft_files(server[1], seed=2)).status_code == 201
    error = error_of(upload(client, "taken", peft_files(server[1], seed=3)), 409)
    assert "PUT /v1/adapters/taken" in error["message"] and "--replace" in error["message"]


def test_a_rank_above_the_limit_names_the_flag(client, server):
    error = error_of(upload(client, "too-wide", peft_files(server[1], seed=4, rank=2 * MAX_RANK)), 400)
    assert error["param"] == "r" and "--max-lora-rank" in error["message"]


def test_location_names_the_device_tier_device_on_a_cpu_server(client, server):
    assert upload(client, "placed", peft_files(server[1], seed=5)).status_code == 201
    assert completion(client, adapter_id="placed").status_code == 200
    assert server[1].pool.slot_of(server[1].registry.version("placed")) is not None  # it sits in a slot on the CPU
    assert client.get("/v1/adapters/placed").json()["location"] == "device"


def test_requests_served_counts_the_id_across_replaces_like_the_metric(client, server):
    assert upload(client, "counted", peft_files(server[1], seed=6)).status_code == 201
    for _ in range(2):
        assert completion(client, adapter_id="counted").status_code == 200
    replaced = client.put("/v1/adapters/counted", files=multipart(*peft_files(server[1], seed=7)))
    assert replaced.status_code == 200 and replaced.json()["version"] == 2
    assert replaced.json()["requests_served"] == 2 and replaced.json()["last_used_at"] is not None
    assert completion(client, adapter_id="counted").status_code == 200
    served = client.get("/v1/adapters/counted").json()["requests_served"]
    assert served == 3 == value(client.get("/metrics").text, "lorahive_adapter_requests_total", adapter="counted")


# ------------------------------------------------------------------------------------- files that are refused


def with_config(files: tuple[bytes, bytes], **changes: object) -> tuple[bytes, bytes]:
    config = json.loads(files[0])
    config.update(changes)
    return json.dumps(config).encode(), files[1]


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"rank_pattern": {"q_proj\\": 8}}, "rank_pattern"),  # not a regex: a stray backslash
        ({"alpha_pattern": {"\\q_proj": 8}}, "alpha_pattern"),  # not a regex: an unknown escape
        ({"rank_pattern": {f"layers\\.{i}\\.x": 8 for i in range(1025)}}, "rank_pattern"),  # too many keys
        ({"lora_alpha": 1e30}, "lora_alpha"),  # its scale overflows the served weights
        ({"lora_alpha": 10**400}, "lora_alpha"),  # a JSON integer no float holds
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"alpha_pattern": {"q_proj": 1e30}}, "alpha_pattern"),
    ],
)
def test_configs_that_would_fail_or_overflow_are_400_naming_the_field(client, server, changes, param):
    files = with_config(peft_files(server[1], seed=8), **changes)
    error = error_of(upload(client, "refused", files), 400)
    assert error["param"] == param and param in error["message"] and error["code"] == "invalid_adapter"
    assert client.get("/v1/adapters/refused").status_code == 404
