"""The real Engine, in process, on the embedded demo model with synthetic LoRA adapters.

Every output is checked against an independent answer: the same request sent alone, the same prompt
through `transformers` with the adapter merged into the weights, or a property of the request itself
(seed, stop string, max_tokens, logit bias). Each test ends by checking that the engine gave back every KV
block and every adapter-slot pin.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from adapters_store import TARGET_MODULES, LoraAdapter
from server.api import build_app
from server.checkpoint import save_checkpoint
from server.config import Settings
from server.engine import Engine, EngineStepError, RequestStream
from server.requests import (
    AdapterBrokenError,
    AdapterNotFoundError,
    GenerationRequest,
    RequestError,
    SamplingParams,
)
from server.runtime import build_engine
from tests.support.engines import (
    ADAPTER_SPECS,
    ATTENTION,
    ENGINE_SETTINGS,
    TIMEOUT_S,
    Choice,
    assert_idle,
    collect,
    generate,
    generate_one,
    greedy,
    make_adapter,
    prompt,
    start_engine,
)
from tests.support.openai_schema import assert_valid

# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def adapters() -> dict[str, LoraAdapter]:
    from server.demo import build_demo_model

    args = build_demo_model()[0].args
    return {
        **{adapter_id: make_adapter(adapter_id, args, rank, alpha, targets, seed=100 + i)
           for i, (adapter_id, (rank, alpha, targets)) in enumerate(ADAPTER_SPECS.items())},
        # One of each other kind, for the tests that preempt and recompute (a soft prompt's positions included).
        "dora": make_adapter("dora", args, 8, 16.0, TARGET_MODULES, seed=120, kind="dora"),
        "ia3": make_adapter("ia3", args, 0, 0.0, ("k_proj", "v_proj", "down_proj"), seed=121, std=0.3, kind="ia3"),
        "soft": make_adapter("soft", args, 6, 0.0, (), seed=122, std=0.5, kind="prompt"),
    }


@pytest.fixture(scope="module")
def engine(adapters: dict[str, LoraAdapter]) -> Iterator[Engine]:
    """The shared engine: 96 KV blocks of 16 tokens, 8 adapter slots of rank up to 16."""
    engine = start_engine(adapters)
    yield engine
    engine.shutdown()


@pytest.fixture
def make_engine(adapters: dict[str, LoraAdapter]) -> Iterator[Callable[..., Engine]]:
    """Start an engine with other settings (shut down at teardown)."""
    started: list[Engine] = []

    def make(**settings: Any) -> Engine:
        started.append(start_engine(adapters, **settings))
        return started[-1]

    yield make
    for engine in started:
        engine.shutdown()


@pytest.fixture(scope="module")
def alone(engine: Engine) -> Callable[[GenerationRequest], Choice]:
    """The single choice a request gives when it is the only one in the shared engine (memoized)."""
    cache: dict[GenerationRequest, Choice] = {}

    def run_alone(request: GenerationRequest) -> Choice:
        if request not in cache:
            assert not engine.scheduler.has_work()
            cache[request] = generate_one(engine, request)
        return cache[request]

    return run_alone


# ------------------------------------------------------------------------------ LoRA math, batching


def merged_transformers_model(engine: Engine, adapter: LoraAdapter | None, directory: Path) -> Any:
    """The demo model in `transformers`, with W' = W + scale * B @ A merged into every target projection."""
    transformers = pytest.importorskip("transformers")
    save_checkpoint(engine.runner.model, directory)
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    if adapter is not None:
        with torch.no_grad():
            for (layer, name), weight in adapter.weights.items():
                block = hf.model.layers[layer]
                module = getattr(block.self_attn if name in ATTENTION else block.mlp, name)
                module.weight += weight.scale * (weight.b @ weight.a)
    return hf


