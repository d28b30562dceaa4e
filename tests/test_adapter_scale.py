"""S-LoRA's scale: thousands of adapters in one server, traffic spread over them by a power law.

Each scenario stores 2,000 small adapters, sends a burst of requests whose adapters follow zipf(1.0) over them,
and checks that every request gets exactly the tokens it gets alone, that the device tier never holds more bytes
than its budget, and how many scheduling rounds a request whose weights were ready waited for room in the device
tier: none where the tier is sized by memory as start-up sizes it, and a bounded number where the budget is
tight, so adapters come in waves.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from server.adapter_packer import AdapterPacker
from server.config import Settings
from server.demo import build_demo_model
from server.engine import Engine
from server.lora_linear import LoRALinear
from server.runtime import max_rank_adapter_bytes
from tests.support.engines import (
    ENGINE_SETTINGS,
    TIMEOUT_S,
    Choice,
    assert_idle,
    collect,
    generate,
    greedy,
    make_adapter,
    prompt,
    start_engine,
)

NUM_ADAPTERS = 2000
NUM_REQUESTS = 96
MAX_TOKENS = 4
MAX_NUM_SEQS = 32
RANK = 2
TARGETS = ("q_proj", "v_proj")
HOST_BUDGET_BYTES = 256 * 2**20  # adapter weights in host memory, the stacks of a CPU runner's batches included


def zipf_choices(count: int, num_adapters: int, seed: int) -> list[int]:
    """`count` adapter indices drawn with probability proportional to 1 / rank (zipf, exponent 1)."""
    weights = 1.0 / np.arange(1, num_adapters + 1)
    return np.random.default_rng(seed).choice(num_adapters, size=count, p=weights / weights.sum()).tolist()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of 2,000 adapters, written once for every scenario."""
    directory = tmp_path_factory.mktemp("store")
    engine = start_engine({}, store=directory)
    try:
        for i in range(NUM_ADAPTERS):
            engine.registry.add(make_adapter(f"s{i:04d}", engine.args, RANK, 2.0 * RANK, TARGETS, seed=i, std=0.3))
    finally:
        engine.shutdown()
    return directory


class DeviceTierWatch:
    """Counts, per adapter, the scheduling rounds the device tier refused a sequence whose weights were in host
    memory, and checks at every step the tier's bytes against its budget and the host memory adapters take (the
    host tier, and the stacks the model runner reads a batch's adapters from) against --max-host-adapter-bytes."""

    def __init__(self, engine: Engine):
        self.refusals: Counter[str] = Counter()
        self.most_resident_bytes = self.most_stack_bytes = 0
        pool, runner, registry = engine.pool, engine.runner, engine.registry
        acquire, execute = pool.acquire, runner.execute
        stack_budget = runner.model.lora.stack_bytes
        assert registry.host_budget_bytes + stack_budget == HOST_BUDGET_BYTES

        def watched_acquire(key, adapter):
            slot = acquire(key, adapter)
            if slot is None:
                self.refusals[key.adapter_id] += 1
            return slot

        def watched_execute(plan, overlap=None):
            self.most_resident_bytes = max(self.most_resident_bytes, pool.resident_bytes)
            assert pool.resident_bytes <= pool.capacity_bytes
            output = execute(plan, overlap)
            assert output.stack_bytes <= stack_budget and registry.stats.host <= registry.host_budget_bytes
            self.most_stack_bytes = max(self.most_stack_bytes, output.stack_bytes)
            return output

        pool.acquire, runner.execute = watched_acquire, watched_execute


@pytest.fixture
def engines(store: Path) -> Iterator:
    started: list[Engine] = []

    def start(**settings) -> Engine:
        engine = start_engine({}, store=store, max_num_seqs=MAX_NUM_SEQS, max_host_adapter_bytes=HOST_BUDGET_BYTES,
                              **settings)
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.shutdown()


def requests_over_zipf(seed: int) -> list:
    return [greedy(prompt(1000 + i, 8), MAX_TOKENS, f"s{index:04d}", ignore_eos=True)
            for i, index in enumerate(zipf_choices(NUM_REQUESTS, NUM_ADAPTERS, seed))]


def tokens_alone(engine: Engine, requests: list) -> list[list[int]]:
    return [generate(engine, [request])[0][0].token_ids for request in requests]


