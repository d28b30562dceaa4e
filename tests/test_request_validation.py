"""What a generation request may carry, and what the answer says it did.

Against `FakeEngine`: `model` / `adapter_id` resolution and the `model` a response names; fields OpenAI does not
define (400 `unknown_parameter`), fields it defines that change nothing here (accepted) and ones we cannot honour
(400); every numeric field at extremes a JSON body can hold; the `logit_bias` map canonicalised and bounded; a 4xx
never without a `code`. Against the real engine (demo model, raw JSON bytes over a socket): lone UTF-16 surrogates in
any string field, and values at the edges of validation, which must generate rather than fail the engine step.
Against the sampler: the batched `logit_bias` add equals the per-entry definition, and a tiny top_p or temperature
still picks the most likely token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from server.api.protocol import MAX_LOGIT_BIAS, MAX_TOKEN_ID
from server.config import Settings
from server.requests import RequestError, SamplingParams
from server.sampling import SamplerState, _adjust_logits, sample
from tests.support.fake_engine import FakeEngine
from tests.support.openai_http import BASE, USER_HI, assert_error, chat, completion, only_params, stream_chunks
from tests.support.servers import serving_engine

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def assert_client_error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    """`assert_error`, and `code` a non-empty string whatever the cause."""
    error = assert_error(response, status, param, code)
    assert isinstance(error["code"], str) and error["code"], error
    return error


def post_raw(client: TestClient | httpx.Client, path: str, raw_json: str) -> httpx.Response:
    """POST the JSON text as written: escapes like \\ud800 reach the server's parser untouched."""
    return client.post(path, content=raw_json.encode("ascii"), headers={"content-type": "application/json"})


# --------------------------------------------------------------------------------------------------
# `model` and `adapter_id`


@pytest.mark.parametrize("endpoint", [completion, chat])
def test_model_and_adapter_id_naming_different_adapters_is_a_400(
    fake_api: TestClient, fake_engine: FakeEngine, endpoint: Any
) -> None:
    error = assert_client_error(endpoint(fake_api, model="alpha", adapter_id="beta"), 400, "adapter_id")
    assert error["code"] == "conflicting_parameters"
    assert all(word in error["message"] for word in ("'model'", "'adapter_id'", "alpha", "beta"))
    assert fake_engine.requests == []


@pytest.mark.parametrize("endpoint", [completion, chat])
def test_unknown_model_with_an_adapter_id_is_a_404(
    fake_api: TestClient, fake_engine: FakeEngine, endpoint: Any
) -> None:
    assert_client_error(endpoint(fake_api, model="nope", adapter_id="beta"), 404, "model", "model_not_found")
    assert fake_engine.requests == []


@pytest.mark.parametrize(
    ("fields", "served"),
    [
        ({"model": BASE, "adapter_id": "beta"}, "beta"),
        ({"model": "beta", "adapter_id": "beta"}, "beta"),
        ({"model": None, "adapter_id": "beta"}, "beta"),
        ({"model": "alpha"}, "alpha"),
        ({"model": None}, BASE),  # `model` may be left out: the base model
    ],
)
def test_response_model_is_what_served(
    fake_api: TestClient, fake_engine: FakeEngine, fields: dict, served: str
) -> None:
    body = {"prompt": "hi", "max_tokens": 2, **fields}
    assert fake_api.post(COMPLETIONS, json=body).json()["model"] == served
    chunks = stream_chunks(fake_api.post(COMPLETIONS, json=body | {"stream": True}), "CreateCompletionStreamResponse")
    assert {chunk["model"] for chunk in chunks} == {served}
    chat_body = {"messages": [USER_HI], "max_tokens": 2, **fields}
    assert fake_api.post(CHAT, json=chat_body).json()["model"] == served
    expected_adapter = None if served == BASE else served
    assert [r.adapter_id for r in fake_engine.requests] == [expected_adapter] * 3


# --------------------------------------------------------------------------------------------------
# Which fields a request may carry