@pytest.mark.parametrize("adapter_id", [None, "a0", "a1", "a2"])
def test_lora_math_matches_merged_weights_in_transformers(
    engine: Engine, adapters: dict[str, LoraAdapter], tmp_path: Path, adapter_id: str | None
) -> None:
    prompt_ids = prompt(1, 23)
    max_tokens = 24
    hf = merged_transformers_model(engine, adapters.get(adapter_id or ""), tmp_path)
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        expected = hf.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )[0, len(prompt_ids) :].tolist()

    got = generate_one(engine, greedy(prompt_ids, max_tokens, adapter_id, ignore_eos=True))
    assert got.token_ids == expected
    assert got.finish_reason == "length"
    assert_idle(engine)


def test_mixed_batch_equals_each_request_alone(
    engine: Engine, alone: Callable[[GenerationRequest], Choice]
) -> None:
    adapter_cycle = [None, "a0", "a1", "a2", "a3"]
    requests = [
        greedy(prompt(10 + i, 3 + 5 * i), max_tokens=5 + (7 * i) % 23, adapter=adapter_cycle[i % 5])
        for i in range(12)
    ]
    expected = [alone(r) for r in requests]
    steps_before = engine.steps
    got = generate(engine, requests)
    assert [c[0].token_ids for c in got] == [e.token_ids for e in expected]
    assert [c[0].finish_reason for c in got] == [e.finish_reason for e in expected]
    assert [c[0].text for c in got] == [e.text for e in expected]
    # The requests really did share steps.
    assert engine.steps - steps_before < sum(len(e.token_ids) for e in expected)
    assert_idle(engine)


@pytest.mark.parametrize("adapter_id", list(ADAPTER_SPECS))
def test_every_adapter_changes_the_output(
    alone: Callable[[GenerationRequest], Choice], adapter_id: str
) -> None:
    prompt_ids = prompt(3, 17)
    base = alone(greedy(prompt_ids, 16, ignore_eos=True))
    tuned = alone(greedy(prompt_ids, 16, adapter_id, ignore_eos=True))
    assert tuned.token_ids != base.token_ids


def test_more_adapters_than_slots(
    make_engine: Callable[..., Engine], alone: Callable[[GenerationRequest], Choice]
) -> None:
    requests = [
        greedy(prompt(20 + i, 4 + 3 * i), max_tokens=6 + i % 4, adapter=f"a{i % 5}", ignore_eos=True)
        for i in range(10)
    ]
    expected = [alone(r).token_ids for r in requests]
    engine = make_engine(max_gpu_adapters=2)
    got = generate(engine, requests)
    assert [c[0].token_ids for c in got] == expected
    assert engine.pool.evictions > 0
    assert_idle(engine)


def test_kv_cache_pressure_preempts_and_recovers(
    make_engine: Callable[..., Engine], alone: Callable[[GenerationRequest], Choice]
) -> None:
    # 16 blocks of 16 tokens; the 8 requests need 8 * 4 to 8 * 6 blocks at their longest.
    adapter_cycle = [None, "a0", "dora", "soft", "a2", "ia3", "a4"]
    requests = [
        greedy(prompt(30 + i, 20 + 3 * i), max_tokens=40 + i, adapter=adapter_cycle[i % 7], ignore_eos=True)
        for i in range(7)
    ]
    # And one seeded sampled request: its draws must not depend on being preempted and recomputed.
    sampled = SamplingParams(max_tokens=45, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True)
    requests.append(GenerationRequest(prompt(38, 25), sampled, adapter_id="a1"))
    expected = [alone(r).token_ids for r in requests]
    engine = make_engine(kv_cache_tokens=256, block_size=16)
    got = generate(engine, requests)
    assert [c[0].token_ids for c in got] == expected
    assert [c[0].finish_reason for c in got] == ["length"] * len(requests)
    assert engine.scheduler.num_preemptions > 0
    assert_idle(engine)


