"""DoRA, IA3 and prompt-tuning adapters saved by `peft` itself, served beside LoRA and the base model: the logits
of each equal `transformers` + `peft`'s, and one concurrent batch mixing every kind gives each request `peft`'s
greedy tokens, with the torch kernels (adapters held as the host tier's buffers) and the Triton ones (adapters in
pages; interpreted on a CPU)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.config import Settings
from server.runtime import build_engine
from tests.support.hf_checkpoints import (
    PROMPT,
    Checkpoint,
    StepKinds,
    generate_all,
    greedy_with_logprobs,
    hf_greedy,
    hf_with_adapter,
    load_into_slot,
    our_logits,
    peft,
    save_checkpoint,
)

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "lora": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=ALL_MODULES, init_lora_weights=False),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_MODULES, use_dora=True,
                                    init_lora_weights=False),
    "dora-qv-rslora": lambda: peft.LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"],
                                              use_dora=True, use_rslora=True, init_lora_weights=False),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                                  feedforward_modules=["down_proj"]),
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7),
}
KIND = {"lora": "lora", "dora": "dora", "dora-qv-rslora": "dora", "ia3": "ia3", "prompt": "prompt"}
IN_LAYERS = sorted(name for name in ADAPTERS if KIND[name] != "prompt")  # those that act inside the layers


def _trained_look(name: str, peft_model) -> None:
    """Move the vectors off their initial values, as training would: a fresh DoRA magnitude is the weight norm
    itself (its scale is exactly 1) and a fresh IA3 vector is all ones, which would hide a wrong scale."""
    for param_name, param in peft_model.named_parameters():
        if "lora_magnitude_vector" in param_name or "ia3_l" in param_name:
            param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q, k and v have biases, which DoRA leaves be
def checkpoint(request, tmp_path_factory) -> Checkpoint:
    return save_checkpoint(tmp_path_factory.mktemp("kinds"), request.param, ADAPTERS, edit=_trained_look)


def _engine(checkpoint: Checkpoint, backend: str, **settings):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    return build_engine(Settings(model=checkpoint.model_dir, adapters=checkpoint.adapters_dir, device=device,
                                 dtype="float32", lora_backend=backend, attention_backend=backend,
                                 model_runner_process=False, **settings))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("adapter", IN_LAYERS)
def test_logits_match_peft(checkpoint: Checkpoint, adapter: str, backend: str):
    engine = _engine(checkpoint, backend)
    assert engine.runner.paged == (backend == "triton")  # torch: held as host buffers; triton: in pages
    assert engine.registry.version(adapter).manifest.kind == KIND[adapter]
    ours = our_logits(engine.runner.model, PROMPT, load_into_slot(engine, adapter)).cpu()
    with torch.no_grad():
        theirs = hf_with_adapter(checkpoint, adapter)(torch.tensor([PROMPT])).logits[0].float()
        base = hf_with_adapter(checkpoint, None)(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (theirs - base).abs().max() > 1e-2  # the adapter matters, or this test proves nothing


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_batch_of_every_kind_gives_each_request_peft_s_tokens(checkpoint: Checkpoint, backend: str):
    """LoRA, DoRA, IA3 and base-model requests at once, prompts cut into chunks that share steps with others'
    decodes: every request gets the tokens `peft` generates for it alone."""
    engine = _engine(checkpoint, backend, max_num_batched_tokens=16)
    kinds = StepKinds()
    kinds.watch(engine)
    assert_every_kind_at_once_gets_peft_s_tokens(checkpoint, engine)
    assert kinds.mixed_steps > 0


def assert_every_kind_at_once_gets_peft_s_tokens(checkpoint: Checkpoint, engine) -> None:
    """Start `engine`, send a request for every adapter and one for the base model at once, each with its own prompt
    length; each must get `peft`'s greedy tokens for it alone."""
    max_tokens = 10
    engine.start()
    try:
        prompts = {name: PROMPT[: 12 + 4 * i] for i, name in enumerate([None, *sorted(ADAPTERS)])}
        ours = asyncio.run(generate_all(engine, prompts, max_tokens=max_tokens))
    finally:
        engine.shutdown()
    for adapter, prompt in prompts.items():
        soft_prompt = adapter is not None and KIND[adapter] == "prompt"
        expected = hf_greedy(checkpoint, adapter, prompt, max_tokens, cached=not soft_prompt)
        assert ours[adapter] == expected, f"adapter {adapter}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_soft_prompt_tokens_and_logprobs_match_peft(checkpoint: Checkpoint, backend: str):
    """A prompt-tuning adapter's virtual tokens take the first positions: the greedy tokens and the top-5 logprobs
    of every generated position equal those of `peft`'s forward over the soft prompt, the prompt and the tokens.
    Chunks of 5 tokens cut the prefill inside the soft prompt and where it meets the prompt."""
    engine = _engine(checkpoint, backend, max_num_batched_tokens=5)
    assert engine.registry.version("prompt").manifest.num_virtual_tokens == 7
    prompt, max_tokens = PROMPT[:20], 6
    engine.start()
    try:
        tokens, logprobs = asyncio.run(greedy_with_logprobs(engine, "prompt", prompt, max_tokens, top=5))
    finally:
        engine.shutdown()
    assert tokens == hf_greedy(checkpoint, "prompt", prompt, max_tokens, cached=False)
    with torch.no_grad():
        logits = hf_with_adapter(checkpoint, "prompt")(torch.tensor([prompt + tokens[:-1]])).logits[0, -max_tokens:]
    theirs = torch.log_softmax(logits.float(), dim=-1)
    for position, top in enumerate(logprobs):
        ids = [token for token, _ in top]
        torch.testing.assert_close(torch.tensor([lp for _, lp in top]), theirs[position, ids], rtol=1e-4, atol=1e-4)
        assert ids == theirs[position].topk(5).indices.tolist()


@pytest.mark.gpu
def test_replayed_decode_graphs_apply_each_kind_on_cuda(checkpoint: Checkpoint):
    """On a GPU with the compiled Triton kernels and decode CUDA graphs: decode steps mixing DoRA and IA3 tokens
    replay the graph that applies their vectors, and every request still gets `peft`'s tokens."""
    engine = _engine(checkpoint, "triton", max_num_batched_tokens=16, max_num_seqs=8)
    assert engine.runner.can_capture_graphs and engine.runner._graphs  # captured at start
    replays: list[tuple[int, bool]] = []
    for key, (graph, _) in engine.runner._graphs.items():
        replay = graph.replay
        graph.replay = lambda key=key, replay=replay: replays.append(key) or replay()
    assert_every_kind_at_once_gets_peft_s_tokens(checkpoint, engine)
    assert any(scaled for _, scaled in replays)
