"""The OpenAI-compatible HTTP layer, against `FakeEngine`: request validation, adapter selection, the
SamplingParams handed to the engine, response and chunk shapes (checked with OpenAI's own schemas),
streaming, errors, the official `openai` client over a real socket, and aborting on disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.api import build_app, merge_streams
from server.requests import GenerationRequest, RequestError, SamplingParams
from tests.support.fake_engine import (
    ALPHABET,
    TEMPLATE_ERROR_TRIGGER,
    FakeEngine,
    FakeStream,
    FakeTokenizer,
    choice_text,
)
from tests.support.openai_http import (
    BASE,
    USER_HI,
    assert_error,
    chat,
    completion,
    only_params,
    sse_events,
    stream_chunks,
)
from tests.support.openai_schema import assert_valid
from tests.support.servers import running_server

# --------------------------------------------------------------------------------------------------
# Small routes


def test_health(fake_api: TestClient) -> None:
    assert fake_api.get("/health").json() == {"status": "ok"}


def test_models_lists_base_then_adapters(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    body = fake_api.get("/v1/models").json()
    assert_valid(body, "ListModelsResponse")
    base, *adapters = body["data"]
    assert base["id"] == BASE and base["owned_by"] == "lorahive" and base["parent"] is None
    assert base["root"] == BASE and base["description"] == fake_engine.model_description
    assert [a["id"] for a in adapters] == ["alpha", "beta"]
    assert all(a["parent"] == BASE and a["root"] == BASE and "description" not in a for a in adapters)
    assert all(card["max_model_len"] == fake_engine.max_model_len for card in body["data"])
    assert "dims" not in base  # the fake engine is no model; a real one's dims: tests/test_loadtest_lorahive.py
    for card in body["data"]:
        assert_valid(card, "Model")


def test_retrieve_model(fake_api: TestClient) -> None:
    card = fake_api.get("/v1/models/alpha").json()
    assert_valid(card, "Model")
    assert card["id"] == "alpha"
    assert_error(fake_api.get("/v1/models/nope"), 404, "model", "model_not_found")


# --------------------------------------------------------------------------------------------------
# Completions: defaults, prompts, adapters


def test_completion_defaults(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    response = completion(fake_api)
    body = response.json()
    assert_valid(body, "CreateCompletionResponse")
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == BASE
    [choice] = body["choices"]
    assert choice == {"index": 0, "text": ALPHABET[:16], "logprobs": None, "finish_reason": "length"}
    params = only_params(fake_engine)
    assert params.max_tokens == 16  # OpenAI's documented default for /v1/completions
    assert (params.temperature, params.top_p, params.top_k, params.logprobs) == (1.0, 1.0, 0, None)
    request = fake_engine.requests[0]
    assert request.adapter_id is None and request.n == 1
    assert not request.incremental  # a non-streaming response takes each choice whole
    assert request.prompt_token_ids == tuple(FakeTokenizer().encode("hi"))
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}


def test_sampling_fields_reach_the_engine(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    response = completion(
        fake_api,
        max_tokens=5,
        temperature=0,
        top_p=0.5,
        top_k=-1,
        seed=7,
        stop=["zz", "yy"],
        presence_penalty=0.5,
        frequency_penalty=-1,
        logit_bias={"98": 5, "97": -100},
        ignore_eos=True,
        user="someone",
    )
    assert response.status_code == 200, response.text
    assert only_params(fake_engine) == SamplingParams(
        max_tokens=5,
        temperature=0.0,
        top_p=0.5,
        top_k=0,
        seed=7,
        stop=("zz", "yy"),
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        logit_bias=((97, -100.0), (98, 5.0)),
        ignore_eos=True,
    )


def test_explicit_nulls_mean_defaults(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    nulls = dict.fromkeys(["max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "stream"])
    response = completion(fake_api, **nulls, echo=None, best_of=None, suffix=None, stream_options=None)
    assert response.status_code == 200, response.text
    assert only_params(fake_engine) == SamplingParams(max_tokens=16)


@pytest.mark.parametrize(
    ("prompt", "expected_prompts"),
    [
        (["one", "two"], [FakeTokenizer().encode("one"), FakeTokenizer().encode("two")]),
        ([5, 6, 7], [[5, 6, 7]]),
        ([[5, 6], [7]], [[5, 6], [7]]),
    ],
)
def test_prompt_batches(fake_api: TestClient, fake_engine: FakeEngine, prompt: Any, expected_prompts: list) -> None:
    body = completion(fake_api, prompt=prompt, n=2, max_tokens=3).json()
    assert_valid(body, "CreateCompletionResponse")
    assert [list(r.prompt_token_ids) for r in fake_engine.requests] == expected_prompts
    assert all(r.n == 2 for r in fake_engine.requests)
    # OpenAI's order: all choices of prompt 0, then prompt 1's, ...
    expected = [choice_text(ALPHABET, i, 3) for _ in expected_prompts for i in range(2)]
    assert [c["index"] for c in body["choices"]] == list(range(2 * len(expected_prompts)))
    assert [c["text"] for c in body["choices"]] == expected
    prompt_tokens = sum(len(p) for p in expected_prompts)
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 3 * len(expected)


@pytest.mark.parametrize("prompt", ["", [], [""], ["a", ""], [[]], [[1], []]])
def test_empty_prompt_is_400(fake_api: TestClient, fake_engine: FakeEngine, prompt: Any) -> None:
    assert_error(completion(fake_api, prompt=prompt), 400, "prompt")
    assert fake_engine.requests == []


@pytest.mark.parametrize("prompt", [[-1], [FakeTokenizer.vocab_size], [[1], [2, 10**9]]])
def test_token_ids_outside_vocab_are_400(fake_api: TestClient, prompt: Any) -> None:
    assert_error(completion(fake_api, prompt=prompt), 400, "prompt")


def test_adapter_selection(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    assert completion(fake_api, model="alpha").json()["model"] == "alpha"
    assert completion(fake_api, model=BASE).status_code == 200
    body = completion(fake_api, adapter_id="beta").json()
    assert body["model"] == "beta"  # what served, whatever `model` the client sent
    assert fake_api.post("/v1/completions", json={"prompt": "hi"}).json()["model"] == BASE
    assert chat(fake_api, model="alpha").status_code == 200
    assert [r.adapter_id for r in fake_engine.requests] == ["alpha", None, "beta", None, "alpha"]


@pytest.mark.parametrize("endpoint", [completion, chat])
def test_unknown_adapter_is_404(fake_api: TestClient, fake_engine: FakeEngine, endpoint: Any) -> None:
    error = assert_error(endpoint(fake_api, adapter_id="nope"), 404, "adapter_id", "model_not_found")
    assert error["type"] == "invalid_request_error" and "nope" in error["message"]
    assert_error(endpoint(fake_api, model="nope"), 404, "model", "model_not_found")
    # The unknown model is the first thing wrong with this request, not its length.
    assert_error(endpoint(fake_api, model="nope", max_tokens=10**6), 404, "model", "model_not_found")
    assert fake_engine.requests == []


def test_adapter_deleted_between_lookup_and_submit(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    fake_engine.adapters.append("ghost")  # listed, but the engine no longer has it when asked to run it
    real_submit = fake_engine.submit

    def submit(request: GenerationRequest) -> FakeStream:
        fake_engine.adapters.remove("ghost")
        return real_submit(request)

    fake_engine.submit = submit  # type: ignore[method-assign]
    assert_error(completion(fake_api, model="ghost"), 404, "model", "model_not_found")


# --------------------------------------------------------------------------------------------------
# Context length


def test_max_tokens_beyond_context_is_400(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    error = assert_error(completion(fake_api, max_tokens=126), 400, "max_tokens", "context_length_exceeded")
    assert "128" in error["message"] and "3" in error["message"] and "126" in error["message"]
    assert completion(fake_api, max_tokens=125).status_code == 200
    assert_error(completion(fake_api, prompt="x" * 127), 400, "prompt")
    assert_error(chat(fake_api, max_completion_tokens=200), 400, "max_completion_tokens")
    assert_error(chat(fake_api, max_tokens=200), 400, "max_tokens")
    long_chat = {"messages": [{"role": "user", "content": "x" * 200}]}
    assert_error(fake_api.post("/v1/chat/completions", json=long_chat), 400, "messages")


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    body = chat(fake_api).json()
    assert_valid(body, "CreateChatCompletionResponse")
    prompt = fake_engine.requests[0].prompt_token_ids
    # The chat prompt is rendered by the template and encoded without extra special tokens.
    rendered = FakeTokenizer().apply_chat_template([USER_HI])
    assert prompt == tuple(FakeTokenizer().encode(rendered, add_special_tokens=False))
    assert only_params(fake_engine).max_tokens == fake_engine.max_model_len - len(prompt)
    assert body["choices"][0]["finish_reason"] == "length"


# --------------------------------------------------------------------------------------------------
# Validation: wrong types and unsupported features are 400s naming the field


@pytest.mark.parametrize(
    ("endpoint", "fields", "param"),
    [
        (completion, {"max_tokens": "ten"}, "max_tokens"),
        (completion, {"max_tokens": 0}, "max_tokens"),
        (completion, {"temperature": "hot"}, "temperature"),
        (completion, {"temperature": 2.5}, "temperature"),
        (completion, {"top_p": 0}, "top_p"),
        (completion, {"n": 0}, "n"),
        (completion, {"n": 129}, "n"),
        (completion, {"n": 1.5}, "n"),
        (completion, {"prompt": 5}, "prompt"),
        (completion, {"prompt": [1, "a"]}, "prompt"),
        (completion, {"prompt": None}, "prompt"),
        (completion, {"stop": 3}, "stop"),
        (completion, {"stop": ["a", 3]}, "stop.1"),
        (completion, {"stop": [str(i) for i in range(17)]}, "stop"),
        (completion, {"stop": ""}, "stop"),
        (completion, {"stream": "yes"}, "stream"),
        (completion, {"logprobs": 21}, "logprobs"),
        (completion, {"logprobs": True}, "logprobs"),
        (completion, {"logit_bias": {"a": 1}}, "logit_bias"),
        (completion, {"logit_bias": {"\u00b2": 1}}, "logit_bias"),
        (completion, {"logit_bias": {"1": 101}}, "logit_bias"),
        (completion, {"logit_bias": {str(FakeTokenizer.vocab_size): 1}}, "logit_bias"),
        (completion, {"presence_penalty": -3}, "presence_penalty"),
        (completion, {"top_k": -2}, "top_k"),
        (completion, {"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        (completion, {"model": 3}, "model"),
        (completion, {"stop_token_ids": [-1]}, "stop_token_ids"),
        (chat, {"messages": "hi"}, "messages"),
        (chat, {"messages": []}, "messages"),
        (chat, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        (chat, {"messages": [{"role": "user"}]}, "messages.0"),
        (chat, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (chat, {"logprobs": "yes"}, "logprobs"),
        (chat, {"top_logprobs": 2}, "top_logprobs"),
        (chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (chat, {"max_completion_tokens": "lots"}, "max_completion_tokens"),
    ],
)
def test_wrong_values_are_400(
    fake_api: TestClient, fake_engine: FakeEngine, endpoint: Any, fields: dict, param: str
) -> None:
    assert_error(endpoint(fake_api, **fields), 400, param)
    assert fake_engine.requests == []


def test_missing_required_field(fake_api: TestClient) -> None:
    error = assert_error(fake_api.post("/v1/chat/completions", json={"model": BASE}), 400, "messages")
    assert error["code"] == "missing_required_parameter"
    assert_error(fake_api.post("/v1/completions", json={"model": BASE}), 400, "prompt")


@pytest.mark.parametrize(
    ("endpoint", "fields", "param"),
    [
        (completion, {"best_of": 3}, "best_of"),
        (completion, {"best_of": 2, "n": 3}, "best_of"),
        (completion, {"suffix": "the end"}, "suffix"),
        (completion, {"echo": True, "logprobs": 1}, "logprobs"),
        (chat, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (chat, {"tool_choice": "auto"}, "tool_choice"),
        (chat, {"functions": [{"name": "f"}]}, "functions"),
        (chat, {"response_format": {"type": "json_object"}}, "response_format"),
        (
            chat,
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
            "messages.0.tool_calls",
        ),
        (
            chat,
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}
                ]
            },
            "messages.0.content.1",
        ),
        (
            chat,
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "messages.0.content.0",
        ),
    ],
)
def test_unsupported_features_are_400(
    fake_api: TestClient, endpoint: Any, fields: dict, param: str | None
) -> None:
    error = assert_error(endpoint(fake_api, **fields), 400, param)
    assert error["type"] == "invalid_request_error"
    assert error["code"] in {"unsupported_parameter", "unsupported_value"}


def test_supported_lookalikes_are_fine(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    assert completion(fake_api, best_of=2, n=2, suffix="").status_code == 200
    assert chat(fake_api, response_format={"type": "text"}, tools=[], tool_choice="none").status_code == 200
    # Text parts are concatenated; "developer" reaches the template as "system", the role it knows.
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": parts}]
    assert chat(fake_api, messages=messages).status_code == 200
    rendered = FakeTokenizer().apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    )
    assert fake_engine.requests[-1].prompt_token_ids == tuple(
        FakeTokenizer().encode(rendered, add_special_tokens=False)
    )


def test_chat_template_error_is_400(fake_api: TestClient) -> None:
    messages = [{"role": "user", "content": TEMPLATE_ERROR_TRIGGER}]
    error = assert_error(chat(fake_api, messages=messages), 400, "messages")
    assert "cannot be rendered" in error["message"]


# --------------------------------------------------------------------------------------------------
# Error bodies are always OpenAI's, never FastAPI's {"detail": ...}


def test_unknown_route_and_method(fake_api: TestClient) -> None:
    error = assert_error(fake_api.get("/v1/nope"), 404, None)
    assert "/v1/nope" in error["message"]
    assert_error(fake_api.get("/v1/completions"), 405, None)


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"prompt": "hi",', "application/json"),
        (b"[1, 2]", "application/json"),
        (b"prompt=hi", "text/plain"),
    ],
)
def test_malformed_body_is_400(fake_api: TestClient, content: bytes, content_type: str) -> None:
    response = fake_api.post("/v1/completions", content=content, headers={"content-type": content_type})
    assert_error(response, 400, None)


def test_engine_request_error_is_400(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    fake_engine.submit_error = RequestError("too many adapters in flight", param="adapter_id", code="busy")
    assert_error(completion(fake_api), 400, "adapter_id", "busy")


def test_unexpected_error_is_500_with_an_id(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    fake_engine.submit_error = RuntimeError("secret internals")
    response = completion(fake_api)
    assert response.status_code == 500
    assert_valid(response.json(), "ErrorResponse")
    error = response.json()["error"]
    assert error["type"] == "server_error" and "error id" in error["message"]
    assert "secret" not in error["message"]


# --------------------------------------------------------------------------------------------------
# Finishing, stop strings, EOS, n


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("engine_kwargs", "fields", "reason", "text"),
    [
        ({}, {"max_tokens": 4}, "length", "abcd"),
        ({}, {"max_tokens": 20, "stop": "fgh"}, "stop", "abcde"),
        ({}, {"max_tokens": 20, "stop": ["xyz", "ef"], "include_stop_str_in_output": True}, "stop", "abcdef"),
        ({"eos_after": 3}, {"max_tokens": 10}, "stop", "abc"),
        ({"eos_after": 3}, {"max_tokens": 6, "ignore_eos": True}, "length", "abcdef"),
    ],
)
def test_finish_reasons(stream: bool, engine_kwargs: dict, fields: dict, reason: str, text: str) -> None:
    engine = FakeEngine(**engine_kwargs)
    with TestClient(build_app(engine)) as client:
        response = completion(client, stream=stream, **fields)
        if stream:
            chunks = stream_chunks(response, "CreateCompletionStreamResponse")
            got_text = "".join(c["choices"][0]["text"] for c in chunks)
            reasons = [c["choices"][0]["finish_reason"] for c in chunks]
            assert reasons[:-1] == [None] * (len(reasons) - 1)
            got_reason = reasons[-1]
            assert all(c["choices"][0]["text"] for c in chunks[:-1])  # no empty chunks but the finishing one
        else:
            body = response.json()
            assert_valid(body, "CreateCompletionResponse")
            got_text, got_reason = body["choices"][0]["text"], body["choices"][0]["finish_reason"]
    assert (got_text, got_reason) == (text, reason)
    assert got_reason in {"stop", "length"}


def test_n_choices(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    body = chat(fake_api, n=3, max_tokens=4).json()
    assert_valid(body, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"] for c in body["choices"]] == [
        {"role": "assistant", "content": choice_text(ALPHABET, i, 4), "refusal": None} for i in range(3)
    ]
    assert all(c["finish_reason"] == "length" and c["logprobs"] is None for c in body["choices"])
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == 12
    assert fake_engine.requests[0].n == 3


# --------------------------------------------------------------------------------------------------
# Streaming


def test_chat_stream_shape(fake_api: TestClient) -> None:
    chunks = stream_chunks(chat(fake_api, n=3, max_tokens=4, stream=True), "CreateChatCompletionStreamResponse")
    assert all("usage" not in c for c in chunks)  # not requested: absent, not null
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["object"] == "chat.completion.chunk"
    for index in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert all(len(c["choices"]) == 1 for c in chunks)
        assert mine[0]["delta"] == {"role": "assistant", "content": ""} and mine[0]["finish_reason"] is None
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "length"
        middle = mine[1:-1]
        assert all(set(c["delta"]) == {"content"} and c["delta"]["content"] for c in middle)
        assert all(c["finish_reason"] is None for c in middle)
        assert "".join(c["delta"]["content"] for c in middle) == choice_text(ALPHABET, index, 4)


def test_completion_stream_n(fake_api: TestClient, fake_engine: FakeEngine) -> None:
    chunks = stream_chunks(
        completion(fake_api, n=3, max_tokens=4, stream=True), "CreateCompletionStreamResponse"
    )
    assert fake_engine.requests[0].incremental
    assert all("usage" not in c for c in chunks)
    texts = {
        i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(3)
    }
    assert texts == {i: choice_text(ALPHABET, i, 4) for i in range(3)}


@pytest.mark.parametrize(
    ("endpoint", "schema"),
    [(completion, "CreateCompletionStreamResponse"), (chat, "CreateChatCompletionStreamResponse")],
)
def test_stream_usage_only_on_the_final_chunk(fake_api: TestClient, endpoint: Any, schema: str) -> None:
    response = endpoint(fake_api, n=2, max_tokens=3, stream=True, stream_options={"include_usage": True})
    chunks = stream_chunks(response, schema)
    *body, last = chunks
    assert all("usage" in c and c["usage"] is None and len(c["choices"]) == 1 for c in body)
    assert last["choices"] == []
    usage = last["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6


def test_stream_matches_non_stream(fake_api: TestClient) -> None:
    fields = {"prompt": ["ab", "cd"], "n": 2, "max_tokens": 5, "stop": "de"}
    whole = completion(fake_api, **fields).json()
    chunks = stream_chunks(completion(fake_api, stream=True, **fields), "CreateCompletionStreamResponse")
    streamed: dict[int, str] = {}
    for chunk in chunks:
        choice = chunk["choices"][0]
        streamed[choice["index"]] = streamed.get(choice["index"], "") + choice["text"]
    assert streamed == {c["index"]: c["text"] for c in whole["choices"]}


def test_stream_failure_is_reported_in_band() -> None:
    engine = FakeEngine(fail_after=2)
    with TestClient(build_app(engine)) as client:
        payloads = sse_events(completion(client, max_tokens=10, stream=True))
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])
    assert_valid(error, "ErrorResponse")
    assert error["error"]["type"] == "server_error"
    for payload in payloads[:-2]:
        assert_valid(json.loads(payload), "CreateCompletionStreamResponse")


def test_merge_streams_does_not_wait_for_slow_streams() -> None:
    engine = FakeEngine(delay_for=lambda r: 0.05 if r.request_id == "slow" else 0.0)

    def request(request_id: str) -> GenerationRequest:
        return GenerationRequest((1,), SamplingParams(max_tokens=4), 1, None, request_id)

    async def run() -> list[int]:
        streams = [engine.submit(request("slow")), engine.submit(request("fast"))]
        return [position async for position, _ in merge_streams(streams)]

    order = asyncio.run(run())
    assert order == [1, 1, 1, 1, 0, 0, 0, 0]


# --------------------------------------------------------------------------------------------------
# Logprobs and echo


def test_completion_logprobs(fake_api: TestClient) -> None:
    body = completion(fake_api, max_tokens=3, logprobs=2).json()
    assert_valid(body, "CreateCompletionResponse")
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["a", "b", "c"]
    assert logprobs["text_offset"] == [0, 1, 2]
    assert len(logprobs["token_logprobs"]) == 3 and all(lp < 0 for lp in logprobs["token_logprobs"])
    assert logprobs["top_logprobs"][0] == {"a": -0.26, "B": -1.26}

    chunks = stream_chunks(
        completion(fake_api, max_tokens=3, logprobs=0, stream=True), "CreateCompletionStreamResponse"
    )
    tokens = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    offsets = [o for c in chunks for o in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert tokens == ["a", "b", "c"] and offsets == [0, 1, 2]


def test_logprobs_of_held_back_tokens_are_not_lost(fake_api: TestClient) -> None:
    # "c" waits while "cd" might complete the stop string "cx"; its logprob rides on the next chunk.
    chunks = stream_chunks(
        completion(fake_api, max_tokens=5, logprobs=1, stop="cx", stream=True), "CreateCompletionStreamResponse"
    )
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == list("abcde")
    assert all(c["choices"][0]["text"] for c in chunks[:-1])


def test_chat_logprobs(fake_api: TestClient) -> None:
    body = chat(fake_api, max_tokens=3, logprobs=True, top_logprobs=2).json()
    assert_valid(body, "CreateChatCompletionResponse")
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None
    assert [t["token"] for t in logprobs["content"]] == ["a", "b", "c"]
    first = logprobs["content"][0]
    assert first["bytes"] == [97] and first["top_logprobs"][1] == {
        "token": "B",
        "logprob": -1.26,
        "bytes": [66],
    }

    assert chat(fake_api, logprobs=True).json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []

    response = chat(fake_api, max_tokens=3, logprobs=True, top_logprobs=1, stream=True)
    chunks = stream_chunks(response, "CreateChatCompletionStreamResponse")
    content = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    assert [t["token"] for c in content for t in c["choices"][0]["logprobs"]["content"]] == ["a", "b", "c"]


def test_echo(fake_api: TestClient) -> None:
    body = completion(fake_api, prompt=["hi", "yo"], echo=True, max_tokens=2).json()
    assert_valid(body, "CreateCompletionResponse")
    assert [c["text"] for c in body["choices"]] == ["hiab", "yoab"]

    tokens = FakeTokenizer().encode("hey")
    assert completion(fake_api, prompt=tokens, echo=True, max_tokens=2).json()["choices"][0]["text"] == "heyab"

    chunks = stream_chunks(
        completion(fake_api, n=2, echo=True, max_tokens=2, stream=True), "CreateCompletionStreamResponse"
    )
    firsts = {}
    for chunk in chunks:
        firsts.setdefault(chunk["choices"][0]["index"], chunk["choices"][0]["text"])
    assert firsts == {0: "hia", 1: "hib"}


# --------------------------------------------------------------------------------------------------
# A real server on a socket: the official client, and disconnects


@pytest.fixture(scope="module")
def live_app() -> Iterator[tuple[FastAPI, str]]:
    app = build_app(FakeEngine())
    with running_server(app) as url:
        yield app, url


@pytest.fixture
def live(live_app: tuple[FastAPI, str]) -> tuple[str, FakeEngine]:
    """The live server's URL, with a fresh engine installed in it (`build_app` keeps it on app.state)."""
    app, url = live_app
    engine = FakeEngine()
    app.state.engine = engine
    return url, engine


