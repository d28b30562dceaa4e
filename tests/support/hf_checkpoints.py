"""Tiny random checkpoints saved by `transformers` and adapters saved by `peft` (every delta counts), read back by
lorahive as `lorahive serve --model --adapters` does, and the reference outputs: `transformers` + `peft`'s logits
and greedy `generate`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from server.model import KVCache, Transformer
from server.requests import GenerationRequest, SamplingParams
from server.scheduler import ScheduledChunk
from server.step_builder import build_step
from server.tokenizer import build_byte_tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 260  # the byte tokenizer's vocabulary
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
ARCHITECTURES = {
    "llama": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),  # biases on q, k and v
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=8),
}
PROMPT = [256, *range(40, 60), *range(90, 70, -1)]  # 41 tokens: longer than Mistral's window


@dataclass
class Checkpoint:
    model_dir: Path
    adapters_dir: Path
    hf_model: torch.nn.Module


def save_checkpoint(tmp: Path, arch: str, adapters: Mapping[str, Callable[[], Any]],
                    edit: Callable[[str, Any], None] | None = None) -> Checkpoint:
    """The `arch` checkpoint and one `peft` adapter per entry of `adapters` (name -> its peft config), each made with
    its own seed; `edit(name, peft_model)` may change an adapter's weights before it is saved."""
    torch.manual_seed(1234)
    hf_model = transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[arch]()).float().eval()
    with torch.no_grad():  # norms at 1.0 would hide a swapped or missing norm weight
        for name, param in hf_model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.uniform_(0.5, 1.5)
    model_dir = tmp / arch
    hf_model.save_pretrained(model_dir)
    build_byte_tokenizer().save(model_dir)
    adapters_dir = tmp / f"{arch}-adapters"
    for i, (name, config) in enumerate(adapters.items()):
        torch.manual_seed(100 + i)
        peft_model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(model_dir), config())
        if edit is not None:
            with torch.no_grad():
                edit(name, peft_model)
        peft_model.save_pretrained(adapters_dir / name)
    return Checkpoint(model_dir, adapters_dir, hf_model)


def hf_with_adapter(ckpt: Checkpoint, adapter: str | None):
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt.model_dir).float().eval()
    if adapter is None:
        return base
    return peft.PeftModel.from_pretrained(base, ckpt.adapters_dir / adapter).eval()


def hf_greedy(ckpt: Checkpoint, adapter: str | None, prompt: list[int], max_tokens: int, cached: bool = True
              ) -> list[int]:
    """`transformers` + `peft`'s greedy tokens after `prompt`: `generate` (with its KV cache), or, not `cached`, the
    argmax of a whole forward per token. Prompt tuning needs the latter: with peft 0.21 `generate` drifts from the
    model's own forward after a few tokens (what training optimised, and what lorahive serves)."""
    model = hf_with_adapter(ckpt, adapter)
    with torch.no_grad():
        if cached:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                                 min_new_tokens=max_tokens, pad_token_id=0, eos_token_id=None)
            return out[0, len(prompt):].tolist()
        tokens = list(prompt)
        for _ in range(max_tokens):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        return tokens[len(prompt):]


def our_logits(model: Transformer, tokens: list[int], slot: int) -> torch.Tensor:
    """Logits at every position of one prefill, through the same step builder the engine uses."""
    args, block = model.args, 16
    cache = KVCache(args.n_layers, 32, block, args.n_kv_heads, args.head_dim, torch.float32, "cpu")

    @dataclass
    class _Seq:  # the fields of scheduler.Sequence that build_step reads
        token_ids: list[int]
        num_computed: int = 0
        blocks: tuple[int, ...] = tuple(range(32))
        slot: int = -1
        num_virtual_tokens: int = 0

    step, lora_batch, _ = build_step([ScheduledChunk(_Seq(tokens, slot=slot), len(tokens))], block,
                                     args.sliding_window, "cpu")
    step.logits_index = torch.arange(len(tokens))
    model.lora.batch = lora_batch
    try:
        return model(step, cache)
    finally:
        model.lora.batch = None


def load_into_slot(engine, adapter: str) -> int:
    """Put `adapter` in a device slot of `engine` (not started) and return the slot."""
    version = engine.registry.version(adapter)
    slot = engine.pool.acquire(version, version.weights)
    for write in engine.pool.take_writes():
        engine.runner.apply(write)
    return slot


async def generate_all(engine, prompts: dict[str | None, list[int]], max_tokens: int) -> dict:
    """Every prompt (by adapter) submitted at once; each one's greedy tokens."""
    async def one(adapter, prompt):
        stream = engine.submit(
            GenerationRequest(tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                            ignore_eos=True), adapter_id=adapter)
        )
        return [t async for delta in stream for t in delta.token_ids]

    results = await asyncio.gather(*(one(a, p) for a, p in prompts.items()))
    return dict(zip(prompts, results, strict=True))


async def greedy_with_logprobs(engine, adapter: str | None, prompt: list[int], max_tokens: int, top: int
                               ) -> tuple[list[int], list[tuple[tuple[int, float], ...]]]:
    """One request's greedy tokens and, at each, the `top` most likely (token, logprob)."""
    stream = engine.submit(GenerationRequest(tuple(prompt), SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=top), adapter_id=adapter))
    deltas = [delta async for delta in stream]
    return ([t for d in deltas for t in d.token_ids], [lp.top for d in deltas for lp in d.logprobs or ()])


@dataclass
class StepKinds:
    """What kinds of chunks the engine's steps held (wrapped around its scheduler)."""

    mixed_steps: int = 0  # steps holding a decode token and a prefill chunk together
    chunks_on_prefix: int = 0  # prefill chunks on a prefix already in the cache

    def watch(self, engine) -> None:
        schedule = engine.scheduler.schedule

        def recording() -> list[ScheduledChunk]:
            plan = schedule()
            decodes = [c for c in plan if c.seq.num_computed >= c.seq.num_prompt_tokens]
            prefills = [c for c in plan if c.num_tokens > 1]
            self.mixed_steps += bool(decodes and prefills)
            self.chunks_on_prefix += sum(c.seq.num_computed > 0 for c in prefills)
            return plan

        engine.scheduler.schedule = recording
