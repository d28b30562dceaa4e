"""Step inputs from persistent buffers, and decode steps padded to captured sizes (CUDA graphs on the GPU).

A step's inputs go up in one copy and the forward reads nothing back, so a decode step waits for the device only
when sampling reads its tokens; the step builder's work does not grow with the batch; a decode step padded to a
ladder size through the fixed-address inputs gives the eager tokens (replayed as a CUDA graph on the GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import server.model_runner as model_runner_module
from adapters_store import LoraAdapter
from server.adapter_packer import AdapterPacker
from server.adapter_pool import AdapterSlotPool
from server.demo import build_demo_model
from server.model import Transformer
from server.model_runner import ModelRunner, adapter_page_bytes, decode_graph_sizes
from server.sampling import SamplerState
from server.scheduler import ScheduledChunk, Sequence
from server.step_builder import StepBuffers, host_step
from tests.support.engines import ADAPTER_SPECS, MLP, make_adapter, prompt, start_engine
from tests.support.runner_steps import STEPS, run_greedy, sequence, step_all

BLOCK_SIZE = 16
MAX_RANK = 16
MAX_MODEL_LEN = 64
REPO = Path(__file__).resolve().parents[1]
# Tensor methods that read device memory into Python, and the constructor that copies Python data up (on CUDA a
# blocking copy from pageable memory): each is a wait for the device.
DEVICE_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "tensor"}


def build_model(device: str = "cpu") -> Transformer:
    return build_demo_model()[0].to(device, torch.float32)


@pytest.fixture(scope="module")
def adapters() -> dict[str, LoraAdapter]:
    args = build_model().args
    return {
        "a0": make_adapter("a0", args, *ADAPTER_SPECS["a0"], seed=11, std=0.2),
        "a2": make_adapter("a2", args, *ADAPTER_SPECS["a2"], seed=12, std=0.2),
        "mlp": make_adapter("mlp", args, 4, 8.0, MLP, seed=13, std=0.2),
        "dora": make_adapter("dora", args, 4, 8.0, ("q_proj", "v_proj", "down_proj"), seed=14, std=0.2, kind="dora"),
        "ia3": make_adapter("ia3", args, 0, 0.0, ("k_proj", "v_proj", "down_proj"), seed=15, std=0.2, kind="ia3"),
    }


def loaded_runner(model: Transformer, adapters: dict[str, LoraAdapter]) -> tuple[ModelRunner, dict[str, int]]:
    pool = AdapterSlotPool(len(adapters), MAX_RANK, adapter_page_bytes(model))
    runner = ModelRunner(model, num_kv_blocks=32, block_size=BLOCK_SIZE, num_slots=pool.num_slots,
                         max_rank=pool.max_rank, num_pages=pool.num_pages)
    packer = AdapterPacker(model.output.weight.dtype)  # the host tier's form of an adapter
    slots = {name: pool.acquire(name, packer.pack(adapter)) for name, adapter in adapters.items()}
    for write in pool.take_writes():
        runner.apply(write)
    return runner, slots


def mixed_sequences(slots: dict[str, int], count: int) -> list[Sequence]:
    names = [None, "a0", "a2", "mlp", "dora", "ia3", "a0"]
    return [sequence(i, prompt(i + 1, 3 + 4 * i % 17), -1 if names[i % 7] is None else slots[names[i % 7]])
            for i in range(count)]


class CallCounter(TorchFunctionMode):
    """Counts every torch function and tensor method called from Python while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

    def device_reads(self) -> list[str]:
        return [name for name in self.calls if name in DEVICE_READS]


def one_read_sampler(logits: torch.Tensor, states: list[SamplerState]) -> tuple[list[int], list[None]]:
    """Greedy sampling with the single device->host transfer the vectorised sampler makes."""
    tokens = logits.argmax(-1).tolist()
    return tokens, [None] * len(tokens)


# ---- step inputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["eager", "padded"])
def test_a_decode_step_waits_for_the_device_at_most_twice(adapters, monkeypatch, padded):
    runner, slots = loaded_runner(build_model(), adapters)
    if padded:
        runner.prepare_decode_graphs(max_num_seqs=8, max_model_len=MAX_MODEL_LEN)
    seqs = mixed_sequences(slots, 5)
    step_all(runner, seqs)  # the prefill
    monkeypatch.setattr(model_runner_module, "sample", one_read_sampler)
    with CallCounter() as counter:
        step_all(runner, seqs)  # a decode step of mixed adapters
    assert len(counter.device_reads()) <= 2, counter.device_reads()


