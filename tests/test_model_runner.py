"""The model runner alone touches device memory: it writes the adapter pool's decisions into pages and the page
table, runs mixed-adapter steps exactly as merged weights would, and the engine reports its load as `EngineStats`.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from adapters_store import TARGET_MODULES, LoraAdapter
from kernels import LoRABatch, PageTable
from kernels.paging import ZERO_PAGE, PageRows, pages_for_rank
from server import lora_linear as lora_linear_module
from server.adapter_packer import AdapterPacker, PackedWeight
from server.adapter_pool import AdapterSlotPool
from server.demo import build_demo_model
from server.engine import Engine, EngineStats
from server.lora_linear import LoRAContext, LoRALinear, fused_linear
from server.model import Transformer
from server.model_runner import ModelRunner, adapter_page_bytes
from server.requests import EngineStepError
from tests.support.engines import (
    ADAPTER_SPECS,
    MLP,
    TIMEOUT_S,
    assert_idle,
    collect,
    generate_one,
    greedy,
    make_adapter,
    prompt,
    start_engine,
)
from tests.support.runner_steps import run_greedy, sequence, step_all

SERVER = Path(__file__).resolve().parents[1] / "server"

# Modules of server/ that may allocate or write device tensors, each with the reason. Every other module only
# decides, and reaches the device through the model runner. (kernels/ is outside server/: the device primitives
# the model and the runner call, working only on the tensors they are handed.)
DEVICE_MODULES = {
    "model_runner.py": "the owner: KV cache, adapter pages and page table, copy stream, step inputs, forward",
    "model.py": "the model's own modules: the KV cache's buffers, and the forward writing K/V into them",
    "lora_linear.py": "a layer's own page buffers, allocated and written when the runner calls it",
    "step_builder.py": "builds a step's input tensors on the device; called by the runner only",
    "sampling.py": "the sampler's tensors on the logits' device; called by the runner only",
    "runtime.py": "startup, before any runner exists: picks the device and moves the loaded model onto it",
    "memory_profile.py": "startup: runs the largest step through a scratch runner and reads device memory counters",
    "checkpoint.py": "startup: fills the model's weights from a checkpoint (and writes one back, to the CPU)",
    "demo.py": "startup: draws the demo model's weights, on the CPU",
    "adapter_packer.py": "casts adapter weights to the serving dtype and pins them in host memory (the host tier, "
                         "on the loader threads), so the runner's copies only copy, asynchronously",
}
# Modules that must stay free of device work, whatever the list above says.
DECIDERS = ("scheduler.py", "engine.py", "adapter_pool.py", "metrics.py", "kv_blocks.py")

DEVICE_METHODS = {
    "to", "cuda", "copy_", "index_copy_", "pin_memory", "write_pages", "allocate_pages", "wait_stream", "wait_event",
    "record_stream",
}
DEVICE_NAMES = {"KVCache", "PageTable", "allocate_buffers", "build_step", "sample"}  # device state and its makers


def device_work(source: str) -> list[str]:
    """Each place in `source` that moves, writes or allocates device tensors, or builds device state."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr in DEVICE_METHODS:
                found.append(f"line {node.lineno}: .{node.func.attr}(")
            found += [f"line {node.lineno}: {k.arg}=" for k in node.keywords if k.arg in ("device", "non_blocking")]
        elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch.cuda."):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Name) and node.id in DEVICE_NAMES:
            found.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.Assign):  # publishing a step's LoRA metadata or page table into the model
            found += [f"line {node.lineno}: {ast.unparse(t)} =" for t in node.targets
                      if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Attribute) and t.value.attr == "lora"]
    return found


def test_only_the_model_runner_and_its_helpers_touch_device_tensors():
    offenders = {}
    for path in sorted(SERVER.rglob("*.py")):
        name = path.relative_to(SERVER).as_posix()
        found = device_work(path.read_text())
        if found and name not in DEVICE_MODULES:
            offenders[name] = found
    assert not offenders, f"device work outside the model runner: {offenders}"
    assert not set(DECIDERS) & set(DEVICE_MODULES)
    for name in DECIDERS:
        assert device_work((SERVER / name).read_text()) == [], name


def test_the_scan_sees_device_work():
    """The scan itself: each kind of device work it must catch is caught."""
    snippets = [
        "x.to(device)", "w.index_copy_(0, i, v)", "torch.tensor([1], device=d)", "a.copy_(b, non_blocking=True)",
        "s = torch.cuda.Stream(d)", "cache = KVCache(1, 2, 3, 4, d, e)", "model.lora.batch = b", "sample(l, s)",
    ]
    for snippet in snippets:
        assert device_work(snippet), snippet
    assert device_work("pool.acquire(key, weights)\nseq.slot = slot") == []


