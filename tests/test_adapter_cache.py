"""The tiered adapter cache under oversubscription: more adapters than device slots and host budget."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters_store import TARGET_MODULES
from server.config import Settings
from server.engine import Engine
from server.runtime import build_engine
from tests.test_engine import ENGINE_SETTINGS, assert_idle, generate, greedy, make_adapter, prompt

NUM_ADAPTERS = 8
SLOTS = 2  # 4x oversubscribed


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    started: list[Engine] = []

    def start(**settings: Any) -> Engine:
        engine = build_engine(Settings(**(ENGINE_SETTINGS | {"store": tmp_path} | settings)))
        for i in range(NUM_ADAPTERS):
            engine.registry.add(make_adapter(f"t{i}", engine.model.args, 4, 8.0, TARGET_MODULES, seed=100 + i))
        engine.start()
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.shutdown()


def _requests():
    """Three requests per adapter plus base-model traffic, interleaved the way tenants would send them."""
    out = []
    for round_ in range(3):
        for i in range(NUM_ADAPTERS):
            out.append(greedy(prompt(10 * i + round_, 6 + i), 6, f"t{i}"))
        out.append(greedy(prompt(500 + round_, 9), 6))
    return out


def test_oversubscribed_slots_give_the_alone_outputs_with_bounded_loads(engines):
    requests = _requests()
    roomy = engines(max_gpu_adapters=NUM_ADAPTERS)
    alone = [generate(roomy, [r])[0] for r in requests]

    tight = engines(max_gpu_adapters=SLOTS)
    together = generate(tight, requests)
    assert together == alone
    adapter_requests = sum(r.adapter_id is not None for r in requests)
    # Never more than one device load per request (no evict-reload churn within a request), and since
    # requests of one adapter share a resident slot, clearly fewer than that.
    assert NUM_ADAPTERS <= tight.pool.loads <= adapter_requests
    assert tight.pool.evictions == tight.pool.loads - tight.pool.resident_count
    assert_idle(tight)


def test_host_budget_evicts_and_reloads_from_disk(engines):
    one_adapter = make_adapter("probe", build_engine(Settings(**ENGINE_SETTINGS)).model.args, 4, 8.0,
                               TARGET_MODULES, seed=1).num_bytes
    requests = _requests()
    roomy = engines(max_gpu_adapters=NUM_ADAPTERS)
    alone = [generate(roomy, [r])[0] for r in requests]

    # Room for two adapters in host memory and one device slot: every tier is under pressure.
    tight = engines(max_gpu_adapters=1, max_host_adapter_bytes=2 * one_adapter + 1, pin=["t0"])
    assert generate(tight, requests) == alone
    registry = tight.registry
    assert registry.stats.host <= 2 * one_adapter + 1 + one_adapter  # the budget, plus one adapter in use
    assert registry.stats.loads_from_disk > 0 and registry.stats.host_evictions > 0
    assert registry.version("t0").weights is not None  # pinned: never dropped from host memory
    assert_idle(tight)


def test_device_byte_budget_with_mixed_ranks_gives_the_alone_outputs(tmp_path: Path):
    """Adapters of ranks 4 to 64 through a device budget of five 16-rank pages (one rank-64 adapter and one
    more page): the pool evicts by pages, never exceeds the budget, and every output is the one alone."""
    ranks = [4, 64, 16, 48, 8, 32]
    settings = ENGINE_SETTINGS | {"max_lora_rank": 64, "max_gpu_adapters": len(ranks)}

    def start(store: Path, **extra: Any) -> Engine:
        engine = build_engine(Settings(**(settings | {"store": store} | extra)))
        for i, rank in enumerate(ranks):
            engine.registry.add(make_adapter(f"m{i}", engine.model.args, rank, 2.0 * rank, TARGET_MODULES,
                                             seed=200 + i))
        engine.start()
        return engine

    requests = [greedy(prompt(7 * i + r, 5 + i), 5, f"m{i}") for r in range(2) for i in range(len(ranks))]
    roomy = start(tmp_path / "roomy")
    try:
        alone = [generate(roomy, [r])[0] for r in requests]
        page_bytes = roomy.pool.page_bytes
    finally:
        roomy.shutdown()
    tight = start(tmp_path / "tight", max_gpu_adapter_bytes=5 * page_bytes)
    try:
        assert tight.pool.capacity_bytes == 5 * page_bytes
        assert generate(tight, requests) == alone
        assert tight.pool.evictions > 0 and tight.pool.resident_bytes <= tight.pool.capacity_bytes
        assert_idle(tight)
    finally:
        tight.shutdown()