def test_chunked_prefill_matches_one_shot_prefill(
    make_engine: Callable[..., Engine], alone: Callable[[GenerationRequest], Choice]
) -> None:
    requests = [
        greedy(prompt(40, 200), 12, ignore_eos=True),
        greedy(prompt(41, 200), 12, "a0", ignore_eos=True),
    ]
    expected = [alone(r).token_ids for r in requests]
    engine = make_engine(max_num_batched_tokens=32)
    for request, want in zip(requests, expected, strict=True):
        steps_before = engine.steps
        assert generate_one(engine, request).token_ids == want
        assert engine.steps - steps_before >= -(-200 // 32) + 11  # the prompt really went in 32-token chunks
    # Both at once: one's chunks interleave with the other's.
    assert [c[0].token_ids for c in generate(engine, requests)] == expected
    assert_idle(engine)


# ----------------------------------------------------------------------------------- refused requests


@pytest.mark.parametrize(
    ("prompt_ids", "max_tokens", "param", "code"),
    [
        # 100 + 1500 = 1600 > the 1536 tokens of KV cache, though within max_model_len.
        pytest.param(prompt(50, 100), 1500, "max_tokens", None, id="exceeds-kv-cache"),
        # 100 + 1949 = 2049 > max_model_len (2048).
        pytest.param(
            prompt(50, 100), 1949, "max_tokens", "context_length_exceeded", id="exceeds-max-model-len"
        ),
        pytest.param((), 4, "prompt", None, id="empty-prompt"),
        pytest.param((1, 2, -1), 4, "prompt", None, id="negative-token-id"),
        pytest.param((1, 2, 260), 4, "prompt", None, id="token-id-past-vocab"),
    ],
)
def test_invalid_requests_are_refused_at_submit(
    engine: Engine, prompt_ids: tuple[int, ...], max_tokens: int, param: str, code: str | None
) -> None:
    assert engine.tokenizer.vocab_size == 260 and engine.max_model_len == 2048

    async def submit() -> None:
        engine.submit(greedy(prompt_ids, max_tokens))

    with pytest.raises(RequestError) as excinfo:
        asyncio.run(submit())
    assert type(excinfo.value) is RequestError
    assert (excinfo.value.param, excinfo.value.code) == (param, code)
    assert_idle(engine)


def test_request_filling_the_whole_kv_cache_is_accepted(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(kv_cache_tokens=256, block_size=16)

    async def submit(max_tokens: int) -> None:
        engine.submit(greedy(prompt(52, 100), max_tokens))

    with pytest.raises(RequestError):
        asyncio.run(submit(157))  # one token more than the cache holds
    choice = generate_one(engine, greedy(prompt(52, 100), 156, ignore_eos=True))
    assert len(choice.token_ids) == 156 and choice.finish_reason == "length"
    assert_idle(engine)


def test_unknown_adapter_is_refused_at_submit(engine: Engine) -> None:
    async def submit() -> None:
        engine.submit(greedy(prompt(51, 5), 4, "no-such-adapter"))

    with pytest.raises(AdapterNotFoundError) as excinfo:
        asyncio.run(submit())
    assert excinfo.value.adapter_id == "no-such-adapter"


# ------------------------------------------------------------------------------------------- sampling


def test_seed_reproduces_tokens(engine: Engine) -> None:
    def sampled(seed: int) -> GenerationRequest:
        params = SamplingParams(
            max_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True
        )
        return GenerationRequest(prompt(60, 11), params, adapter_id="a3")

    first = generate_one(engine, sampled(1234))
    assert generate_one(engine, sampled(1234)).token_ids == first.token_ids
    assert generate_one(engine, sampled(4321)).token_ids != first.token_ids
    # Whatever else shares the batch.
    others = [greedy(prompt(61 + i, 9 + i), 20, f"a{i}") for i in range(3)]
    assert generate(engine, [*others, sampled(1234)])[-1][0].token_ids == first.token_ids
    assert_idle(engine)


def test_n_choices_with_a_seed(engine: Engine) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    request = GenerationRequest(prompt(62, 8), params, n=3, adapter_id="a1")
    (choices,) = generate(engine, [request])
    assert len(choices) == 3
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in choices)
    assert len({tuple(c.token_ids) for c in choices}) > 1  # independent draws
    (again,) = generate(engine, [request])
    assert [c.token_ids for c in again] == [c.token_ids for c in choices]
    assert_idle(engine)


def test_temperature_zero_is_greedy(engine: Engine, alone: Callable[[GenerationRequest], Choice]) -> None:
    prompt_ids = prompt(63, 14)
    plain = alone(greedy(prompt_ids, 16, "a2", ignore_eos=True)).token_ids
    # Sampling knobs do nothing at temperature 0...
    knobs = greedy(prompt_ids, 16, "a2", ignore_eos=True, top_p=0.3, top_k=5, seed=11)
    assert generate_one(engine, knobs).token_ids == plain
    # ...and the sampling path cut to its single most likely token agrees with the argmax.
    top1 = SamplingParams(max_tokens=16, temperature=1.0, top_k=1, seed=12, ignore_eos=True)
    assert generate_one(engine, GenerationRequest(prompt_ids, top1, adapter_id="a2")).token_ids == plain
    assert_idle(engine)


def test_max_tokens_finishes_with_length(engine: Engine) -> None:
    params = SamplingParams(max_tokens=7, temperature=1.0, seed=3, ignore_eos=True)

    async def scenario() -> tuple[list[Choice], RequestStream]:
        stream = engine.submit(GenerationRequest(prompt(64, 9), params, adapter_id="a4"))
        return await asyncio.wait_for(collect(stream), TIMEOUT_S), stream

    (choice,), stream = asyncio.run(scenario())
    assert choice.finish_reason == "length"
    assert len(choice.token_ids) == 7
    assert stream.completion_tokens == 7 and stream.prompt_tokens == 9
    assert_idle(engine)


def test_stop_string(engine: Engine, alone: Callable[[GenerationRequest], Choice]) -> None:
    prompt_ids = prompt(65, 12)
    full = alone(greedy(prompt_ids, 48, "a0", ignore_eos=True)).text
    # A two-character ASCII stop string that first occurs after the start of the output.
    printable = {chr(c) for c in range(0x21, 0x7F)}
    starts = [i for i in range(1, len(full) - 1) if full[i] in printable and full[i + 1] in printable]
    assert starts, f"no printable pair in the greedy output {full!r}"
    stop = full[starts[0] : starts[0] + 2]
    cut = full.index(stop)

    choice = generate_one(engine, greedy(prompt_ids, 48, "a0", ignore_eos=True, stop=(stop,)))
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert choice.text == full[:cut]
    assert_idle(engine)


def test_stop_token_ids(engine: Engine, alone: Callable[[GenerationRequest], Choice]) -> None:
    prompt_ids = prompt(66, 12)
    full = alone(greedy(prompt_ids, 32, "a3", ignore_eos=True)).token_ids
    stop_id = full[10]
    cut = full.index(stop_id)
    choice = generate_one(engine, greedy(prompt_ids, 32, "a3", ignore_eos=True, stop_token_ids=(stop_id,)))
    assert choice.finish_reason == "stop"
    assert choice.token_ids == full[: cut + 1]
    assert_idle(engine)


def test_logit_bias_forces_a_token(engine: Engine) -> None:
    params = SamplingParams(
        max_tokens=12, temperature=1.0, seed=5, logit_bias=((65, 100.0),), ignore_eos=True
    )
    choice = generate_one(engine, GenerationRequest(prompt(67, 10), params, adapter_id="a0"))
    assert choice.token_ids == [65] * 12
    assert choice.text == "A" * 12
    assert_idle(engine)


def test_eos_stops_unless_ignored(engine: Engine) -> None:
    eos = min(engine.tokenizer.eos_token_ids)
    forced = SamplingParams(max_tokens=6, temperature=0.0, logit_bias=((eos, 100.0),))
    stopped = generate_one(engine, GenerationRequest(prompt(68, 10), forced))
    assert (stopped.token_ids, stopped.finish_reason, stopped.text) == ([eos], "stop", "")
    ignored = generate_one(engine, GenerationRequest(prompt(68, 10), replace(forced, ignore_eos=True)))
    assert (ignored.token_ids, ignored.finish_reason) == ([eos] * 6, "length")
    assert_idle(engine)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs(engine: Engine, temperature: float) -> None:
    params = SamplingParams(max_tokens=8, temperature=temperature, seed=8, logprobs=3, ignore_eos=True)
    choice = generate_one(engine, GenerationRequest(prompt(69, 10), params, adapter_id="a1"))
    assert len(choice.logprobs) == len(choice.token_ids) == 8
    for token_id, entry in zip(choice.token_ids, choice.logprobs, strict=True):
        assert entry.token_id == token_id
        assert len(entry.top) == 3
        top_ids, top_logprobs = zip(*entry.top, strict=True)
        assert len(set(top_ids)) == 3
        assert list(top_logprobs) == sorted(top_logprobs, reverse=True)  # most likely first
        assert all(lp <= 0.0 for lp in (entry.logprob, *top_logprobs))
        assert sum(torch.tensor(top_logprobs).exp()) <= 1.0 + 1e-6
        assert entry.logprob <= top_logprobs[0]
        if temperature == 0.0:
            assert top_ids[0] == token_id and entry.logprob == pytest.approx(top_logprobs[0])
    assert_idle(engine)


def test_a_request_for_whole_choices_gets_each_in_one_delta(engine: Engine) -> None:
    """What a non-streaming response asks for: the same choices as deltas would build, one delta each."""
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=5, logprobs=2, stop=["ab"], ignore_eos=True)
    incremental = GenerationRequest(prompt(80, 9), params, n=2, adapter_id="a1")

    async def deltas_of(request: GenerationRequest) -> list:
        return [delta async for delta in engine.submit(request)]

    deltas = asyncio.run(asyncio.wait_for(deltas_of(replace(incremental, incremental=False)), TIMEOUT_S))
    assert sorted(d.index for d in deltas) == [0, 1] and all(d.finish_reason for d in deltas)
    whole = {d.index: (d.text, d.token_ids, d.logprobs, d.finish_reason) for d in deltas}
    expected = generate(engine, [incremental])[0]
    assert [whole[i] for i in (0, 1)] == [(c.text, c.token_ids, c.logprobs, c.finish_reason) for c in expected]
    assert_idle(engine)


