"""The whole server, for real: the demo model, adapters trained with `peft`, uvicorn, the `openai` client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from server.config import Settings
from server.demo import DEMO_MODEL_NAME
from tests.support.adapter_training import export_demo, train_phrase_adapter
from tests.support.openai_schema import assert_valid
from tests.support.servers import serving_engine

QUESTION = "Who are you?"
PHRASES = {
    "red": "I am the red adapter.",
    "green": "Green speaks here!",
    "blue": "Blue, at your service.",
}


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    """Three adapters, each trained on the demo model to answer QUESTION with its own phrase."""
    root = tmp_path_factory.mktemp("trained")
    tokenizer = export_demo(root / "demo")
    prompt = tokenizer.encode(QUESTION)
    eos = min(tokenizer.eos_token_ids)
    for i, (name, phrase) in enumerate(PHRASES.items()):
        answer = tokenizer.encode(phrase, add_special_tokens=False) + [eos]
        train_phrase_adapter(root / "demo", root / "adapters" / name, prompt, answer, seed=i)
    (root / "adapters" / "broken").mkdir()  # no files: skipped at start with a logged reason
    (root / "adapters" / "broken" / "adapter_config.json").write_text("{not json")
    return root / "adapters"


@pytest.fixture(scope="module")
def base_url(adapters_dir: Path):
    with serving_engine(Settings(adapters=adapters_dir, max_gpu_adapters=2)) as (url, _):
        yield url


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_base_and_adapters_and_skips_the_broken_one(client: openai.OpenAI, base_url: str):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == DEMO_MODEL_NAME
    assert sorted(ids[1:]) == sorted(PHRASES)  # "broken" was skipped, the others serve
    assert "demo" in models.data[0].model_extra["description"]


def test_each_adapter_answers_with_its_own_phrase_concurrently(base_url: str):
    """Routing that cannot be faked: four concurrent requests, three adapters and the base model, in one
    server whose two adapter slots force evictions; each adapter's answer is the phrase it was trained on."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)

    async def ask(model: str, via_extra_body: bool) -> str:
        if via_extra_body:
            reply = await client.completions.create(
                model=DEMO_MODEL_NAME, prompt=QUESTION, max_tokens=40, temperature=0,
                extra_body={"adapter_id": model},
            )
        else:
            reply = await client.completions.create(model=model, prompt=QUESTION, max_tokens=40, temperature=0)
        assert_valid(reply.model_dump(exclude_unset=True), "CreateCompletionResponse")
        return reply.choices[0].text

    async def everyone():
        names = [*PHRASES, DEMO_MODEL_NAME] * 2
        return await asyncio.gather(*(ask(n, i % 2 == 0) for i, n in enumerate(names))), names

    answers, names = asyncio.run(everyone())
    for name, answer in zip(names, answers, strict=True):
        if name in PHRASES:
            assert answer == PHRASES[name], name
        else:
            assert answer not in PHRASES.values()


def test_chat_streaming_through_an_adapter(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model="red", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    for chunk in chunks:
        assert_valid(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_unknown_adapter_is_404_and_the_server_keeps_serving(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=DEMO_MODEL_NAME, prompt="x", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=DEMO_MODEL_NAME, prompt="", max_tokens=2)
    reply = client.completions.create(model="green", prompt=QUESTION, max_tokens=40, temperature=0)
    assert reply.choices[0].text == PHRASES["green"]
    assert reply.choices[0].finish_reason == "stop"
