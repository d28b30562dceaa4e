"""Routing that cannot be faked, for every kind of adapter: LoRA, DoRA, IA3 and prompt-tuning adapters trained
with `peft` on the demo model to answer one question with their own phrase, served together; concurrent
requests for each and for the base model each get their own answer, also when two device slots force evictions.
The prompt-tuning request also reports usage as PEFT counts tokens: its virtual tokens are not prompt tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import peft
import pytest

from server.config import Settings
from server.demo import DEMO_MODEL_NAME
from tests.support.adapter_training import TARGETS, export_demo, train_phrase_adapter
from tests.support.servers import serving_engine

QUESTION = "Who are you?"
# name -> (phrase, peft config (None: LoRA), learning rate)
KINDS = {
    "lora": ("A plain LoRA answers.", None, 1e-2),
    "dora": ("DoRA, decomposed.", peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=True), 1e-2),
    "ia3": ("IA3 scales things.", peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]), 5e-2),
    "prompt": ("Soft prompts speak!", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8), 0.3),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained-kinds")
    tokenizer = export_demo(root / "demo")
    question, eos = tokenizer.encode(QUESTION), min(tokenizer.eos_token_ids)
    for i, (name, (phrase, config, lr)) in enumerate(KINDS.items()):
        answer = tokenizer.encode(phrase, add_special_tokens=False) + [eos]
        train_phrase_adapter(root / "demo", root / "adapters" / name, question, answer, seed=i, config=config,
                             lr=lr, steps=150)
    return root / "adapters"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_each_kind_answers_with_its_own_phrase_concurrently(trained: Path, backend: str):
    settings = Settings(adapters=trained, max_gpu_adapters=2, lora_backend=backend)
    with serving_engine(settings) as (url, engine):
        assert {engine.registry.version(name).manifest.kind for name in KINDS} == set(KINDS)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        async def ask(model: str) -> openai.types.Completion:
            return await client.completions.create(model=model, prompt=QUESTION, max_tokens=30, temperature=0)

        async def everyone() -> tuple[list[openai.types.Completion], str]:
            together = await asyncio.gather(*(ask(name) for name in [*KINDS, DEMO_MODEL_NAME] * 2))
            alone = await ask(DEMO_MODEL_NAME)
            return together, alone.choices[0].text

        replies, base = asyncio.run(everyone())
    for name, reply in zip([*KINDS, DEMO_MODEL_NAME] * 2, replies, strict=True):
        expected = KINDS[name][0] if name in KINDS else base
        assert reply.choices[0].text == expected, name
        # Every request sent the same question: the soft prompt's 8 virtual tokens are not counted as prompt tokens.
        assert reply.usage.prompt_tokens == replies[-1].usage.prompt_tokens
    assert base not in {phrase for phrase, _, _ in KINDS.values()}
