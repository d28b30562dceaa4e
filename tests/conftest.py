"""Fixtures shared by every suite: a reproducible torch generator, `gpu` tests skipped without CUDA, and real
`lorahive serve` processes. Helpers that are not fixtures live in tests/support/."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

# Without CUDA the Triton kernels run through Triton's interpreter. Triton reads this when a kernel is
# decorated, so it is set before any test module imports kernels.triton_ops; whichever module is collected first
# must not decide it. (The compile test lowers the kernels' plain Python functions, interpreted or not.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The helpers' own asserts explain their failures as the tests' do; this must come before they are imported.
pytest.register_assert_rewrite("tests.support")

from server.api import build_app  # noqa: E402
from tests.support.fake_engine import FakeEngine  # noqa: E402
from tests.support.servers import TIMEOUT_S, Server, free_port  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torch_gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from the test's id: every test gets its own stream, the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def fake_engine() -> FakeEngine:
    """The scripted engine of tests/support/fake_engine.py: the HTTP layer's tests, without a model."""
    return FakeEngine()


@pytest.fixture
def fake_api(fake_engine: FakeEngine) -> Iterator[TestClient]:
    """The app over `fake_engine`, open (no keys); an unhandled exception is a 500, as a client would see it."""
    with TestClient(build_app(fake_engine), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    started: list[subprocess.Popen] = []

    def start(drain_timeout: float, **settings: object) -> Server:
        """`lorahive serve` with these settings (`header_timeout=1` is LORAHIVE_HEADER_TIMEOUT=1), once ready."""
        port = free_port()
        env = os.environ | {"LORAHIVE_PORT": str(port), "LORAHIVE_DRAIN_TIMEOUT": str(drain_timeout),
                            "LORAHIVE_LOG_LEVEL": "info", "LORAHIVE_DEVICE": "cpu"}
        env |= {f"LORAHIVE_{name.upper()}": str(value) for name, value in settings.items()}
        log = tmp_path / f"server-{port}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, stderr=sink,
                                       stdout=sink)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    return Server(process, url, log)
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"the server did not become ready:\n{log.read_text()}")

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