@pytest.mark.parametrize(
    ("path", "body", "param", "suggestion"),
    [
        (COMPLETIONS, {"prompt": "hi", "max_token": 3}, "max_token", "max_tokens"),
        (COMPLETIONS, {"prompt": "hi", "temprature": 0}, "temprature", "temperature"),
        (COMPLETIONS, {"prompt": "hi", "min_tokens": 3}, "min_tokens", None),  # vLLM's, not implemented here
        (COMPLETIONS, {"prompt": "hi", "metadata": {"a": "b"}}, "metadata", None),  # chat's, not completions'
        (COMPLETIONS, {"prompt": "hi", "messages": [USER_HI]}, "messages", None),
        (COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usag": True}}, "stream_options.include_usag", None),
        (CHAT, {"messages": [USER_HI], "max_completion_token": 3}, "max_completion_token", "max_completion_tokens"),
        (CHAT, {"messages": [USER_HI], "prompt": "hi"}, "prompt", None),
        (CHAT, {"messages": [USER_HI | {"nmae": "x"}]}, "messages.0.nmae", None),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]},
         "messages.0.content.0.x", None),
    ],
)
def test_unknown_fields_are_a_400_naming_them(
    fake_api: TestClient, fake_engine: FakeEngine, path: str, body: dict, param: str, suggestion: str | None
) -> None:
    error = assert_client_error(fake_api.post(path, json=body), 400, param, "unknown_parameter")
    assert f"'{param}'" in error["message"]
    if suggestion is not None:
        assert f"Did you mean '{suggestion}'?" in error["message"]
    assert fake_engine.requests == []


def test_openai_fields_that_change_nothing_are_accepted(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    plain = chat(fake_api, max_tokens=3)
    ignored = {
        "user": "u-1", "metadata": {"team": "search"}, "store": False, "service_tier": "auto",
        "safety_identifier": "s-1", "prompt_cache_key": "k", "prompt_cache_retention": "in_memory",
        "prompt_cache_options": {"ttl": "30m"}, "prediction": {"type": "content", "content": "abc"},
        "parallel_tool_calls": False, "modalities": ["text"],
        "stream_options": {"include_usage": False, "include_obfuscation": True},
    }
    part = {"type": "text", "text": "hi", "prompt_cache_breakpoint": {"mode": "explicit"}}
    message = {"role": "user", "content": [part]}
    replayed = {"role": "assistant", "content": "ok", "refusal": None, "tool_call_id": None}
    accepted = chat(fake_api, max_tokens=3, messages=[USER_HI, replayed, message], **ignored)
    assert plain.status_code == accepted.status_code == 200, accepted.text
    assert fake_engine.requests[0].params == fake_engine.requests[1].params
    assert completion(fake_api, user="u-1").status_code == 200


def test_an_assistant_refusal_is_its_text(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    refused = {"role": "assistant", "content": None, "refusal": "I cannot."}
    answered = {"role": "assistant", "content": "I cannot."}
    for history in (refused, answered):
        assert chat(fake_api, messages=[USER_HI, history, USER_HI]).status_code == 200
    assert fake_engine.requests[0].prompt_token_ids == fake_engine.requests[1].prompt_token_ids


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"verbosity": "low"}, "verbosity"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
        ({"messages": [USER_HI, {"role": "assistant", "audio": {"id": "a1"}}]}, "messages.1.audio"),
    ],
)
def test_openai_fields_we_cannot_honour_are_a_400(
    fake_api: TestClient, fake_engine: FakeEngine, fields: dict, param: str
) -> None:
    error = assert_client_error(chat(fake_api, **fields), 400, param)
    assert error["code"] in {"unsupported_parameter", "unsupported_value"}
    assert fake_engine.requests == []


