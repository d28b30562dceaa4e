"""`--model-runner-process`: the model runner in a worker process gives every request exactly what the in-process
runner gives (greedy and seeded sampling, penalties, logprobs, several choices, adapters loaded, replaced and
evicted, sequences preempted and recomputed), and a worker that fails or dies fails requests, not the server."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from adapters_store.peft_export import to_peft_files
from server.config import Settings, StartupError
from server.engine import Engine
from server.requests import EngineStepError, GenerationRequest, SamplingParams
from server.runner_process import ProcessRunner
from server.runtime import build_engine
from tests.support.engines import (
    ADAPTER_SPECS,
    TIMEOUT_S,
    Choice,
    assert_idle,
    generate,
    greedy,
    make_adapter,
    prompt,
    start_engine,
)


def mixed_requests() -> list[GenerationRequest]:
    """Greedy, seeded and penalised sampling, logprobs, two choices, every adapter and the base model, prompts of
    different lengths (several steps of prefill beside decodes)."""
    adapters = [None, *ADAPTER_SPECS]
    requests = [greedy(prompt(i, 5 + 7 * i), 30, adapters[i % len(adapters)], ignore_eos=True) for i in range(8)]
    requests.append(GenerationRequest(prompt(20, 9), SamplingParams(
        max_tokens=30, temperature=0.8, top_p=0.9, seed=5, logprobs=2, ignore_eos=True), n=2, adapter_id="a0"))
    requests.append(GenerationRequest(prompt(21, 30), SamplingParams(
        max_tokens=30, temperature=1.0, top_k=20, seed=6, presence_penalty=0.5, frequency_penalty=0.3,
        logit_bias=((65, 3.0),), ignore_eos=True), adapter_id="a2"))
    return requests


def engines(**settings) -> tuple[Engine, Engine]:
    """The same adapters in an engine with its own model runner and in one with a worker process."""
    local = start_engine({}, **settings)
    adapters = {a: make_adapter(a, local.args, *spec, seed=10 + i) for i, (a, spec) in enumerate(ADAPTER_SPECS.items())}
    for adapter in adapters.values():
        local.registry.add(adapter)
    return local, start_engine(adapters, model_runner_process=True, **settings)


def tokens(outputs: list[list[Choice]]) -> list[list[tuple]]:
    return [[(c.token_ids, c.text, c.finish_reason, [(lp.token_id, round(lp.logprob, 4)) for lp in c.logprobs])
             for c in choices] for choices in outputs]


@pytest.mark.parametrize("settings", [{}, {"kv_cache_tokens": 256, "max_gpu_adapters": 2}],
                         ids=["roomy", "preempting and evicting"])
def test_a_worker_process_gives_every_request_what_the_engines_own_runner_gives(settings: dict) -> None:
    local, worker = engines(**settings)
    try:
        assert isinstance(worker.runner, ProcessRunner) and not isinstance(local.runner, ProcessRunner)
        expected = tokens(generate(local, mixed_requests()))
        assert tokens(generate(worker, mixed_requests())) == expected
        assert tokens(generate(worker, mixed_requests())) == expected  # its mirrors of finished sequences are gone
        if settings:
            assert worker.stats().preemptions > 0 and worker.stats().adapter_evictions > 0
        assert_idle(worker)
        assert worker.readiness_problems() == []
    finally:
        local.shutdown()
        worker.shutdown()
    assert not worker.runner._process.is_alive()


def test_a_replaced_adapter_reaches_the_worker() -> None:
    engine = start_engine({}, model_runner_process=True)
    try:
        engine.registry.add(make_adapter("a1", engine.args, *ADAPTER_SPECS["a1"], seed=1))
        request = greedy(prompt(3, 8), 10, "a1")
        (before,) = generate(engine, [request])
        engine.registry.replace("a1", *to_peft_files(make_adapter("a1", engine.args, *ADAPTER_SPECS["a1"], seed=2)))
        (after,) = generate(engine, [request])
        assert before[0].token_ids != after[0].token_ids
    finally:
        engine.shutdown()


def test_a_dead_worker_fails_requests_and_readiness_and_the_engine_goes_on_answering() -> None:
    engine = start_engine({}, model_runner_process=True)
    try:
        os.kill(engine.runner._process.pid, signal.SIGKILL)
        engine.runner._process.join(TIMEOUT_S)
        with pytest.raises(EngineStepError, match="engine failed on this request"):
            generate(engine, [greedy(prompt(1, 4), 4)])
        assert any("model runner process exited" in problem for problem in engine.readiness_problems())
    finally:
        engine.shutdown()


def test_a_setting_the_worker_cannot_start_with_is_a_startup_error_naming_its_flag() -> None:
    with pytest.raises(StartupError, match="--max-model-len"):
        build_engine(Settings(device="cpu", max_model_len=10**6, model_runner_process=True))


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads the process tree from /proc (Linux)")
def test_the_worker_ends_with_its_server_and_ignores_the_signals_the_server_handles(start_server) -> None:
    """SIGTERM reaches a whole process group under many supervisors: the worker leaves it to the server, which
    drains with it. A server killed outright (no chance to close the pipe) takes its worker along: no orphan keeps
    the model's memory."""
    server = start_server(drain_timeout=5)
    pid = server.process.pid
    children = [int(child) for task in os.listdir(f"/proc/{pid}/task")
                for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    # Beside multiprocessing's resource tracker: the child it spawned.
    (worker,) = [child for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]
    os.kill(worker, signal.SIGTERM)
    os.kill(worker, signal.SIGINT)
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=TIMEOUT_S)
    assert response.status_code == 200 and _alive(worker)
    os.kill(pid, signal.SIGKILL)
    server.process.wait()
    deadline = time.monotonic() + TIMEOUT_S
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)
