"""What one tenant can learn of another: `/metrics` (whose labels name adapters) is for admins and the metrics key
once a server has keys, unless `--metrics-public`; the base model's card names the model, not a server path."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api import build_app
from server.api.auth import KeyRing
from server.cli import main, settings_from
from server.cli.serve_command import add_settings_flags
from server.config import Settings
from tests.support.adapter_training import export_demo
from tests.support.api_keys import KEY_A, KEY_ADMIN, KEY_FILE, KEYS_BY_CALLER, bearer
from tests.support.fake_engine import FakeEngine
from tests.support.openai_schema import assert_valid
from tests.support.servers import serving_engine

SECRET_ADAPTER = "beta-secret"  # another tenant's adapter: its id must not reach tenant A
METRICS_KEY = "metrics-secret-0123"


def client_with(settings: Settings, keys: KeyRing | None) -> TestClient:
    app = build_app(FakeEngine(), settings, keys)
    app.state.metrics.request_submitted(SECRET_ADAPTER, prompt_tokens=3)  # as the engine counts a request
    return TestClient(app)


@pytest.fixture
def keyed_client() -> Iterator[TestClient]:
    with client_with(Settings(), KeyRing.parse(KEY_FILE, "test keys")) as client:
        yield client


@pytest.mark.parametrize(("caller", "status", "code"), [
    ("no key", 401, "missing_api_key"),
    ("bad key", 401, "invalid_api_key"),
    ("tenant A (owner)", 403, "permission_denied"),
    ("tenant B", 403, "permission_denied"),
])
def test_metrics_are_closed_to_tenants_once_the_server_has_keys(keyed_client: TestClient, caller: str, status: int,
                                                                code: str) -> None:
    response = keyed_client.get("/metrics", headers=bearer(KEYS_BY_CALLER[caller]))
    assert response.status_code == status, response.text
    assert_valid(response.json(), "ErrorResponse")
    assert response.json()["error"]["code"] == code
    assert "--metrics-api-key" in response.json()["error"]["message"]  # says what would be let in
    assert SECRET_ADAPTER not in response.text


def test_admins_read_the_metrics(keyed_client: TestClient) -> None:
    response = keyed_client.get("/metrics", headers=bearer(KEY_ADMIN))
    assert response.status_code == 200
    assert f'adapter="{SECRET_ADAPTER}"' in response.text


def test_the_metrics_key_reads_them_too() -> None:
    keys = KeyRing.parse(KEY_FILE, "test keys")
    with client_with(Settings(metrics_api_key=METRICS_KEY), keys) as client:
        assert client.get("/metrics", headers=bearer(METRICS_KEY)).status_code == 200
        assert client.get("/metrics", headers=bearer(KEY_ADMIN)).status_code == 200
        assert client.get("/metrics", headers=bearer(KEY_A)).status_code == 403
        assert client.get("/v1/models", headers=bearer(METRICS_KEY)).status_code == 401  # not an API key


def test_metrics_public_opens_them_on_purpose() -> None:
    with client_with(Settings(metrics_public=True), KeyRing.parse(KEY_FILE, "test keys")) as client:
        assert client.get("/metrics").status_code == 200


def test_an_open_server_keeps_its_metrics_open() -> None:
    with client_with(Settings(), KeyRing()) as client:
        assert client.get("/metrics").status_code == 200
    with client_with(Settings(metrics_api_key=METRICS_KEY), KeyRing()) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer(METRICS_KEY)).status_code == 200


def test_metrics_public_is_a_bare_flag_and_excludes_a_metrics_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert settings_from(_parse_serve(["--metrics-public"]), {}).metrics_public is True
    assert settings_from(_parse_serve([]), {"LORAHIVE_METRICS_PUBLIC": "false"}).metrics_public is False
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--metrics-public", "--metrics-api-key", METRICS_KEY])
    assert stopped.value.code == 2
    assert "give one of them" in capsys.readouterr().err


def _parse_serve(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    return parser.parse_args(argv)


def test_the_base_model_card_shows_no_server_path(tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "private-dir-name-7f3a"
    export_demo(model_dir)
    settings = Settings(model=model_dir, served_model_name="team-llama", store=tmp_path / "store", device="cpu",
                        max_gpu_adapters=1, max_lora_rank=8, kv_cache_tokens=256)
    with serving_engine(settings) as (url, _):
        body = httpx.get(f"{url}/v1/models", timeout=60).text
    assert "team-llama" in body
    assert str(tmp_path) not in body and "private-dir-name-7f3a" not in body