def test_extensions_are_accepted(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    response = completion(fake_api, adapter_id="alpha", top_k=5, stop_token_ids=[7], include_stop_str_in_output=True,
                          ignore_eos=True)
    assert response.status_code == 200, response.text
    assert only_params(fake_engine).top_k == 5 and only_params(fake_engine).stop_token_ids == (7,)


# --------------------------------------------------------------------------------------------------
# Every number bounded to what the engine takes

HUGE = [str(2**64), str(-(2**63) - 1), "1e308", "-1e308", "NaN", "Infinity", "-Infinity", "1e400"]
COMPLETION_NUMBERS = ["n", "best_of", "max_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty",
                      "frequency_penalty", "logprobs"]
CHAT_NUMBERS = ["max_completion_tokens", "max_tokens"]


def _numeric_cases() -> Iterator[tuple[str, str, str]]:
    for value in HUGE:
        for field in COMPLETION_NUMBERS:
            yield COMPLETIONS, f'{{"prompt": "hi", "{field}": {value}}}', field
        for field in CHAT_NUMBERS:
            yield CHAT, f'{{"messages": [{{"role": "user", "content": "hi"}}], "{field}": {value}}}', field
        top = f'{{"messages": [{{"role": "user", "content": "hi"}}], "logprobs": true, "top_logprobs": {value}}}'
        yield CHAT, top, "top_logprobs"
        yield COMPLETIONS, f'{{"prompt": "hi", "stop_token_ids": [{value}]}}', "stop_token_ids"
        yield COMPLETIONS, f'{{"prompt": "hi", "logit_bias": {{"7": {value}}}}}', "logit_bias"
        yield COMPLETIONS, f'{{"prompt": [{value}]}}', "prompt"


@pytest.mark.parametrize(("path", "raw", "field"), list(_numeric_cases()))
def test_extreme_numbers_are_a_400_naming_the_field(
    fake_api: TestClient, fake_engine: FakeEngine, path: str, raw: str, field: str
) -> None:
    response = post_raw(fake_api, path, raw)
    assert response.status_code == 400, response.text
    param = response.json()["error"]["param"]
    assert param == field or param.startswith(field + "."), response.text
    assert_client_error(response, 400, param)
    assert fake_engine.requests == []


def test_top_k_is_bounded(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    assert_client_error(completion(fake_api, top_k=MAX_TOKEN_ID + 1), 400, "top_k", "invalid_value")
    assert completion(fake_api, top_k=MAX_TOKEN_ID).status_code == 200
    assert only_params(fake_engine).top_k == MAX_TOKEN_ID


def test_stop_token_ids_are_bounded(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    assert_client_error(completion(fake_api, stop_token_ids=[1] * 257), 400, "stop_token_ids")
    assert completion(fake_api, stop_token_ids=[1] * 256).status_code == 200


# --------------------------------------------------------------------------------------------------
# logit_bias: canonical token ids, a bounded map, applied in one indexed add


def test_logit_bias_keys_are_canonical_token_ids(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    assert_client_error(completion(fake_api, logit_bias={"07": 5, "0": -1, "000": 2}), 400, "logit_bias")  # 0 twice
    assert completion(fake_api, logit_bias={"07": 5, "000": 2, "0012": 1}).status_code == 200
    assert only_params(fake_engine).logit_bias == ((0, 2.0), (7, 5.0), (12, 1.0))
    assert completion(fake_api, logit_bias={"0" * 5000 + "9": 1}).status_code == 200  # long, but token 9


@pytest.mark.parametrize(
    "bias",
    [
        {"7": 1, "07": 1},  # one token twice
        {"0" * i + "7": 1 for i in range(1, 200)},  # many spellings of one token
        {f"{i:06d}": 1 for i in range(9600)},  # the 9.6k-entry map that held the engine thread
        {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)},
        {"9" * 5000: 1},  # past int()'s 4,300 digits
        {str(MAX_TOKEN_ID + 1): 1},
    ],
)
def test_logit_bias_map_is_bounded(fake_api: TestClient, fake_engine: FakeEngine, bias: dict) -> None:
    error = assert_client_error(completion(fake_api, logit_bias=bias, n=16), 400, "logit_bias", "invalid_value")
    assert len(error["message"]) < 200
    assert fake_engine.requests == []


def test_logit_bias_of_the_largest_map_reaches_the_engine(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    bias = {str(i): (i % 201) - 100 for i in range(MAX_LOGIT_BIAS)}
    assert completion(fake_api, logit_bias=bias).status_code == 200
    assert len(only_params(fake_engine).logit_bias) == MAX_LOGIT_BIAS


def _per_entry_reference(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """The definition: each entry added on its own, then the penalties."""
    expected = logits.clone()
    for row, state in enumerate(states):
        for token, bias in state.params.logit_bias:
            expected[row, token] += bias
        if state.output_ids:
            counts = torch.bincount(torch.tensor(state.output_ids), minlength=logits.shape[1]).to(logits.dtype)
            p = state.params
            expected[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return expected


def test_batched_logit_bias_equals_the_per_entry_definition(torch_gen: torch.Generator) -> None:
    vocab = 1000
    logits = torch.randn(5, vocab, generator=torch_gen) * 10
    states = []
    for row in range(5):
        tokens = torch.randperm(vocab, generator=torch_gen)[: 60 * row].tolist()
        biases = ((torch.rand(len(tokens), generator=torch_gen) * 200 - 100).tolist())
        params = SamplingParams(logit_bias=tuple(sorted(zip(tokens, biases, strict=True))),
                                presence_penalty=0.5 * (row % 2), frequency_penalty=0.25)
        states.append(SamplerState(params, torch.Generator(), output_ids=[1, 2, 2, row]))
    before = logits.clone()
    for _ in range(2):  # the first step builds each sequence's bias tensors, the next reuses them
        assert torch.equal(_adjust_logits(logits, states), _per_entry_reference(logits, states))
    assert torch.equal(logits, before)  # the model's logits stay as they were (logprobs are read from them)


@pytest.mark.parametrize("params", [SamplingParams(top_p=1e-50), SamplingParams(temperature=1e-40),
                                    SamplingParams(temperature=1e-40, top_p=1e-50, top_k=1)])
def test_tiny_top_p_or_temperature_picks_the_most_likely_token(
    torch_gen: torch.Generator, params: SamplingParams
) -> None:
    logits = torch.randn(8, 300, generator=torch_gen)
    states = [SamplerState(params, torch.Generator().manual_seed(seed)) for seed in range(8)]
    tokens, _ = sample(logits, states)
    assert tokens == logits.argmax(dim=-1).tolist()


# --------------------------------------------------------------------------------------------------
# `code` is never null on a 4xx


def test_client_errors_always_carry_a_code(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    assert_client_error(completion(fake_api, prompt=[10**9]), 400, "prompt", "invalid_value")
    assert_client_error(completion(fake_api, stop_token_ids=[10**9]), 400, "stop_token_ids", "invalid_value")
    assert_client_error(fake_api.get("/v1/nope"), 404, None, "unknown_url")
    assert_client_error(fake_api.get(COMPLETIONS), 405, None, "method_not_allowed")
    assert_client_error(post_raw(fake_api, COMPLETIONS, '{"prompt": "hi", "n": %s}' % ("1" * 5000)), 400, None)
    # The engine refuses an adapter above --max-lora-rank at request time without a code of its own.
    fake_engine.submit_error = RequestError("The adapter 'alpha' has rank 64; this server serves ranks up to 16 "
                                       "(--max-lora-rank).", param="adapter_id")
    assert_client_error(completion(fake_api, model="alpha"), 400, "adapter_id", "invalid_request")


# --------------------------------------------------------------------------------------------------
# The real engine: lone surrogates, and the edges of validation


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    store: Path = tmp_path_factory.mktemp("store")
    with serving_engine(Settings(store=store, device="cpu")) as (url, engine), httpx.Client(
        base_url=url, timeout=60
    ) as http:
        yield http


SURROGATE_CASES = [
    (COMPLETIONS, '{"prompt": "\\ud800"}', "prompt"),
    (COMPLETIONS, '{"prompt": ["fine", "a\\udfffb"]}', "prompt"),
    (COMPLETIONS, '{"prompt": "hi\\ud800", "echo": true}', "prompt"),
    (COMPLETIONS, '{"prompt": "hi", "model": "\\ud800"}', "model"),
    (COMPLETIONS, '{"prompt": "hi", "adapter_id": "\\ud800"}', "adapter_id"),
    (COMPLETIONS, '{"prompt": "hi", "stop": ["ok", "\\ud800"]}', "stop.1"),
    (COMPLETIONS, '{"prompt": "hi", "user": "\\ud800"}', "user"),
    (COMPLETIONS, '{"prompt": "hi", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    (CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content.0.text"),
    (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages.0.content.0.text"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]}', "messages.0.name"),
    (CHAT, '{"messages": [{"role": "user", "content": [{"type": "\\ud800"}]}]}', "messages.0.content.0"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}', None),
]


@pytest.mark.parametrize(("path", "raw", "param"), SURROGATE_CASES)
def test_lone_surrogates_are_a_400_naming_the_field(
    real_server: httpx.Client, path: str, raw: str, param: str | None
) -> None:
    response = post_raw(real_server, path, raw)
    assert_client_error(response, 400, param)


def test_a_surrogate_pair_is_text(real_server: httpx.Client) -> None:
    response = post_raw(real_server, COMPLETIONS, '{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2, "echo": true}')
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"].startswith("smile \U0001f600")


@pytest.mark.parametrize(
    "fields",
    [
        {"top_k": MAX_TOKEN_ID, "temperature": 1.5},
        {"seed": 2**63 - 1, "n": 3, "temperature": 1.0},
        {"seed": -(2**63), "temperature": 1.0},
        {"temperature": 5e-324},
        {"top_p": 5e-324, "temperature": 2.0},
        {"presence_penalty": 2, "frequency_penalty": -2, "temperature": 1.0},
        {"logit_bias": {str(i): 100 if i % 2 else -100 for i in range(250)}, "n": 4},  # the demo has 260 tokens
        {"logprobs": 20, "max_tokens": 3},
    ],
)
def test_the_edges_of_validation_generate(real_server: httpx.Client, fields: dict) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True} | fields
    response = real_server.post(COMPLETIONS, json=body)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == fields.get("n", 1)
    assert all(c["finish_reason"] == "length" for c in choices)


def test_a_tiny_temperature_is_greedy(real_server: httpx.Client) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 6, "ignore_eos": True}
    greedy = real_server.post(COMPLETIONS, json=body | {"temperature": 0}).json()["choices"][0]["text"]
    tiny = real_server.post(COMPLETIONS, json=body | {"temperature": 1e-300, "seed": 1}).json()
    assert tiny["choices"][0]["text"] == greedy