# ---- behaviour ------------------------------------------------------------------------------------------

MAX_RANK = 16
BLOCK_SIZE = 16
PACKER = AdapterPacker(torch.float32)  # the host tier's form of an adapter, for the float32 model below


@pytest.fixture(scope="module")
def model() -> Transformer:
    return build_demo_model()[0].to(torch.float32)


@pytest.fixture(scope="module")
def adapters(model) -> dict[str, LoraAdapter]:
    return {
        "a0": make_adapter("a0", model.args, *ADAPTER_SPECS["a0"], seed=11, std=0.2),
        "a2": make_adapter("a2", model.args, *ADAPTER_SPECS["a2"], seed=12, std=0.2),
        "mlp": make_adapter("mlp", model.args, 4, 8.0, MLP, seed=13, std=0.2),
    }


def runner_and_pool(model: Transformer, num_slots: int, paged: bool = False) -> tuple[ModelRunner, AdapterSlotPool]:
    """A runner with its pool: adapters read from the host buffers, as a CPU runner does, or (`paged`) written into
    pages, as on a GPU (the torch kernels then read the pages)."""
    pool = AdapterSlotPool(num_slots, MAX_RANK, adapter_page_bytes(model), paged=paged)
    runner = ModelRunner(model, num_kv_blocks=32, block_size=BLOCK_SIZE, num_slots=pool.num_slots,
                         max_rank=pool.max_rank, num_pages=pool.num_pages, paged=paged)
    return runner, pool


def merged(model: Transformer, adapter: LoraAdapter | None) -> Transformer:
    """A copy of `model` with `adapter` folded into its base weights: the plain-PyTorch meaning of LoRA."""
    merged_model = copy.deepcopy(model)
    if adapter is None:
        return merged_model
    with torch.no_grad():
        for layer_index, block in enumerate(merged_model.layers):
            for module in block.modules():
                if not isinstance(module, LoRALinear):
                    continue
                offset = 0
                for name, width in zip(module.slice_names, module.slice_widths, strict=True):
                    weight = adapter.weights.get((layer_index, name))
                    if weight is not None:
                        module.base.weight[offset : offset + width] += (weight.b * weight.scale) @ weight.a
                    offset += width
    return merged_model


def alone_with_merged_weights(model: Transformer, adapter: LoraAdapter | None, prompt_ids) -> list[int]:
    runner, _ = runner_and_pool(merged(model, adapter), num_slots=1)
    return run_greedy(runner, [sequence(0, prompt_ids, slot=-1)])[0]


@pytest.mark.parametrize("paged", [False, True])
def test_a_mixed_adapter_batch_gives_each_sequence_its_merged_weights_tokens(model, adapters, paged):
    runner, pool = runner_and_pool(model, num_slots=3, paged=paged)
    slots = {name: pool.acquire(name, PACKER.pack(adapter)) for name, adapter in adapters.items()}
    for write in pool.take_writes():
        runner.apply(write)
    cases = [(None, prompt(1, 9)), ("a0", prompt(2, 23)), ("a2", prompt(3, 5)), ("mlp", prompt(4, 14)),
             ("a0", prompt(5, 3))]
    seqs = [sequence(i, p, -1 if name is None else slots[name]) for i, (name, p) in enumerate(cases)]
    batched = run_greedy(runner, seqs)
    alone = [alone_with_merged_weights(model, adapters.get(name), p) for name, p in cases]
    assert batched == alone
    base = [alone_with_merged_weights(model, None, p) for name, p in cases if name is not None]
    assert all(a != b for a, b in zip(alone[1:], base, strict=True))  # every adapter steers: the check has teeth