@pytest.fixture
def oai(live: tuple[str, FakeEngine]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live[0]}/v1", api_key="unused", max_retries=0, timeout=10) as client:
        yield client


def test_openai_client_completions(oai: openai.OpenAI, live: tuple[str, FakeEngine]) -> None:
    _, engine = live
    result = oai.completions.create(model=BASE, prompt="hi", max_tokens=5)
    assert result.choices[0].text == "abcde" and result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 5

    pieces = oai.completions.create(model="alpha", prompt="hi", max_tokens=5, n=2, stream=True)
    texts: dict[int, str] = {}
    for chunk in pieces:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: "abcde", 1: "bcdef"}
    assert [r.adapter_id for r in engine.requests] == [None, "alpha"]


def test_openai_client_chat(oai: openai.OpenAI, live: tuple[str, FakeEngine]) -> None:
    _, engine = live
    messages: Any = [{"role": "user", "content": "hi"}]
    result = oai.chat.completions.create(
        model=BASE, messages=messages, max_tokens=3, extra_body={"adapter_id": "beta"}
    )
    assert result.choices[0].message.content == "abc" and result.choices[0].message.role == "assistant"

    stream = oai.chat.completions.create(
        model=BASE,
        messages=messages,
        max_completion_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "abc"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert [r.adapter_id for r in engine.requests] == ["beta", None]


def test_openai_client_not_found(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        oai.completions.create(model=BASE, prompt="hi", extra_body={"adapter_id": "nope"})
    assert raised.value.code == "model_not_found" and raised.value.param == "adapter_id"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(model=BASE, prompt="hi", max_tokens=1000)
    assert bad.value.param == "max_tokens"


def test_models_through_the_client(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == [BASE, "alpha", "beta"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_disconnect_aborts(live: tuple[str, FakeEngine], path: str) -> None:
    url, engine = live
    engine.delay = 0.02
    prompt = {"messages": [USER_HI]} if path == "/v1/chat/completions" else {"prompt": "hi"}
    body = {"model": BASE, **prompt, "max_tokens": 100, "stream": True}
    with httpx.Client(timeout=10) as http, http.stream("POST", url + path, json=body) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(4)]  # two events and their blank separators
        assert got[0].startswith("data: {")
    # The client closed its connection after a few chunks: the server must abort the engine stream.
    [stream] = engine.streams
    assert stream.aborted.wait(10), "engine stream was not aborted after the client left"
    assert not stream.finished and stream.completion_tokens < 100


def test_non_stream_disconnect_aborts(live: tuple[str, FakeEngine]) -> None:
    url, engine = live
    engine.delay = 0.02
    with httpx.Client(timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        http.post(url + "/v1/completions", json={"model": BASE, "prompt": ["a", "b"], "max_tokens": 100})
    assert len(engine.streams) == 2
    for stream in engine.streams:
        assert stream.aborted.wait(10), "engine streams were not aborted after the client left"
        assert not stream.finished