def test_zipf_traffic_over_2000_adapters_is_served_as_alone_without_waiting_for_the_device_tier(engines):
    engine = engines()
    assert engine.pool.num_slots >= NUM_ADAPTERS, "the tier sized by memory has a slot for every small adapter"
    requests = requests_over_zipf(seed=7)
    distinct = len({r.adapter_id for r in requests})
    assert distinct > MAX_NUM_SEQS, "more distinct adapters than a batch holds: the scenario has teeth"
    watch = DeviceTierWatch(engine)
    together = [choices[0].token_ids for choices in generate(engine, requests)]
    assert together == tokens_alone(engine, requests)
    assert sum(watch.refusals.values()) == 0
    assert engine.stats().adapters_resident == distinct and engine.stats().adapter_evictions == 0
    assert watch.most_stack_bytes > 0, "batches of many adapters were read from stacks"
    groups = {id(module.targets.group): module.targets.group for module in engine.runner.model.modules()
              if isinstance(module, LoRALinear)}
    assert engine.stats().adapter_stack_bytes == sum(group.nbytes for group in groups.values())
    assert_idle(engine)


def test_with_a_tight_device_budget_adapters_come_in_waves_and_every_request_is_still_served_as_alone(engines):
    args = build_demo_model()[0].args
    small = RANK * sum(sum(args.lora_module_dims[name]) for name in TARGETS) * args.n_layers * 4  # packed in fp32
    # Room for about 20 of these adapters, fewer than a batch's sequences, and for one adapter of --max-lora-rank on
    # every module (start-up refuses less).
    settings = {"max_lora_rank": 8}
    budget = max(20 * small, max_rank_adapter_bytes(Settings(**ENGINE_SETTINGS | settings), args, torch.float32,
                                                      paged=False))
    engine = engines(max_gpu_adapter_bytes=budget, **settings)
    assert engine.pool.capacity_bytes < MAX_NUM_SEQS * small
    requests = requests_over_zipf(seed=11)
    # Alone first: every adapter is then in host memory, so the burst waits only for the device tier.
    alone = tokens_alone(engine, requests)
    assert len({r.adapter_id for r in requests[:MAX_NUM_SEQS]}) > 20, "the first batch alone overfills the tier"
    watch = DeviceTierWatch(engine)
    together = [choices[0].token_ids for choices in generate(engine, requests)]
    assert sum(watch.refusals.values()) > 0 and engine.stats().adapter_evictions > 0, "the budget was tight"
    assert watch.most_resident_bytes <= engine.pool.capacity_bytes
    assert together == alone
    # A refused sequence waits for running ones to finish (MAX_TOKENS + 1 rounds each) and holds back the sequences
    # behind it; the burst is NUM_REQUESTS / MAX_NUM_SEQS batches deep.
    assert max(watch.refusals.values()) <= (NUM_REQUESTS // MAX_NUM_SEQS) * (MAX_TOKENS + 1)
    assert_idle(engine)


def test_a_warm_adapters_request_is_not_held_back_by_a_burst_of_cold_ones(engines, monkeypatch):
    """Cold adapters load beside the running steps: a request for a resident adapter gets its tokens while a burst
    of requests for adapters only on disk waits for their loads (held here until the warm request finished, so a
    warm request that waited for them would never finish)."""
    engine = engines()
    generate(engine, [greedy(prompt(1, 8), 1, "s0001")])  # s0001: in host memory and resident from here on
    released = threading.Event()
    pack = AdapterPacker.pack

    def held_pack(packer, adapter):
        released.wait(TIMEOUT_S)
        return pack(packer, adapter)

    monkeypatch.setattr(AdapterPacker, "pack", held_pack)

    async def scenario() -> tuple[list[Choice], int, list[list[Choice]]]:
        cold = [engine.submit(greedy(prompt(i, 8), 2, f"s{1000 + i:04d}", ignore_eos=True)) for i in range(31)]
        warm = await asyncio.wait_for(collect(engine.submit(greedy(prompt(9, 8), 4, "s0001", ignore_eos=True))),
                                      TIMEOUT_S)
        loaded_meanwhile = engine.registry.stats.loads_from_disk
        released.set()
        return warm, loaded_meanwhile, await asyncio.wait_for(asyncio.gather(*(collect(s) for s in cold)), TIMEOUT_S)

    try:
        warm, loaded_meanwhile, cold = asyncio.run(scenario())
    finally:
        released.set()
    assert len(warm[0].token_ids) == 4 and loaded_meanwhile == 1  # only s0001's load, before the burst
    assert all(len(choices[0].token_ids) == 2 for choices in cold)
    assert_idle(engine)