def test_a_step_runs_each_adapters_rows_together_decode_rows_first(model, adapters):
    """Whatever the plan's order, the forward sees the tokens grouped by adapter slot (the LoRA reference then
    updates them in place), decode tokens first within a slot, and each sampled token still goes to its chunk."""
    runner, pool = runner_and_pool(model, num_slots=3)
    slot = {name: pool.acquire(name, PACKER.pack(adapters[name])) for name in ("a0", "a2")}
    for write in pool.take_writes():
        runner.apply(write)
    seqs = [sequence(i, prompt(i, 6), s) for i, s in enumerate([slot["a2"], -1, slot["a0"], slot["a2"], slot["a0"]])]
    step_all(runner, seqs)  # every prompt prefilled: the next step decodes each sequence
    newcomer = sequence(len(seqs), prompt(9, 7), slot["a0"])
    seen = []
    hook = model.layers[0].attention.wqkv.register_forward_pre_hook(
        lambda module, _: seen.append((module.context.batch.token_slots.tolist(), module.context.batch.grouped_from)))
    try:
        plan = step_all(runner, [*seqs, newcomer])
    finally:
        hook.remove()
    a0, a2 = slot["a0"], slot["a2"]
    assert seen == [([-1, a0, a0, *[a0] * 7, a2, a2] if a0 < a2 else [-1, a2, a2, a0, a0, *[a0] * 7], 1)]
    assert len(plan) == 6 and all(len(seq.output_ids) == 2 for seq in seqs)
    assert newcomer.output_ids == run_greedy(runner, [sequence(0, prompt(9, 7), slot["a0"])])[0][:1]


@pytest.mark.parametrize("paged", [False, True])
def test_a_cpu_runner_skips_the_layers_no_held_adapter_targets(model, adapters, monkeypatch, paged):
    """With only an MLP adapter held, a CPU runner's attention layers run no LoRA at all (with pages every layer
    still does: a captured CUDA graph must hold the LoRA of adapters loaded after it); once an adapter on every
    module is held, and after it is cleared again, each layer does what its held adapters need."""
    runner, pool = runner_and_pool(model, num_slots=2, paged=paged)
    calls = []
    add_lora = lora_linear_module.add_lora
    monkeypatch.setattr(lora_linear_module, "add_lora", lambda *args: calls.append(args[5]) or add_lora(*args))
    layers = model.args.n_layers

    def lora_layers_of_a_step(slot: int) -> int:
        calls.clear()
        step_all(runner, [sequence(0, prompt(1, 5), slot)])
        return len(calls)

    mlp = pool.acquire("mlp", PACKER.pack(adapters["mlp"]))
    for write in pool.take_writes():
        runner.apply(write)
    assert lora_layers_of_a_step(mlp) == (4 if paged else 2) * layers  # gate|up and down
    everywhere = pool.acquire("a0", PACKER.pack(adapters["a0"]))
    for write in pool.take_writes():
        runner.apply(write)
    assert lora_layers_of_a_step(mlp) == 4 * layers
    runner.clear_slot(everywhere)
    assert lora_layers_of_a_step(mlp) == (4 if paged else 2) * layers


@pytest.mark.parametrize("paged", [False, True])
def test_load_adapter_then_clear_slot_round_trip(model, adapters, paged):
    runner, pool = runner_and_pool(model, num_slots=2, paged=paged)
    adapter = adapters["a2"]
    rank = ADAPTER_SPECS["a2"][0]
    pages = list(range(1, 1 + pages_for_rank(rank))) if paged else []
    packed = PACKER.pack(adapter)
    runner.load_adapter(1, pages, packed)
    assert runner.table.ranks[1].item() == rank and runner.table.host_pages[1] == tuple(pages)
    assert runner.table.ranks[0].item() == 0  # the other slot untouched
    ffn = model.layers[0].feed_forward.w_down
    # a2 targets o_proj and the MLP: the fused q|k|v layer records that the reference has nothing to do there.
    attention = model.layers[0].attention
    assert attention.wqkv.targets[1].slices == () and attention.wo.targets[1].slices == (0,)
    if paged:
        assert ffn.lora_b[pages].abs().sum() > 0 and ffn.lora_b[ZERO_PAGE].abs().sum() == 0
    else:  # o_proj reads the packed weights where the host tier holds them: no pages, no copy
        assert ffn.lora_a is None and attention.wo.targets[1].a_t.shape == (attention.wo.d_in, rank)
        assert attention.wo.targets[1].a_t.untyped_storage().data_ptr() == packed.buffer.untyped_storage().data_ptr()
    with_adapter = run_greedy(runner, [sequence(0, prompt(7, 12), slot=1)])[0]
    assert with_adapter == alone_with_merged_weights(model, adapter, prompt(7, 12))

    runner.clear_slot(1)
    assert 1 not in attention.wo.targets
    assert runner.table.ranks[1].item() == 0 and runner.table.pages[1].tolist() == [ZERO_PAGE] * pages_for_rank(16)
    cleared = run_greedy(runner, [sequence(0, prompt(7, 12), slot=1)])[0]
    assert cleared == alone_with_merged_weights(model, None, prompt(7, 12)) != with_adapter


