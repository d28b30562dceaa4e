"""Start-up sizes the KV cache so that no step the scheduler can build runs out of memory, and refuses a
--max-model-len that the cache cannot hold once, naming the flags to change."""

from __future__ import annotations

import pytest
import torch

from kernels.layer_adapters import AdapterStack
from server import runtime
from server.adapter_pool import AdapterSlotPool
from server.config import Settings, StartupError
from server.demo import build_demo_model
from server.lora_linear import LoRALinear
from server.memory_profile import (
    StepLimits,
    estimate_largest_step,
    largest_steps,
    measure_largest_step,
    peak_bytes_of,
)
from server.model_runner import adapter_page_bytes
from server.runtime import GpuBudget, build_engine, check_holds_one_sequence, cuda_kv_tokens, step_limits
from tests.support.cli_runs import serve_error

GIB = 2**30
LLAMA_8B_BF16_TOKEN_BYTES = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x kv heads x head dim x bf16


# ---- refusals -------------------------------------------------------------------------------------


def test_max_model_len_beyond_the_kv_cache_tokens_is_refused_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    line = serve_error(["--device", "cpu", "--max-model-len", "1024", "--kv-cache-tokens", "512"], capsys)
    assert line.startswith("error: --max-model-len 1024: the KV cache holds 512 tokens")
    assert "raise --kv-cache-tokens to at least 1024 or lower --max-model-len to at most 512" in line


def test_max_model_len_past_the_demo_models_positions_is_refused_at_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = serve_error(["--device", "cpu", "--max-model-len", "4096"], capsys)
    assert line == ("error: --max-model-len 4096: the demo model's positions end at 2048; lower --max-model-len, "
                    "or serve a checkpoint with --model")


def test_a_gpu_that_cannot_hold_one_sequence_names_what_to_lower() -> None:
    # An 8B model's default 128k context on a GPU a third of which it may use: 3 GiB left, 24k tokens.
    settings = Settings(gpu_memory_utilization=0.3)
    budget = GpuBudget(total=80 * GIB, in_use=16 * GIB, adapter_pool=1 * GIB, activation_peak=4 * GIB)
    tokens = cuda_kv_tokens(settings, budget, LLAMA_8B_BF16_TOKEN_BYTES)
    assert tokens == 3 * GIB // LLAMA_8B_BF16_TOKEN_BYTES
    with pytest.raises(StartupError) as refused:
        check_holds_one_sequence(settings, tokens, 131072)
    message = str(refused.value)
    assert message.startswith("--max-model-len (default: the model's 131072): the KV cache holds 24576 tokens")
    assert "lower --max-model-len (to at most 24576), or raise --gpu-memory-utilization (now 0.3)" in message
    assert "--max-num-batched-tokens, --max-num-seqs or --max-gpu-adapters" in message


def test_on_cuda_the_cache_gets_what_the_weights_pool_and_measured_peak_leave(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # The CUDA branch's arithmetic with the device's answers stubbed: 10 GiB, 2 GiB in use, a 1 GiB peak.
    model, _ = build_demo_model()
    settings = Settings(max_num_batched_tokens=512, max_num_seqs=16, max_gpu_adapters=2, max_lora_rank=16)
    profiled: list[StepLimits] = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * GIB, 10 * GIB))
    monkeypatch.setattr(runtime, "measure_largest_step", lambda m, limits: profiled.append(limits) or GIB)
    with caplog.at_level("INFO", logger="lorahive.runtime"):
        blocks, pool = runtime.kv_cache_blocks(settings, model, torch.device("cuda"), torch.float32)
    assert profiled == [step_limits(settings, model.args)]
    assert pool == runtime.lora_pool_bytes(settings, model.args, torch.float32)  # pages for 2 adapters of rank 16
    graphs = runtime.estimate_decode_graph_pool(model.args, step_limits(settings, model.args), torch.float32)
    assert blocks == (int(10 * GIB * 0.9) - 2 * GIB - pool - GIB - graphs) // DEMO_TOKEN_BYTES // 16
    assert "1.00 GiB largest step" in caplog.text and "left for the KV cache" in caplog.text


DEMO_TOKEN_BYTES = 4 * 2 * 4 * 32 * 4  # the demo: layers x (K, V) x kv heads x head dim x fp32


def test_on_cuda_the_adapter_tier_gets_its_share_of_the_memory_the_kv_cache_would_get(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _ = build_demo_model()
    settings = Settings(max_num_batched_tokens=512, max_num_seqs=16, max_lora_rank=16, adapter_memory_share=0.25)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * GIB, 10 * GIB))
    monkeypatch.setattr(runtime, "measure_largest_step", lambda m, limits: GIB)
    blocks, pool = runtime.kv_cache_blocks(settings, model, torch.device("cuda"), torch.float32)
    graphs = runtime.estimate_decode_graph_pool(model.args, step_limits(settings, model.args), torch.float32)
    shared = int(10 * GIB * 0.9) - 2 * GIB - GIB - graphs
    assert pool == int(0.25 * shared) and blocks == (shared - pool) // DEMO_TOKEN_BYTES // 16
    # Slots follow the memory: every page can hold a small adapter, thousands of them on this toy model.
    tier = AdapterSlotPool(None, 16, adapter_page_bytes(model), pool)
    assert tier.num_slots == pool // adapter_page_bytes(model) > 1000


