"""`/metrics` as the Kubernetes inference gateway's endpoint picker reads it: vLLM's gauge names, running and
waiting adapters told apart, and the residency of every adapter held in memory, idle ones included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.engine import Engine
from tests.support.engines import assert_idle, collect, generate_one, greedy, make_adapter, prompt, start_engine

PROTOCOL_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:cache_config_info", "vllm:lora_requests_info")


def scrape(engine: Engine) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Each family of the exposition by name: (labels, value) of its samples. Parsing fails on anything the text
    format forbids, as the picker's parser would."""
    text = engine.metrics.exposition().decode()
    return {family.name: [(s.labels, s.value) for s in family.samples]
            for family in text_string_to_metric_families(text)}


def lora_info(engine: Engine) -> tuple[dict[str, str], float]:
    [series] = scrape(engine)["vllm:lora_requests_info"]
    return series


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.fixture
def one_seat() -> Engine:
    """A batch of one sequence, so that a second request waits while the first runs."""
    engine = start_engine({}, max_num_seqs=1, max_lora_rank=8)
    for i, name in enumerate(("tenant-a", "tenant-b")):
        engine.registry.add(make_adapter(name, engine.args, 8 >> i, 16.0, ("q_proj", "v_proj"), seed=i))
    yield engine
    engine.shutdown()


def test_the_protocol_gauges_parse_and_say_what_the_engine_holds(one_seat: Engine) -> None:
    families = scrape(one_seat)
    for name in PROTOCOL_GAUGES:
        assert name in families, name
    assert families["vllm:num_requests_running"] == [({"model_name": one_seat.model_name}, 0.0)]
    assert families["vllm:num_requests_waiting"] == [({"model_name": one_seat.model_name}, 0.0)]
    assert families["vllm:kv_cache_usage_perc"] == [({"model_name": one_seat.model_name}, 0.0)]
    allocator = one_seat.allocator
    assert families["vllm:cache_config_info"] == [
        ({"block_size": str(allocator.block_size), "num_gpu_blocks": str(allocator.num_blocks)}, 1.0)]
    labels, _ = lora_info(one_seat)
    assert labels == {"max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": ""}


def test_running_and_waiting_adapters_are_told_apart(one_seat: Engine) -> None:
    """tenant-a decodes in the one seat while tenant-b's request waits for it: running is tenant-a alone, waiting
    tenant-b alone; the value is when that last changed, kept while nothing does."""

    async def scenario() -> None:
        before = time.time()
        running = one_seat.submit(greedy(prompt(1, 8), 400, "tenant-a", ignore_eos=True))
        stream = aiter(running)
        await anext(stream)  # tenant-a holds the seat
        waiting = one_seat.submit(greedy(prompt(2, 8), 4, "tenant-b", ignore_eos=True))
        await until(lambda: lora_info(one_seat)[0]["waiting_lora_adapters"] != "")
        labels, changed_at = lora_info(one_seat)
        assert labels == {"max_lora": "1", "running_lora_adapters": "tenant-a", "waiting_lora_adapters": "tenant-b"}
        assert before <= changed_at <= time.time()
        families = scrape(one_seat)
        assert families["vllm:num_requests_running"][0][1] == 1
        assert families["vllm:num_requests_waiting"][0][1] == 1
        assert 0 < families["vllm:kv_cache_usage_perc"][0][1] < 1
        assert lora_info(one_seat) == (labels, changed_at)  # nothing changed, nor does the value
        residency = {labels["adapter"]: (labels, value) for labels, value in families["lorahive_adapter_residency"]}
        labels_a = {"adapter": "tenant-a", "tier": "gpu", "rank": "8", "kind": "lora", "pinned": "false"}
        assert residency["tenant-a"] == (labels_a, 1)
        async for _ in stream:
            pass
        await collect(waiting)
        await until(lambda: lora_info(one_seat)[0]["running_lora_adapters"] == "")
        assert lora_info(one_seat)[0] == {"max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": ""}

    asyncio.run(scenario())
    assert_idle(one_seat)


def test_idle_adapters_stay_listed_with_the_tier_that_holds_them() -> None:
    """One device slot: after tenant-a's request and then tenant-b's, tenant-b idles on the device and tenant-a in
    host memory only; an adapter --pin keeps says so; one uploaded and never requested is in host memory too."""
    engine = start_engine({}, max_gpu_adapters=1, max_lora_rank=8, pin=["tenant-a"])
    try:
        for i, name in enumerate(("tenant-a", "tenant-b", "tenant-c")):
            engine.registry.add(make_adapter(name, engine.args, 8, 16.0, ("q_proj", "v_proj"), seed=i))
        for name in ("tenant-a", "tenant-b"):
            generate_one(engine, greedy(prompt(3, 8), 2, name))
        residency = {labels["adapter"]: (labels, value)
                     for labels, value in scrape(engine)["lorahive_adapter_residency"]}
        assert residency == {
            "tenant-a": ({"adapter": "tenant-a", "tier": "host", "rank": "8", "kind": "lora", "pinned": "true"}, 0),
            "tenant-b": ({"adapter": "tenant-b", "tier": "gpu", "rank": "8", "kind": "lora", "pinned": "false"}, 0),
            "tenant-c": ({"adapter": "tenant-c", "tier": "host", "rank": "8", "kind": "lora", "pinned": "false"}, 0),
        }
    finally:
        engine.shutdown()