def test_a_cpu_runner_reads_each_fused_layer_of_an_adapter_as_views_of_the_host_buffer(model):
    """The packer lays a layer's A blocks out one after the other, so even q|k|v's three slices are one view."""
    runner, _ = runner_and_pool(model, num_slots=1)
    packed = PACKER.pack(make_adapter("full", model.args, 8, 16.0, TARGET_MODULES, seed=15, std=0.2))
    runner.load_adapter(0, [], packed)
    buffer = packed.buffer.untyped_storage().data_ptr()
    for module in model.lora_layers():
        held = module.targets[0]
        assert held.slices == tuple(range(len(module.slice_names)))
        assert held.a_t.shape == (module.d_in, 8 * len(held.slices))
        assert all(t.untyped_storage().data_ptr() == buffer for t in (held.a_t, *held.b))
    assert run_greedy(runner, [sequence(0, prompt(6, 9), slot=0)])[0] == alone_with_merged_weights(
        model, make_adapter("full", model.args, 8, 16.0, TARGET_MODULES, seed=15, std=0.2), prompt(6, 9))


def test_a_load_into_pages_another_adapter_filled_leaves_nothing_of_it(model, adapters):
    """A load writes only the rank rows an adapter has; every other row of its pages (modules it does not target,
    ranks past its own) reads as zero, whatever the pages held before."""
    runner, _ = runner_and_pool(model, num_slots=1, paged=True)
    full = make_adapter("full", model.args, 16, 16.0, TARGET_MODULES, seed=14, std=0.2)
    runner.load_adapter(0, [1], PACKER.pack(full))
    runner.clear_slot(0)
    runner.load_adapter(0, [1], PACKER.pack(adapters["mlp"]))  # rank 4, MLP only: into the same page
    reused = run_greedy(runner, [sequence(0, prompt(8, 10), slot=0)])[0]
    assert reused == alone_with_merged_weights(model, adapters["mlp"], prompt(8, 10))


@pytest.mark.gpu
def test_a_step_waits_only_for_the_loads_of_adapters_it_reads():
    """A copy still queued on the side stream (a prefetch) holds back the step that reads its slot, not the
    others: the side stream here sleeps before the load, and a base-model step finishes meanwhile."""
    cuda_model = build_demo_model()[0].to("cuda", torch.float32)
    runner, _ = runner_and_pool(cuda_model, num_slots=2, paged=True)
    adapter = make_adapter("a0", cuda_model.args, *ADAPTER_SPECS["a0"], seed=11, std=0.2)
    run_greedy(runner, [sequence(0, prompt(1, 9), slot=-1)])  # warm: the CUDA libraries' set-up is done
    with torch.cuda.stream(runner._copy_stream):
        torch.cuda._sleep(4_000_000_000)  # seconds of work ahead of the copy
    runner.load_adapter(1, [1], AdapterPacker(torch.float32, pin_memory=True).pack(adapter))
    loaded = runner._copy_stream.record_event()
    base = run_greedy(runner, [sequence(1, prompt(2, 9), slot=-1)])[0]  # each step syncs on its tokens
    assert not loaded.query(), "a step that reads no loaded slot waited for the copy"
    with_adapter = run_greedy(runner, [sequence(2, prompt(3, 9), slot=1)])[0]
    assert loaded.query()
    assert with_adapter == alone_with_merged_weights(cuda_model, adapter, prompt(3, 9))
    assert base == alone_with_merged_weights(cuda_model, None, prompt(2, 9))