def test_an_aborted_request_for_whole_choices_leaves_nothing_held(engine: Engine) -> None:
    request = greedy(prompt(81, 12), 400, "a0", ignore_eos=True)

    async def scenario() -> None:
        stream = engine.submit(replace(request, incremental=False))
        steps = engine.steps
        while engine.steps < steps + 5:  # it has produced tokens, held back for the choice's end
            await asyncio.sleep(0.01)
        stream.abort()
        await collect(engine.submit(greedy(prompt(82, 4), 1)))  # the abort has been handled (inbox in order)

    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))
    assert engine._held == {}
    assert_idle(engine)


# ------------------------------------------------------------------------------- abort and failures


def test_abort_frees_blocks_and_slots(engine: Engine, alone: Callable[[GenerationRequest], Choice]) -> None:
    others = [
        greedy(prompt(70 + i, 6 + 4 * i), 10 + 3 * i, adapter, ignore_eos=True)
        for i, adapter in enumerate([None, "a1", "a2"])
    ]
    expected = [alone(r).token_ids for r in others]
    long_request = greedy(prompt(75, 30), 400, "a0", ignore_eos=True)
    received = 0

    async def scenario() -> list[list[Choice]]:
        nonlocal received
        long_stream = engine.submit(long_request)
        other_streams = [engine.submit(r) for r in others]
        engine.submit(greedy(prompt(76, 8), 50, "a4")).abort()  # aborted before it ever ran
        async for delta in long_stream:
            received += len(delta.token_ids)
            if received >= 5:
                long_stream.abort()
                break
        results = await asyncio.gather(*(collect(s) for s in other_streams))
        # The engine drains its inbox in order: once a request submitted after the aborts has finished, the
        # aborts have been handled.
        await collect(engine.submit(greedy(prompt(77, 4), 1)))
        return list(results)

    got = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))
    assert [c[0].token_ids for c in got] == expected
    assert 5 <= received < 400
    assert_idle(engine)


