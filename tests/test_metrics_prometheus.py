"""A real Prometheus scrapes a real lorahive server under mixed traffic; every PromQL expression of the
Grafana dashboards (panel targets and variable queries) must then return data.

Needs the `prometheus` binary (Debian package `prometheus`; `.ci/run` installs it). Without it the test
is skipped, loudly.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.config import Settings
from server.engine import Engine
from tests.support.adapter_uploads import multipart, peft_files
from tests.support.engines import prompt
from tests.support.servers import free_port, serving_engine

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS = shutil.which("prometheus")
VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "${adapter:regex}": ".*",
             "$adapter": ".*"}
LABEL_VALUES = re.compile(r"^label_values\((?P<metric>.+),\s*(?P<label>\w+)\)$")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="!!! NO PROMETHEUS BINARY: the dashboards' PromQL was NOT checked against a real Prometheus. "
    "Install it (apt-get install -y prometheus; .ci/run does) to run this test. !!!",
)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable of every dashboard, variables substituted."""
    queries: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                queries.append((where, node["expr"]))
            for key, child in node.items():
                walk(child, f"{where} / {node.get('title', key)}" if key == "targets" else where)
        elif isinstance(node, list):
            for child in node:
                walk(child, where)

    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        walk(dashboard["panels"], path.name)
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            match = LABEL_VALUES.match(query or "")
            if variable.get("type") == "query" and match:  # Grafana's helper, as the PromQL it amounts to
                queries.append((f"{path.name} / ${variable['name']}",
                                f"count by ({match['label']}) ({match['metric']})"))
    substituted = []
    for where, expr in queries:
        for name, replacement in VARIABLES.items():
            expr = expr.replace(name, replacement)
        assert "$" not in expr, f"{where}: unsubstituted variable in {expr}"
        substituted.append((where, expr))
    return substituted


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Engine]]:
    store = tmp_path_factory.mktemp("store")
    with serving_engine(Settings(store=store, max_gpu_adapters=2, max_lora_rank=16)) as served:
        yield served


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("prometheus")
    target = server[0].removeprefix("http://")
    config = directory / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: lorahive\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    log = (directory / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (directory / "prometheus.log").read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def query(prometheus: str, expr: str) -> dict:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    assert response.status_code == 200, f"{expr}: {response.text}"
    return response.json()["data"]


def send_traffic(url: str, engine: Engine) -> None:
    """Mixed traffic over several adapters, with a host-memory budget of 2.5 adapters and two device slots,
    so every tier hits and misses, loads and evicts; plus errors, an upload failure and deletes."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(5):
            assert client.post("/v1/adapters", data={"id": f"p-{i}"},
                               files=multipart(*peft_files(engine, i))).status_code == 201
            if i == 0:  # later uploads and loads push older adapters out of host memory
                one_adapter = engine.registry.stats.host
                engine.registry.host_budget_bytes = 2 * one_adapter + one_adapter // 2
        assert client.post("/v1/adapters", data={"id": "bad"}, files=multipart(b"{}", b"x")).status_code == 400
        # p-0 and p-1 left host memory when p-3 and p-4 arrived: asking for them reads the store again.
        order = ["p-4", "p-4", None, "p-3", "p-0", "p-0", None, "p-2", "p-1"]
        deadline = time.monotonic() + 4  # spread over several scrapes
        k = 0
        while k < len(order) or time.monotonic() < deadline:
            adapter = order[k] if k < len(order) else order[k % 2]  # then only resident adapters
            body: dict[str, Any] = {"max_tokens": 2 + k % 5, "temperature": 0, "ignore_eos": True, "n": 1 + k % 2,
                                    "stream": k % 3 == 0}
            if adapter is not None:
                body["adapter_id"] = adapter
            if k % 2:
                body["messages"] = [{"role": "user", "content": f"hi {k}"}]
                response = client.post("/v1/chat/completions", json=body)
            else:
                body["prompt"] = list(prompt(k, 4 + k % 9))
                response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            if k % 7 == 0:
                assert client.post("/v1/completions", json={"prompt": "x", "model": "missing"}).status_code == 404
            k += 1
        assert client.delete("/v1/adapters/p-4").status_code == 200
        assert client.delete("/v1/adapters/p-4").status_code == 404
    assert engine.registry.stats.host_evictions > 0 and engine.pool.evictions > 0


def test_every_dashboard_query_returns_data(server, prometheus):
    url, engine = server
    queries = dashboard_queries()
    assert len(queries) > 30
    send_traffic(url, engine)
    time.sleep(3)  # a few scrapes after the traffic, so every new series has two samples for rate()
    assert query(prometheus, 'up{job="lorahive"}')["result"][0]["value"][1] == "1"
    empty = []
    for where, expr in queries:
        if not query(prometheus, expr)["result"]:
            empty.append(f"{where}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    # The traffic really moved the adapter tiers (not just zero-initialised series).
    for expr in ('sum(lorahive_adapter_cache_misses_total{tier="host"})', 'sum(lorahive_adapter_cache_hits_total'
                 '{tier="disk"})', 'sum(lorahive_adapter_evictions_total{tier="gpu"})',
                 'sum(lorahive_adapter_load_duration_seconds_count{transition="disk_to_host"})'):
        assert float(query(prometheus, expr)["result"][0]["value"][1]) > 0, expr