def test_kv_cache_tokens_beyond_the_gpu_budget_is_refused() -> None:
    settings = Settings(kv_cache_tokens=100_000)
    budget = GpuBudget(total=80 * GIB, in_use=70 * GIB, adapter_pool=1 * GIB, activation_peak=1 * GIB)
    with pytest.raises(StartupError) as refused:
        cuda_kv_tokens(settings, budget, LLAMA_8B_BF16_TOKEN_BYTES)
    message = str(refused.value)
    assert message.startswith("--kv-cache-tokens 100000 needs 12.21 GiB, but only 0 MiB")
    assert "lower --kv-cache-tokens (at most 0), or raise --gpu-memory-utilization" in message


def test_a_kv_cache_beyond_the_host_memory_is_refused_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_host_available_bytes", lambda: 64 * 2**20)
    with pytest.raises(StartupError) as refused:
        build_engine(Settings(device="cpu", kv_cache_tokens=2048, max_num_seqs=4, model_runner_process=False))
    message = str(refused.value)
    assert message.startswith("--kv-cache-tokens 2048 takes 8 MiB and the largest step (--max-num-batched-tokens "
                              "2048, --max-num-seqs 4) up to ")
    assert "but this machine has 64 MiB available; lower --kv-cache-tokens" in message


def test_an_explicit_cache_below_the_models_default_context_still_starts() -> None:
    # No --max-model-len: the operator chose the cache; requests longer than it are refused one by one.
    engine = build_engine(Settings(device="cpu", kv_cache_tokens=512, block_size=16, model_runner_process=False))
    assert engine.max_model_len == 2048 and engine.allocator.num_blocks == 32


@pytest.mark.parametrize(("host_bytes", "bound_by"), [(4 * GIB, "what the batches can need"), (64 * 2**20, "share")])
def test_a_cpu_servers_stacks_come_out_of_the_host_budget(host_bytes: int, bound_by: str) -> None:
    """A CPU model runner reads a batch's adapters from copies kept stacked (`kernels.layer_adapters.AdapterStack`);
    they are adapter weights in host memory too, so --max-host-adapter-bytes covers them: the host tier gets the
    flag less the stacks' budget, and the model runner shares that budget out to its layers of each shape."""
    settings = Settings(device="cpu", max_host_adapter_bytes=host_bytes, max_lora_rank=16, max_num_seqs=8,
                        model_runner_process=False)
    engine = build_engine(settings)
    try:
        args = engine.args
        stacks = runtime.stack_budget_bytes(settings, args, torch.float32, paged=False)
        rank_row = sum(d_in + d_out for d_in, d_out in args.lora_module_dims.values()) * args.n_layers
        need = AdapterStack.capacity_for(8) * 16 * rank_row * 4  # fp32 stacks of max-rank adapters
        assert stacks == (need if bound_by == "what the batches can need" else host_bytes // 8) > 0
        assert engine.registry.host_budget_bytes == host_bytes - stacks
        assert runtime.stack_budget_bytes(settings, args, torch.float32, paged=True) == 0  # pages: no stacks
        groups = {id(module.targets.group): module.targets.group for module in engine.runner.model.modules()
                  if isinstance(module, LoRALinear)}.values()  # one per shape: q|k|v, o, gate|up, down
        caps = [group.max_elements for group in groups]
        assert [len(group.layers) for group in groups] == [args.n_layers] * 4
        assert sum(caps) * 4 <= stacks < (sum(caps) + len(caps)) * 4
    finally:
        engine.shutdown()


# ---- the largest step fits what start-up reserves -------------------------------------------------------


def test_the_cpu_measurement_sees_what_a_function_allocates() -> None:
    def allocate() -> None:
        kept = torch.empty(3 * 2**20, dtype=torch.uint8)
        torch.empty(2**20, dtype=torch.uint8)  # freed at once, while `kept` lives: peak 4 MiB
        del kept
        torch.empty(2 * 2**20, dtype=torch.uint8)

    assert peak_bytes_of(allocate, torch.device("cpu")) == 4 * 2**20


def test_the_largest_step_spends_the_whole_budget() -> None:
    limits = StepLimits(max_num_batched_tokens=256, max_num_seqs=8, max_model_len=512, block_size=16,
                        max_gpu_adapters=4, max_lora_rank=16)
    mixed, alone = largest_steps(limits)
    assert [c.num_tokens for c in mixed] == [1] * 7 + [249] and {c.context_len for c in mixed} == {512}
    assert [(c.num_tokens, c.context_len) for c in alone] == [(256, 512)]


@pytest.mark.parametrize(("batched_tokens", "seqs"), [(256, 8), (64, 64)])
def test_peak_of_the_largest_step_fits_what_start_up_reserves(batched_tokens: int, seqs: int) -> None:
    model, _ = build_demo_model()
    model.lora.backend = "torch"
    settings = Settings(device="cpu", max_num_batched_tokens=batched_tokens, max_num_seqs=seqs, max_model_len=512,
                        max_gpu_adapters=4, max_lora_rank=16)
    limits = step_limits(settings, model.args)
    measured = measure_largest_step(model, limits)
    reserved = estimate_largest_step(model.args, limits, torch.float32)  # what CPU start-up checks room for
    # The step really ran: at least every sampled row's fp32 logits were live at once.
    assert measured >= seqs * model.args.vocab_size * 4
    # A bound, and a useful one: not so loose that it would starve the KV cache.
    assert measured <= reserved <= 4 * measured, (measured, reserved)
    assert all(layer.lora_a is None for layer in model.lora_layers()), "the profile's adapter pages were freed"
