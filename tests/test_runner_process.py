"""`--model-runner-process`: the model runner in a worker process gives every request exactly what the in-process
runner gives (greedy and seeded sampling, penalties, logprobs, several choices, adapters loaded, replaced and
evicted, sequences preempted and recomputed), and a worker that fails or dies fails requests, not the server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from adapters_store.peft_export import to_peft_files
from server.api.app import build_app
from server.config import Settings, StartupError
from server.engine import Engine
from server.requests import EngineStepError, GenerationRequest, SamplingParams
from server.runner_process import ProcessRunner
from server.runtime import build_engine
from tests.support.engines import (
    ADAPTER_SPECS,
    ENGINE_SETTINGS,
    TIMEOUT_S,
    Choice,
    assert_idle,
    collect,
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
    """The same adapters in an engine with its own model runner and in one with a worker process, not started."""
    built = []
    for process in (False, True):
        engine = build_engine(Settings(**(ENGINE_SETTINGS | settings | {"model_runner_process": process})))
        built.append(engine)
        for i, (adapter_id, spec) in enumerate(ADAPTER_SPECS.items()):
            engine.registry.add(make_adapter(adapter_id, engine.args, *spec, seed=10 + i))
    return built[0], built[1]


def first_batch_whole(engine: Engine, requests: list[GenerationRequest]) -> list[list[Choice]]:
    """Every request queued before the engine starts, so both engines' steps hold the same sequences (a batch's
    floating-point sums depend on its size, and a sampled token at a near tie on them)."""
    async def run() -> list[list[Choice]]:
        streams = [engine.submit(request) for request in requests]
        engine.start()
        return list(await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), TIMEOUT_S))

    return asyncio.run(run())


def tokens(outputs: list[list[Choice]]) -> list[list[tuple]]:
    return [[(c.token_ids, c.text, c.finish_reason, [(lp.token_id, round(lp.logprob, 4)) for lp in c.logprobs])
             for c in choices] for choices in outputs]


@pytest.mark.parametrize("settings", [
    {}, {"kv_cache_tokens": 256, "max_gpu_adapters": 2},
    pytest.param({"device": "cuda", "kv_cache_tokens": 256, "max_gpu_adapters": 2}, marks=pytest.mark.gpu),
], ids=["roomy", "preempting and evicting", "cuda, preempting and evicting"])
def test_a_worker_process_gives_every_request_what_the_engines_own_runner_gives(settings: dict) -> None:
    local, worker = engines(**settings)
    try:
        assert isinstance(worker.runner, ProcessRunner) and not isinstance(local.runner, ProcessRunner)
        expected = tokens(first_batch_whole(local, mixed_requests()))
        assert tokens(first_batch_whole(worker, mixed_requests())) == expected
        # The worker reports the stacks its batches were read from, as the engine's own runner does (none in pages).
        stack_bytes = local.stats().adapter_stack_bytes
        assert worker.stats().adapter_stack_bytes == stack_bytes and (stack_bytes > 0) == (local.runner.paged is False)
        if settings:
            assert worker.stats().preemptions > 0 and worker.stats().adapter_evictions > 0
        # Again on the running worker (its mirrors of finished sequences are gone): the greedy requests, whose
        # tokens no batch changes.
        greedy_requests = mixed_requests()[:8]
        assert [c[0].token_ids for c in generate(worker, greedy_requests)] == [c[0][0] for c in expected[:8]]
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


def test_a_dead_worker_fails_requests_readiness_and_liveness_and_the_engine_goes_on_answering() -> None:
    engine = start_engine({}, model_runner_process=True)
    try:
        os.kill(engine.runner._process.pid, signal.SIGKILL)
        engine.runner._process.join(TIMEOUT_S)
        with pytest.raises(EngineStepError, match="engine failed on this request"):
            generate(engine, [greedy(prompt(1, 4), 4)])
        assert any("model runner process exited" in problem for problem in engine.readiness_problems())
        with TestClient(build_app(engine)) as client:  # a liveness probe restarts it; a readiness one stops traffic
            health, ready = client.get("/health"), client.get("/ready")
        assert health.status_code == 503 and "model runner process exited" in health.json()["reasons"][0]
        assert ready.status_code == 503
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


def test_a_process_that_never_shut_its_engine_down_still_exits() -> None:
    """multiprocessing's exit hook would terminate the worker with the SIGTERM it ignores and wait for it forever;
    the runner closes it first."""
    script = "from server.config import Settings; from server.runtime import build_engine; " \
             "build_engine(Settings(device='cpu')).start()"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=TIMEOUT_S,
                          env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr.decode()[-2000:]
