"""Our model + LoRA against the ecosystem's reference: `transformers` checkpoints and `peft` adapters.

Tiny random checkpoints are saved by `transformers`, adapters by `peft` (random A and B, so every delta
counts), and our loader reads both from disk exactly as `lorahive serve --model --adapters` does.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.config import Settings
from server.runtime import build_engine
from tests.support.hf_checkpoints import (
    ARCHITECTURES,
    PROMPT,
    Checkpoint,
    StepKinds,
    generate_all,
    hf_greedy,
    hf_with_adapter,
    load_into_slot,
    our_logits,
    peft,
    save_checkpoint,
)

ADAPTERS = {
    "all-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]),
    "qv-rslora-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "mlp-patterns": dict(r=6, lora_alpha=12, target_modules=["gate_proj", "up_proj", "down_proj"],
                         rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3.0}),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def checkpoint(request, tmp_path_factory) -> Checkpoint:
    configs = {name: (lambda kwargs=kwargs: peft.LoraConfig(init_lora_weights=False, **kwargs))
               for name, kwargs in ADAPTERS.items()}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), request.param, configs)


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_logits_match_transformers_and_peft(checkpoint: Checkpoint, adapter: str | None):
    engine = build_engine(Settings(model=checkpoint.model_dir, adapters=checkpoint.adapters_dir,
                                   model_runner_process=False))  # reads the model's logits directly
    assert engine.registry.ids() == sorted(ADAPTERS)  # every adapter imported, none skipped
    slot = -1 if adapter is None else load_into_slot(engine, adapter)
    ours = our_logits(engine.runner.model, PROMPT, slot)
    with torch.no_grad():
        theirs = hf_with_adapter(checkpoint, adapter)(torch.tensor([PROMPT])).logits[0].float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    if adapter is not None:  # the adapter must matter, or this test proves nothing
        base = hf_with_adapter(checkpoint, None)(torch.tensor([PROMPT])).logits[0]
        assert (theirs - base).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_generation_matches_peft_generate(checkpoint: Checkpoint, backend: str):
    """All adapters and the base model in one concurrent batch, each equal to peft's `generate`, with the LoRA
    and attention kernels of `backend` (Triton: interpreted on a CPU, compiled on CUDA). A small token budget
    cuts the prompts into chunks on a cached prefix that share steps with other sequences' decodes (Mistral's
    window of 8 is shorter than every sequence)."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    engine = build_engine(Settings(model=checkpoint.model_dir, adapters=checkpoint.adapters_dir, device=device,
                                   dtype="float32", lora_backend=backend, attention_backend=backend,
                                   max_num_batched_tokens=16, model_runner_process=False))
    assert (engine.runner.model.lora.backend, engine.runner.model.attention_context.backend) == (backend, backend)
    kinds = StepKinds()
    kinds.watch(engine)
    max_tokens = 12
    engine.start()
    try:
        prompts = {name: PROMPT[: 10 + 5 * i] for i, name in enumerate([None, *ADAPTERS])}
        ours = asyncio.run(generate_all(engine, prompts, max_tokens=max_tokens))
    finally:
        engine.shutdown()
    assert kinds.mixed_steps > 0 and kinds.chunks_on_prefix > 0
    for adapter, prompt in prompts.items():
        assert ours[adapter] == hf_greedy(checkpoint, adapter, prompt, max_tokens), f"adapter {adapter}"
