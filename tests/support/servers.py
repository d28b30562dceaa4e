"""Live servers for tests: a real uvicorn server on a free localhost port in a background thread (serving any
app, or the real engine), and the handle of a real `lorahive serve` process (started by the `start_server`
fixture, tests/conftest.py)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from server.api.app import build_app
from server.config import Settings
from server.draining_server import guarded_protocol
from server.engine import Engine
from server.runtime import build_engine

TIMEOUT_S = 120.0  # generous: only turns a hung server into a failure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app: FastAPI, http: str | Callable[..., Any] = "auto") -> Iterator[str]:
    """Serve `app` on 127.0.0.1 with uvicorn's `http` protocol; yields the base URL (no trailing slash)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=http))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def serving_engine(settings: Settings, guarded: bool = False) -> Iterator[tuple[str, Engine]]:
    """The real engine built from `settings`, started and served; yields (base URL, engine). `guarded` serves it
    over `lorahive serve`'s connection guard (the settings' --header-timeout and --max-connections)."""
    engine = build_engine(settings)
    engine.start()
    try:
        with running_server(build_app(engine, settings), guarded_protocol(settings) if guarded else "auto") as url:
            yield url, engine
    finally:
        engine.shutdown()


class Server:
    """A `lorahive serve` process: the process, its base URL and the file its output goes to."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process = process
        self.url = url
        self.log = log
