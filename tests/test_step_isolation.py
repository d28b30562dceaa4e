"""One sequence that makes an engine step fail fails alone: the batch is retried without it, and every other
sequence gets exactly the tokens it gets when run alone, with the KV cache, adapter pins and seeded
generators as if the failed attempt never happened. Values the sampler cannot take are refused at submit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import server.model_runner
from server.engine import Engine, EngineStepError
from server.requests import GenerationRequest, RequestError, SamplingParams
from server.sampling import SamplerState
from server.tokenizer import IncrementalDetokenizer
from tests.support.engines import (
    ADAPTER_SPECS,
    TIMEOUT_S,
    Choice,
    assert_idle,
    collect,
    generate_one,
    greedy,
    make_adapter,
    prompt,
    start_engine,
)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    from server.demo import build_demo_model

    args = build_demo_model()[0].args
    adapters = {
        adapter_id: make_adapter(adapter_id, args, *ADAPTER_SPECS[adapter_id], seed=200 + i)
        for i, adapter_id in enumerate(("a0", "a1"))
    }
    engine = start_engine(adapters)
    yield engine
    engine.shutdown()


def sampled(prompt_ids: tuple[int, ...], max_tokens: int, adapter: str | None = None) -> GenerationRequest:
    return GenerationRequest(prompt_ids, SamplingParams(max_tokens, temperature=0.9, seed=7), adapter_id=adapter)


# Greedy and seeded sampled requests, with and without adapters, one with two choices: each must come out of
# a batch that held the culprit exactly as it comes out alone.
BYSTANDERS = [
    greedy(prompt(300, 11), 9, "a0"),
    greedy(prompt(301, 17), 12),
    sampled(prompt(302, 8), 10, "a1"),
    GenerationRequest(prompt(303, 5), SamplingParams(max_tokens=8, temperature=1.2, seed=3), n=2),
    sampled(prompt(304, 21), 7),
]


def run_with_culprit(
    engine: Engine, culprit: GenerationRequest
) -> tuple[list[Choice] | BaseException, list[list[Choice] | BaseException]]:
    """Submit the culprit between the bystanders, all at once, and collect every result (or its error)."""
    requests = [*BYSTANDERS[:2], culprit, *BYSTANDERS[2:]]

    async def scenario() -> list[list[Choice] | BaseException]:
        streams = [engine.submit(r) for r in requests]
        gathered = asyncio.gather(*(collect(s) for s in streams), return_exceptions=True)
        return list(await asyncio.wait_for(gathered, TIMEOUT_S))

    results = asyncio.run(scenario())
    return results.pop(2), results


def alone_results(engine: Engine) -> list[list[Choice]]:
    async def one_at_a_time() -> list[list[Choice]]:
        return [await asyncio.wait_for(collect(engine.submit(r)), TIMEOUT_S) for r in BYSTANDERS]

    return asyncio.run(one_at_a_time())


@pytest.mark.parametrize("fails_at_token", [0, 3], ids=["at-its-first-token", "mid-decode"])
@pytest.mark.parametrize("culprit_n", [1, 2])
def test_a_sampler_failing_on_one_sequence_fails_only_its_request(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, fails_at_token: int, culprit_n: int
) -> None:
    expected = alone_results(engine)
    culprit = GenerationRequest(prompt(310, 13), SamplingParams(max_tokens=10, temperature=0.7, seed=1), n=culprit_n)
    real_sample = server.model_runner.sample
    shared_failures = 0

    def sample_failing_on_culprit(logits: Any, states: list[SamplerState]) -> Any:
        # Sample first, so the failed attempt has advanced every generator of the batch, as a real failure late
        # in sampling would; the retry must draw the same numbers anyway.
        nonlocal shared_failures
        result = real_sample(logits, states)
        if any(s.params is culprit.params and len(s.output_ids) == fails_at_token for s in states):
            shared_failures += len(states) > 1
            raise OverflowError("Overflow when unpacking long long")
        return result

    monkeypatch.setattr(server.model_runner, "sample", sample_failing_on_culprit)
    culprit_result, results = run_with_culprit(engine, culprit)

    assert isinstance(culprit_result, EngineStepError)
    assert results == expected
    assert shared_failures > 0, "the culprit never shared a step with the others: nothing was isolated"
    assert_idle(engine)


def test_a_sequence_whose_token_cannot_be_detokenized_fails_alone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = alone_results(engine)
    marker = "\x00culprit"
    push = IncrementalDetokenizer.push

    def push_failing_on_culprit(self: IncrementalDetokenizer, token_id: int) -> tuple[str, bool]:
        if marker in self._stops:
            raise UnicodeError("injected detokenizer failure")
        return push(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "push", push_failing_on_culprit)
    culprit = greedy(prompt(311, 6), 5, stop=(marker,))
    culprit_result, results = run_with_culprit(engine, culprit)

    assert isinstance(culprit_result, EngineStepError)
    assert results == expected
    assert_idle(engine)


@pytest.mark.parametrize(
    ("params", "n", "param"),
    [
        pytest.param({"max_tokens": 0}, 1, "max_tokens", id="no-max-tokens"),
        pytest.param({"temperature": -0.5}, 1, "temperature", id="negative-temperature"),
        pytest.param({"temperature": float("nan")}, 1, "temperature", id="nan-temperature"),
        pytest.param({"top_p": 0.0}, 1, "top_p", id="zero-top-p"),
        pytest.param({"top_p": float("nan")}, 1, "top_p", id="nan-top-p"),
        pytest.param({"top_k": -1}, 1, "top_k", id="negative-top-k"),
        pytest.param({"presence_penalty": float("inf")}, 1, "presence_penalty", id="infinite-penalty"),
        pytest.param({"logit_bias": ((260, 1.0),)}, 1, "logit_bias", id="bias-past-vocab"),
        pytest.param({"logit_bias": ((-1, 1.0),)}, 1, "logit_bias", id="bias-negative-token"),
        pytest.param({"logit_bias": ((5, float("nan")),)}, 1, "logit_bias", id="nan-bias"),
        pytest.param({"logprobs": 261}, 1, "logprobs", id="more-logprobs-than-vocab"),
        pytest.param({}, 0, "n", id="no-choices"),
    ],
)
def test_submit_refuses_values_the_sampler_cannot_take(
    engine: Engine, params: dict[str, Any], n: int, param: str
) -> None:
    assert engine.tokenizer.vocab_size == 260
    request = GenerationRequest(prompt(320, 4), SamplingParams(**({"max_tokens": 4} | params)), n=n)

    async def submit() -> None:
        engine.submit(request)

    with pytest.raises(RequestError) as excinfo:
        asyncio.run(submit())
    assert excinfo.value.param == param
    assert len(engine.waiting_quota) == 0  # nothing queued
    assert_idle(engine)


def test_top_k_beyond_the_vocabulary_keeps_every_token(engine: Engine) -> None:
    """2**64 does not fit a tensor of int64; as a cut it keeps everything, like no cut."""
    request: Callable[[int], GenerationRequest] = lambda top_k: GenerationRequest(  # noqa: E731
        prompt(321, 9), SamplingParams(max_tokens=8, temperature=1.0, seed=11, top_k=top_k)
    )
    assert generate_one(engine, request(2**64)) == generate_one(engine, request(0))
    assert_idle(engine)
