"""Our model + LoRA against the ecosystem's reference: `transformers` checkpoints and `peft` adapters.

Tiny random checkpoints are saved by `transformers`, adapters by `peft` (random A and B, so every delta
counts), and our loader reads both from disk exactly as `lorahive serve --model --adapters` does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from server.config import Settings  # noqa: E402
from server.model import KVCache, Transformer  # noqa: E402
from server.requests import GenerationRequest, SamplingParams  # noqa: E402
from server.runtime import build_engine  # noqa: E402
from server.scheduler import ScheduledChunk  # noqa: E402
from server.step_builder import build_step  # noqa: E402
from server.tokenizer import build_byte_tokenizer  # noqa: E402

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
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=8),
}
ADAPTERS = {
    "all-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]),
    "qv-rslora-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "mlp-patterns": dict(r=6, lora_alpha=12, target_modules=["gate_proj", "up_proj", "down_proj"],
                         rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3.0}),
}
PROMPT = [256, *range(40, 60), *range(90, 70, -1)]  # 41 tokens: longer than Mistral's window


@dataclass
class Checkpoint:
    model_dir: Path
    adapters_dir: Path
    hf_model: torch.nn.Module


def _save_checkpoint(tmp: Path, arch: str) -> Checkpoint:
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
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        peft_model = peft.get_peft_model(
            transformers.AutoModelForCausalLM.from_pretrained(model_dir),
            peft.LoraConfig(init_lora_weights=False, **kwargs),
        )
        peft_model.save_pretrained(adapters_dir / name)
    return Checkpoint(model_dir, adapters_dir, hf_model)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def checkpoint(request, tmp_path_factory) -> Checkpoint:
    return _save_checkpoint(tmp_path_factory.mktemp("ckpt"), request.param)


def _hf_with_adapter(ckpt: Checkpoint, adapter: str | None):
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt.model_dir).float().eval()
    if adapter is None:
        return base
    return peft.PeftModel.from_pretrained(base, ckpt.adapters_dir / adapter).eval()


def _our_logits(model: Transformer, tokens: list[int], slot: int) -> torch.Tensor:
    """Logits at every position of one prefill, through the same step builder the engine uses."""
    args, block = model.args, 16
    cache = KVCache(args.n_layers, 32, block, args.n_kv_heads, args.head_dim, torch.float32, "cpu")

    @dataclass
    class _Seq:  # the fields of scheduler.Sequence that build_step reads
        token_ids: list[int]
        num_computed: int = 0
        blocks: tuple[int, ...] = tuple(range(32))
        slot: int = -1

    step, lora_batch, _ = build_step([ScheduledChunk(_Seq(tokens, slot=slot), len(tokens))], block,
                                     args.sliding_window, "cpu")
    step.logits_index = torch.arange(len(tokens))
    model.lora.batch = lora_batch
    try:
        return model(step, cache)
    finally:
        model.lora.batch = None


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_logits_match_transformers_and_peft(checkpoint: Checkpoint, adapter: str | None):
    engine = build_engine(Settings(model=checkpoint.model_dir, adapters=checkpoint.adapters_dir,
                                   model_runner_process=False))  # reads the model's logits directly
    assert engine.registry.ids() == sorted(ADAPTERS)  # every adapter imported, none skipped
    slot = -1
    if adapter is not None:
        version = engine.registry.version(adapter)
        slot = engine.pool.acquire(version, version.weights)
        for write in engine.pool.take_writes():
            engine.runner.apply(write)
    ours = _our_logits(engine.runner.model, PROMPT, slot)
    with torch.no_grad():
        theirs = _hf_with_adapter(checkpoint, adapter)(torch.tensor([PROMPT])).logits[0].float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    if adapter is not None:  # the adapter must matter, or this test proves nothing
        base = _hf_with_adapter(checkpoint, None)(torch.tensor([PROMPT])).logits[0]
        assert (theirs - base).abs().max() > 1e-2


async def _generate_all(engine, prompts: dict[str | None, list[int]], max_tokens: int) -> dict:
    async def one(adapter, prompt):
        stream = engine.submit(
            GenerationRequest(tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                            ignore_eos=True), adapter_id=adapter)
        )
        return [t async for delta in stream for t in delta.token_ids]

    results = await asyncio.gather(*(one(a, p) for a, p in prompts.items()))
    return dict(zip(prompts, results, strict=True))


@dataclass
class _StepKinds:
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
    kinds = _StepKinds()
    kinds.watch(engine)
    max_tokens = 12
    engine.start()
    try:
        prompts = {name: PROMPT[: 10 + 5 * i] for i, name in enumerate([None, *ADAPTERS])}
        ours = asyncio.run(_generate_all(engine, prompts, max_tokens=max_tokens))
    finally:
        engine.shutdown()
    assert kinds.mixed_steps > 0 and kinds.chunks_on_prefix > 0
    for adapter, prompt in prompts.items():
        hf = _hf_with_adapter(checkpoint, adapter)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                              min_new_tokens=max_tokens, pad_token_id=0, eos_token_id=None)
        assert ours[adapter] == out[0, len(prompt):].tolist(), f"adapter {adapter}"
