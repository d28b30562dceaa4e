"""`lorahive serve --adapters DIR`: what start-up imports, what it skips and why, and whose ids it leaves alone."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from adapters_store import AdapterStore, BaseModelShape
from adapters_store.peft_export import to_peft_files
from server.adapter_registry import AdapterRegistry
from server.config import Settings
from server.demo import build_demo_model
from server.runtime import build_engine
from server.startup_import import import_adapters
from tests.support.engines import make_adapter

ARGS = build_demo_model()[0].args


def peft_files(seed: int) -> tuple[bytes, bytes]:
    return to_peft_files(make_adapter("x", ARGS, 2, 4.0, ("q_proj",), seed=seed))


def write_adapter(directory: Path, seed: int) -> Path:
    directory.mkdir(parents=True)
    config, weights = peft_files(seed)
    (directory / "adapter_config.json").write_bytes(config)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    shape = BaseModelShape(num_layers=ARGS.n_layers, module_dims=ARGS.lora_module_dims)
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), shape, max_rank=8, host_budget_bytes=2**30)
    yield registry
    registry.close()


def weights_sha256(registry: AdapterRegistry, adapter_id: str) -> str:
    return registry.store.manifest(adapter_id).files["adapter_model.safetensors"].sha256


def test_a_directory_that_is_one_adapter_is_served_under_its_name(tmp_path: Path) -> None:
    single = write_adapter(tmp_path / "house-style", seed=1)
    engine = build_engine(Settings(store=tmp_path / "store", adapters=single, max_lora_rank=8,
                                   model_runner_process=False))  # never started: the import alone
    assert engine.registry.ids() == ["house-style"]
    manifest = engine.registry.store.manifest("house-style")
    assert manifest.public and manifest.owner is None


def test_every_start_logs_what_was_imported_and_what_was_skipped_and_why(
    tmp_path: Path, registry: AdapterRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    adapters = tmp_path / "adapters"
    write_adapter(adapters / "good", seed=2)
    pickled = adapters / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes(peft_files(3)[0])
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x02pickle")
    (adapters / "notes").mkdir()
    (adapters / ".git").mkdir()  # never an adapter: not even a skip worth reporting

    with caplog.at_level(logging.INFO, logger="lorahive.adapters"):
        report = import_adapters(registry, adapters)

    assert report.new == ["good"] and registry.ids() == ["good"]
    assert set(report.skipped) == {str(pickled), str(adapters / "notes")}
    assert "save with safe_serialization=True" in report.skipped[str(pickled)]
    assert "Errno" not in report.skipped[str(pickled)]
    assert "no adapter_config.json" in report.skipped[str(adapters / "notes")]
    summary = [r.getMessage() for r in caplog.records if "imported" in r.getMessage()]
    assert summary == [f"--adapters {adapters}: 1 adapter(s) imported (1 new, 0 updated, 0 unchanged), 2 skipped: "
                       f"{adapters / 'notes'}, {pickled}"]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorahive.adapters"):
        report = import_adapters(registry, adapters)
    assert report.unchanged == ["good"] and report.new == []
    assert "1 adapter(s) imported (0 new, 0 updated, 1 unchanged), 2 skipped" in caplog.text


def test_the_operators_own_adapter_gets_a_new_version_when_its_files_change(
    tmp_path: Path, registry: AdapterRegistry
) -> None:
    directory = write_adapter(tmp_path / "adapters" / "house", seed=4)
    import_adapters(registry, tmp_path / "adapters")
    (directory / "adapter_model.safetensors").write_bytes(peft_files(5)[1])

    report = import_adapters(registry, tmp_path / "adapters")

    assert report.updated == ["house"]
    manifest = registry.store.manifest("house")
    assert manifest.version == 2 and manifest.public and manifest.owner is None
    assert weights_sha256(registry, "house") == hashlib.sha256(peft_files(5)[1]).hexdigest()


@pytest.mark.parametrize("same_files", [False, True])
def test_import_never_takes_over_or_overwrites_a_tenants_id(
    tmp_path: Path, registry: AdapterRegistry, caplog: pytest.LogCaptureFixture, same_files: bool
) -> None:
    tenant_files = peft_files(6)
    registry.create("all-r8", *tenant_files, owner="acme")  # a tenant's upload, private
    directory = write_adapter(tmp_path / "adapters" / "all-r8", seed=6 if same_files else 7)

    with caplog.at_level(logging.WARNING, logger="lorahive.adapters"):
        report = import_adapters(registry, tmp_path / "adapters")

    assert list(report.skipped) == [str(directory)]
    assert "tenant 'acme'" in report.skipped[str(directory)] and "DELETE /v1/adapters/all-r8" in caplog.text
    manifest = registry.store.manifest("all-r8")
    assert (manifest.owner, manifest.public, manifest.version) == ("acme", False, 1)
    assert weights_sha256(registry, "all-r8") == hashlib.sha256(tenant_files[1]).hexdigest()


def test_import_leaves_a_private_adapter_without_owner_alone(tmp_path: Path, registry: AdapterRegistry) -> None:
    """Uploaded to a server that ran without keys: nobody's, but not the operator's to replace either."""
    registry.create("open-upload", *peft_files(8))
    directory = write_adapter(tmp_path / "adapters" / "open-upload", seed=9)

    report = import_adapters(registry, tmp_path / "adapters")

    assert "private adapter without owner" in report.skipped[str(directory)]
    assert registry.store.manifest("open-upload").version == 1
