"""The real Engine in process, on the embedded demo model: its settings, random LoRA adapters for it, requests
to it, what it streams back, and the check that it gave back every KV block and adapter-slot pin."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters_store import TARGET_MODULES, LoraAdapter, LoraWeight, ScaleVector
from server.config import Settings
from server.engine import Engine, RequestStream
from server.model import ModelArgs
from server.requests import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)
from server.runtime import build_engine

# Generous: a healthy engine finishes each scenario in well under a second or two. The timeout only turns
# a dead engine thread (a stream that will never end) into a failure instead of a hung suite.
TIMEOUT_S = 60.0
# The engine's own model runner: its tests start in a tenth of a second and reach the model; the worker process
# (the server's default) has tests/test_runner_process.py, and every `lorahive serve` a test starts uses it.
ENGINE_SETTINGS: dict[str, Any] = {
    "device": "cpu", "dtype": "float32", "max_lora_rank": 16, "kv_cache_tokens": 1536, "model_runner_process": False,
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# adapter id -> (rank, lora_alpha, target modules): ranks from 2 to the pool's max, some adapters targeting
# only a few of the projections fused in one layer (their other slices stay zero).
ADAPTER_SPECS: dict[str, tuple[int, float, tuple[str, ...]]] = {
    "a0": (8, 16.0, TARGET_MODULES),
    "a1": (4, 4.0, ("q_proj", "v_proj")),
    "a2": (16, 16.0, ("o_proj", *MLP)),
    "a3": (2, 4.0, TARGET_MODULES),
    "a4": (8, 8.0, ("k_proj", "v_proj", "down_proj")),
}


@dataclass
class Choice:
    """Everything one choice streamed, concatenated."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


async def collect(stream: RequestStream) -> list[Choice]:
    """Iterate a stream to its end; the choices in index order."""
    choices: dict[int, Choice] = {}
    async for delta in stream:
        choice = choices.setdefault(delta.index, Choice())
        assert choice.finish_reason is None, "a delta after the choice's finish_reason"
        choice.text += delta.text
        choice.token_ids += delta.token_ids
        choice.finish_reason = delta.finish_reason
        if delta.logprobs is not None:
            assert len(delta.logprobs) == len(delta.token_ids)
            choice.logprobs += delta.logprobs
    return [choices[i] for i in sorted(choices)]


async def generate_async(engine: Engine, requests: list[GenerationRequest]) -> list[list[Choice]]:
    """Submit every request at once (they share the engine's batches) and collect them all."""
    streams = [engine.submit(r) for r in requests]
    return list(await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), TIMEOUT_S))


def generate(engine: Engine, requests: list[GenerationRequest]) -> list[list[Choice]]:
    return asyncio.run(generate_async(engine, requests))


def generate_one(engine: Engine, request: GenerationRequest) -> Choice:
    (choices,) = generate(engine, [request])
    assert len(choices) == 1
    return choices[0]


def prompt(seed: int, length: int) -> tuple[int, ...]:
    """`length` random byte tokens (the demo tokenizer maps byte b to id b)."""
    return tuple(torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist())


def greedy(
    prompt_ids: tuple[int, ...], max_tokens: int, adapter: str | None = None, **params: Any
) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)
    return GenerationRequest(prompt_ids, sampling, adapter_id=adapter)


def make_adapter(
    adapter_id: str,
    args: ModelArgs,
    rank: int,
    alpha: float,
    targets: tuple[str, ...],
    seed: int,
    std: float = 0.1,
    kind: str = "lora",
) -> LoraAdapter:
    """Random weights for every layer and target module of the model described by `args`: A/B (LoRA), with
    magnitudes (DoRA), or IA3 vectors around one (on o_proj's and down_proj's inputs, other modules' outputs); for
    prompt tuning a soft prompt of `rank` virtual tokens."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "prompt":
        return LoraAdapter(adapter_id=adapter_id, rank=0, lora_alpha=0.0, target_modules=(), weights={}, config={},
                           kind="prompt", prompt_embeddings=torch.randn(rank, args.dim, generator=gen) * std)
    weights: dict[tuple[int, str], LoraWeight] = {}
    scales: dict[tuple[int, str], ScaleVector] = {}
    for layer in range(args.n_layers):
        for name in targets:
            d_in, d_out = args.lora_module_dims[name]
            if kind == "ia3":
                on_input = name in ("o_proj", "down_proj")
                scales[(layer, name)] = ScaleVector(1 + torch.randn(d_in if on_input else d_out, generator=gen) * std,
                                                    on_input)
                continue
            a = torch.randn(rank, d_in, generator=gen) * std
            b = torch.randn(d_out, rank, generator=gen) * std
            # A magnitude is a row norm of the weight: positive, of the order of sqrt(d_in) times the weights'.
            magnitude = (torch.rand(d_out, generator=gen) + 0.5) * d_in**0.5 * 0.02 if kind == "dora" else None
            weights[(layer, name)] = LoraWeight(a=a, b=b, scale=alpha / rank, magnitude=magnitude)
    ia3 = kind == "ia3"
    return LoraAdapter(
        adapter_id=adapter_id,
        rank=0 if ia3 else rank,
        lora_alpha=0.0 if ia3 else alpha,
        target_modules=tuple(m for m in TARGET_MODULES if m in targets),
        weights=weights,
        config={"r": rank, "lora_alpha": alpha, "target_modules": list(targets)},
        kind=kind,
        scales=scales,
    )


def assert_idle(engine: Engine) -> None:
    """Nothing scheduled, every KV block free, every adapter slot unpinned."""
    stats = engine.stats()
    assert (stats.running, stats.waiting) == (0, 0)
    assert stats.kv_blocks_used == 0
    assert stats.adapters_pinned == 0


def start_engine(adapters: Mapping[str, LoraAdapter], **settings: Any) -> Engine:
    engine = build_engine(Settings(**(ENGINE_SETTINGS | settings)))
    for adapter in adapters.values():
        engine.registry.add(adapter)
    engine.start()
    return engine
