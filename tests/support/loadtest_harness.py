"""Driving the load-test harness from tests: the fake OpenAI-compatible server in a background thread, one run
against a URL, `lorahive-loadtest` in process, and a hand-made successful request result."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from loadtest.cli import main
from loadtest.client import ClientConfig, RequestResult
from loadtest.runner import RunLimits, RunOutcome, run_load
from loadtest.workload import Workload
from tests.support.fake_openai_server import FakeConfig, build_fake_app
from tests.support.servers import running_server


@contextmanager
def fake_server(**kw) -> Iterator[tuple[str, FakeConfig, object]]:
    config = FakeConfig(**kw)
    app = build_fake_app(config)
    with running_server(app) as url:
        yield url, config, app.state.fake


def run(url: str, workload: Workload, limits: RunLimits, **client_kw) -> RunOutcome:
    client = ClientConfig(url=url, base_model="fake-base", **client_kw)
    return asyncio.run(run_load(workload.requests(), client, limits))


def cli(*argv: str) -> int:
    """`lorahive-loadtest ARGV` in process (no progress line for run and sweep); its exit status."""
    args = list(argv)
    if not args or args[0] not in ("compare", "write-adapters"):
        args.insert(1 if args and args[0] == "sweep" else 0, "--no-progress")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def ok(index: int, start: float, ttft: float, itl: list[float], adapter: str | None = None, **kw) -> RequestResult:
    e2el = ttft + sum(itl)
    r = RequestResult(index, adapter, 10, len(itl) + 1, start=start, finish=start + e2el, success=True, ttft=ttft,
                      itl=itl, e2el=e2el, output_tokens=len(itl) + 1, prompt_tokens=10, tokens_from_usage=True)
    for key, value in kw.items():
        setattr(r, key, value)
    return r