def builder_calls(plan: list[ScheduledChunk], buffers: StepBuffers) -> CallCounter:
    with CallCounter() as counter:
        buffers.load(host_step(plan, BLOCK_SIZE), sliding_window=None)
    return counter


def test_the_step_builder_makes_as_many_tensors_for_64_decodes_as_for_one(adapters):
    slots = {name: i for i, name in enumerate(adapters)}
    buffers = StepBuffers("cpu")
    plans = []
    for count in (1, 64):
        seqs = mixed_sequences(slots, count)
        for seq in seqs:
            seq.num_computed = seq.num_pending - 1
        plans.append([ScheduledChunk(seq, 1) for seq in seqs])
    one, many = (builder_calls(plan, buffers).calls for plan in plans)
    assert one == many
    assert "tensor" not in many  # nothing built from Python lists: the arrays go through the persistent buffers


def traced_lines(plan: list[ScheduledChunk], buffers: StepBuffers) -> int:
    """Lines of the repository's Python run to build `plan`'s inputs."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename.startswith(str(REPO)) and "tests" not in frame.f_code.co_filename:
            count += event == "line"
            return tracer
        return None

    sys.settrace(tracer)
    try:
        buffers.load(host_step(plan, BLOCK_SIZE), sliding_window=None)
    finally:
        sys.settrace(None)
    return count


def test_the_step_builder_runs_no_python_loop_over_a_prefills_tokens():
    buffers = StepBuffers("cpu")
    short, long = (sequence(0, prompt(1, length), slot=0) for length in (4, 30))
    assert traced_lines([ScheduledChunk(short, 4)], buffers) == traced_lines([ScheduledChunk(long, 30)], buffers)


# ---- padded decode steps ------------------------------------------------------------------------------------


def test_the_ladder_of_decode_sizes():
    assert decode_graph_sizes(1) == (1,)
    assert decode_graph_sizes(5) == (1, 2, 4, 5)
    assert decode_graph_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert decode_graph_sizes(1000)[-1] == 256


def test_padded_decode_through_the_static_buffers_gives_the_eager_tokens(adapters, monkeypatch):
    model = build_model()
    runner, slots = loaded_runner(model, adapters)
    eager = run_greedy(runner, mixed_sequences(slots, 5))

    assert runner.prepare_decode_graphs(max_num_seqs=8, max_model_len=MAX_MODEL_LEN) == ()  # no graphs on a CPU
    padded_sizes = []
    forward_padded = runner._forward_padded
    monkeypatch.setattr(runner, "_forward_padded",
                        lambda host, size, scaled: padded_sizes.append(size) or forward_padded(host, size, scaled))
    assert run_greedy(runner, mixed_sequences(slots, 5)) == eager
    assert padded_sizes == [8] * (STEPS - 1)  # every decode step padded from 5 rows to 8; the prefill ran as it is
    assert run_greedy(runner, mixed_sequences(slots, 1)) == eager[:1]  # batch 1, its own size


# ---- on the GPU ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_replayed_decode_graphs_give_the_eager_tokens(adapters):
    model = build_model("cuda")
    model.lora.backend = model.attention_context.backend = "triton"
    runner, slots = loaded_runner(model, adapters)
    eager = {count: run_greedy(runner, mixed_sequences(slots, count)) for count in (1, 7)}
    assert runner.prepare_decode_graphs(max_num_seqs=8, max_model_len=MAX_MODEL_LEN) == (1, 2, 4, 8)
    replays = []
    for key, (graph, _) in runner._graphs.items():
        replay = graph.replay
        graph.replay = lambda key=key, replay=replay: replays.append(key) or replay()
    for count in (1, 7):
        assert run_greedy(runner, mixed_sequences(slots, count)) == eager[count]
    # One sequence (base model): the graph without the vectors' ops; seven (DoRA and IA3 among them): the one with.
    assert replays == [(1, False)] * (STEPS - 1) + [(8, True)] * (STEPS - 1)


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_the_engine_captures_decode_graphs_at_start_unless_eager(enforce_eager):
    engine = start_engine({}, device="cuda", max_num_seqs=16, lora_backend="triton", attention_backend="triton",
                          enforce_eager=enforce_eager)
    try:
        assert sorted(engine.runner._graphs) == ([] if enforce_eager else [1, 2, 4, 8, 16])
    finally:
        engine.shutdown()
