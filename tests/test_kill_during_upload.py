"""SIGKILL the real server process in the middle of an upload, restart it on the same store.

The store must hold the old state whole (the interrupted adapter absent, nothing half-written visible)
and the restarted server must serve every adapter it had. Kill points inside the store's own write
sequence are covered by tests/test_store.py; this is the whole-process version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters_store import TARGET_MODULES
from adapters_store.peft_export import to_peft_files
from server.demo import build_demo_model
from tests.support.adapter_uploads import PROMPT, multipart
from tests.support.engines import make_adapter
from tests.support.servers import free_port


def _start(store: Path, port: int) -> subprocess.Popen:
    env = os.environ | {"LORAHIVE_STORE": str(store), "LORAHIVE_PORT": str(port), "LORAHIVE_LOG_LEVEL": "warning"}
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def test_sigkill_mid_upload_then_restart_serves_the_old_state(store: Path, processes):
    args = build_demo_model()[0].args
    files = {name: to_peft_files(make_adapter(name, args, 4, 8.0, TARGET_MODULES, seed=i))
             for i, name in enumerate(["keep-a", "keep-b"])}
    port = _start_and_track(store, processes)
    base = f"http://127.0.0.1:{port}"
    for name, pair in files.items():
        assert httpx.post(f"{base}/v1/adapters", data={"id": name}, files=multipart(*pair)).status_code == 201
    before = {name: _complete(base, name) for name in files}

    # Stream a large upload slowly and kill the server while its body is half sent.
    process = processes[-1]

    def slow_body() -> Iterator[bytes]:
        yield b"--b\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\nhalf\r\n"
        yield b"--b\r\nContent-Disposition: form-data; name=\"adapter_model\"; filename=\"m\"\r\n\r\n"
        for i in range(50):
            if i == 5:
                process.send_signal(signal.SIGKILL)
            yield b"\0" * 65536
            time.sleep(0.02)

    with pytest.raises(httpx.TransportError):
        httpx.post(f"{base}/v1/adapters", content=slow_body(),
                   headers={"content-type": "multipart/form-data; boundary=b"}, timeout=10)
    process.wait(10)

    port = _start_and_track(store, processes)
    base = f"http://127.0.0.1:{port}"
    listed = [a["id"] for a in httpx.get(f"{base}/v1/adapters").json()["data"]]
    assert listed == ["keep-a", "keep-b"]
    assert {name: _complete(base, name) for name in files} == before
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["keep-a", "keep-b"]


def _start_and_track(store: Path, processes: list[subprocess.Popen]) -> int:
    port = free_port()
    processes.append(_start(store, port))
    return port


def _complete(base: str, adapter: str) -> str:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "adapter_id": adapter}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]