def test_failed_step_fails_only_its_batch(
    engine: Engine, alone: Callable[[GenerationRequest], Choice], monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = greedy(prompt(80, 12), 6, "a0")
    bystander = greedy(prompt(81, 9), 6, "a1")
    after = greedy(prompt(82, 7), 6, "a2")
    expected_bystander, expected_after = alone(bystander), alone(after)

    forward = engine.runner.model.forward
    calls = 0

    def fail_first_call(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected failure")
        return forward(*args, **kwargs)

    # One sequence per batch, so the bystander cannot share the failing step with the victim.
    monkeypatch.setattr(engine.scheduler, "max_num_seqs", 1)
    monkeypatch.setattr(engine.runner.model, "forward", fail_first_call)

    async def scenario() -> list[list[Choice] | BaseException]:
        streams = [engine.submit(victim), engine.submit(bystander)]
        gathered = asyncio.gather(*(collect(s) for s in streams), return_exceptions=True)
        return list(await asyncio.wait_for(gathered, TIMEOUT_S))

    victim_result, bystander_result = asyncio.run(scenario())
    assert isinstance(victim_result, EngineStepError)
    assert bystander_result == [expected_bystander]
    assert generate_one(engine, after) == expected_after
    assert calls > 1
    assert_idle(engine)


@pytest.mark.parametrize("stream", [False, True])
def test_failed_step_is_a_500_carrying_the_logged_error_id(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    """Over HTTP: the failed batch's request gets OpenAI's 500 body (in-band when streamed) naming the id under
    which the engine logged the cause with its traceback; the next request is served."""
    forward = engine.runner.model.forward
    calls = 0

    def fail_first_call(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.runner.model, "forward", fail_first_call)
    # ignore_eos: the served request must run to its length, whatever the sampled tokens.
    body = {"model": engine.model_name, "prompt": "hello", "max_tokens": 3, "stream": stream, "ignore_eos": True}
    with TestClient(build_app(engine), raise_server_exceptions=False) as client:
        failed = client.post("/v1/completions", json=body)
        if stream:
            assert failed.status_code == 200  # the headers went out before the step
            events = [line[len("data: "):] for line in failed.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])
        else:
            assert failed.status_code == 500
            error = failed.json()
        assert_valid(error, "ErrorResponse")
        assert error["error"]["type"] == "server_error" and "injected" not in error["error"]["message"]
        error_id = re.search(r"error id (\w+)", error["error"]["message"]).group(1)  # type: ignore[union-attr]
        [logged] = [r for r in caplog.records if error_id in r.getMessage()]
        assert logged.name == "lorahive.engine" and logged.exc_info is not None
        assert "injected failure" in str(logged.exc_info[1])
        served = client.post("/v1/completions", json=body | {"stream": False})
        assert served.status_code == 200 and served.json()["choices"][0]["finish_reason"] == "length"
    assert_idle(engine)


def test_adapter_that_cannot_be_loaded_fails_its_request_not_the_engine(
    make_engine: Callable[..., Engine], adapters: dict[str, LoraAdapter], tmp_path: Path
) -> None:
    """A stored adapter whose weights file got corrupted on disk: its request fails, the others run."""
    make_engine(store=tmp_path)  # stores a0..a4 in tmp_path
    weights = next((tmp_path / "a1").glob("v*/adapter_model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    # A fresh engine on the same store: nothing in host memory, the store is the only source of a1.
    engine = build_engine(Settings(**(ENGINE_SETTINGS | {"store": tmp_path})))
    engine.start()
    ok_request = greedy(prompt(90, 5), 4, "a3")

    async def scenario() -> list[Choice]:
        with pytest.raises(AdapterBrokenError, match="a1"):
            await asyncio.wait_for(collect(engine.submit(greedy(prompt(90, 5), 4, "a1"))), TIMEOUT_S)
        return await asyncio.wait_for(collect(engine.submit(ok_request)), TIMEOUT_S)

    try:
        (choice,) = asyncio.run(scenario())
        assert len(choice.token_ids) == 4
        assert engine.registry.version("a1").load_error is not None
        assert_idle(engine)
    finally:
        engine.shutdown()