class Int8Linear(nn.Module):
    """A stand-in for a quantized base layer: int8 weights and a per-row scale, dequantized in the forward."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("scale", weight.abs().amax(dim=1, keepdim=True) / 127)
        self.register_buffer("qweight", torch.round(weight / self.scale).to(torch.int8))

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dequantized().T


def test_lora_linear_adds_the_same_delta_over_any_base_layer():
    """The LoRA delta does not depend on the base layer: over a quantized base it is the one over nn.Linear."""
    widths, names, rank = (24, 8), ("q_proj", "k_proj"), 8
    gen = torch.Generator().manual_seed(5)
    quantized = Int8Linear(torch.randn(sum(widths), 16, generator=gen))
    linear = fused_linear(16, widths, bias=False)
    with torch.no_grad():
        linear.weight.copy_(quantized.dequantized())
    context = LoRAContext()
    layers = [LoRALinear(base, widths, names, context) for base in (quantized, linear)]
    slices = [(torch.randn(rank, 16, generator=gen), torch.randn(width, rank, generator=gen)) for width in widths]
    pages = [1]
    context.table = PageTable.empty(num_slots=1, max_rank=16)
    context.table.assign(0, rank, pages)
    for layer in layers:
        layer.allocate_pages(2, torch.float32, "cpu")
        layer.write_pages(0, PageRows(pages, "cpu"), [PackedWeight(a, b.T.contiguous()) for a, b in slices])
    x = torch.randn(3, 16, generator=gen)
    context.batch = LoRABatch.from_token_slots([0, -1, 0])  # the middle token has no adapter
    over_quantized, over_linear = (layer(x) for layer in layers)
    torch.testing.assert_close(over_quantized, over_linear)
    delta = over_quantized - quantized(x)
    assert delta[1].abs().max() == 0 and delta[0].abs().max() > 1e-2
    assert [name for name, _ in layers[0].named_parameters()] == []  # nothing of the base became LoRA's
    assert [name for name, _ in layers[1].named_parameters()] == ["base.weight"]


def test_engine_stats_reflect_a_running_request():
    engine = start_engine({"a0": make_adapter("a0", build_demo_model()[0].args, *ADAPTER_SPECS["a0"], seed=3)})
    during_step: list[EngineStats] = []
    stepped = threading.Event()
    execute = engine.runner.execute

    def recording_execute(plan, overlap=None):
        during_step.append(engine.stats())
        stepped.set()
        return execute(plan, overlap)

    engine.runner.execute = recording_execute
    try:
        assert engine.stats().running == engine.stats().steps == 0
        generate_one(engine, greedy(prompt(9, 40), 3, "a0", ignore_eos=True))
        assert stepped.is_set()
        first = during_step[0]
        assert (first.running, first.waiting) == (1, 0)
        assert first.kv_blocks_used == engine.allocator.blocks_for(40)  # the prompt's, at its prefill
        assert first.kv_blocks_total == engine.allocator.num_blocks
        assert (first.adapters_resident, first.adapters_pinned, first.adapter_loads) == (1, 1, 1)
        assert first.adapter_bytes_resident == resident_bytes(engine, "a0", ADAPTER_SPECS["a0"][0]) > 0
        after = engine.stats()
        assert (after.running, after.kv_blocks_used, after.adapters_pinned) == (0, 0, 0)
        assert after.adapters_resident == 1 and after.steps == len(during_step) >= 3
    finally:
        engine.shutdown()


def resident_bytes(engine: Engine, adapter_id: str, rank: int) -> int:
    """What one resident adapter of `rank` takes of the device tier: its pages, or (a CPU's) its packed bytes."""
    if engine.pool.paged:
        return pages_for_rank(rank) * engine.pool.page_bytes
    return engine.registry.version(adapter_id).weights.num_bytes


def test_an_adapter_the_runner_cannot_write_fails_its_request_alone(monkeypatch: pytest.MonkeyPatch):
    """The pool decided a load the runner then fails (a layer refuses the weights): that request ends with an
    error naming the adapter, the batch's other request is served, the slot is freed, and a retry loads it."""
    args = build_demo_model()[0].args
    adapters = {name: make_adapter(name, args, *ADAPTER_SPECS[name], seed=21 + i)
                for i, name in enumerate(("a0", "a1"))}
    engine = start_engine(adapters)
    load_adapter = engine.runner.load_adapter
    refused: list[str] = []

    def refusing_a1_once(slot, pages, adapter):
        if adapter.adapter_id == "a1" and not refused:
            refused.append(adapter.adapter_id)
            raise ValueError("a layer refused the weights")
        return load_adapter(slot, pages, adapter)

    monkeypatch.setattr(engine.runner, "load_adapter", refusing_a1_once)
    try:
        requests = [greedy(prompt(30, 6), 4, "a0"), greedy(prompt(31, 6), 4, "a1")]

        async def both() -> list:
            streams = [engine.submit(r) for r in requests]
            return await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams), return_exceptions=True),
                                          TIMEOUT_S)

        served, failed = asyncio.run(both())
        assert refused == ["a1"]
        assert isinstance(failed, EngineStepError) and "'a1' could not be loaded" in str(failed)
        assert served[0].finish_reason == "length" and served == [generate_one(engine, requests[0])]
        assert generate_one(engine, requests[1]).finish_reason == "length"  # loaded this time
        assert_idle(engine)
        assert engine.stats().adapters_resident == 2
    finally:
        engine.shutdown()
