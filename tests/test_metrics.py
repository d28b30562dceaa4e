"""`/metrics`: values agree with the traffic sent, per-adapter labels stay bounded (deploy/: test_deploy.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from server.engine import Engine
from server.metrics import OTHER_ADAPTERS, Metrics, TopAdapters
from tests.support.adapter_uploads import multipart, peft_files
from tests.support.engines import prompt
from tests.support.prometheus_text import samples, value
from tests.support.servers import serving_engine

ROOT = Path(__file__).resolve().parent.parent
PER_ADAPTER = ("lorahive_adapter_requests", "lorahive_adapter_prompt_tokens", "lorahive_adapter_generation_tokens")


def label_values(text: str, name: str, label: str) -> set[str]:
    return {dict(ls)[label] for (n, ls) in samples(text) if n == name and label in dict(ls)}


# ---- the per-adapter label bound (metrics module level) -------------------------------------------------


def test_per_adapter_labels_stay_bounded_with_100_adapters():
    """100 adapters whose ranking keeps changing: never more than 20 adapter labels + "other", no exported
    series ever decreases, and the increments seen across the exported series add up to the traffic."""
    metrics = Metrics(top_adapters=20)
    sent = {name: 0 for name in PER_ADAPTER}
    seen = {name: 0.0 for name in PER_ADAPTER}
    last: dict[tuple, float] = {}  # the last exported value of every series ever seen
    for round_ in range(3):
        for i in range(100):
            adapter = f"adapter-{i:03d}"
            requests = 1 + (i * 7 + round_ * 13) % 11  # rankings shift between rounds
            for _ in range(requests):
                metrics.request_submitted(adapter, prompt_tokens=5)
            metrics.tokens_generated(adapter, 3 * requests)
            sent["lorahive_adapter_requests"] += requests
            sent["lorahive_adapter_prompt_tokens"] += 5 * requests
            sent["lorahive_adapter_generation_tokens"] += 3 * requests
            text = metrics.exposition().decode()
            for name in PER_ADAPTER:
                assert len(label_values(text, name + "_total", "adapter")) <= 21  # 20 adapters + "other"
            current = {k: v for k, v in samples(text).items() if k[0].removesuffix("_total") in PER_ADAPTER}
            for key, new in current.items():
                old = last.get(key, 0.0)
                assert new >= old, key  # a counter that comes back resumes where it was
                seen[key[0].removesuffix("_total")] += new - old
            last.update(current)
    assert seen == sent
    text = metrics.exposition().decode()
    assert value(text, "lorahive_prompt_tokens_total") == sent["lorahive_adapter_prompt_tokens"]
    assert value(text, "lorahive_generation_tokens_total") == sent["lorahive_adapter_generation_tokens"]
    assert OTHER_ADAPTERS in label_values(text, "lorahive_adapter_requests_total", "adapter")
    assert len({dict(k[1])["adapter"] for k in last}) > 21  # the ranking really changed


def test_top_adapters_are_the_busiest():
    top = TopAdapters(limit=3)
    for i in range(10):
        for _ in range(i + 1):
            top.add(f"a{i}", requests=1)
    snapshot = top.snapshot()
    assert set(snapshot) == {"a9", "a8", "a7", OTHER_ADAPTERS}
    assert set(TopAdapters(limit=0).snapshot()) == {OTHER_ADAPTERS}


def test_settings_flag():
    assert Settings().metrics_top_adapters == 20
    from server.cli import settings_from

    namespace = type("NS", (), {"metrics_top_adapters": "7"})()
    assert settings_from(namespace, {}).metrics_top_adapters == 7


# ---- a real server: metric values agree with the traffic ------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Engine]]:
    store = tmp_path_factory.mktemp("store")
    with serving_engine(Settings(store=store, max_gpu_adapters=2, max_lora_rank=16, metrics_top_adapters=3)) as served:
        yield served


def eventually(check: Callable[[], None], timeout: float = 5.0) -> None:
    """HTTP requests are counted as their response ends, an instant after the client has it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_metric_values_agree_with_traffic(server):
    url, engine = server
    with httpx.Client(base_url=url, timeout=60) as client:
        adapters = ["m-a", "m-b", "m-c", "m-d"]
        for i, adapter in enumerate(adapters):
            response = client.post("/v1/adapters", data={"id": adapter}, files=multipart(*peft_files(engine, i)))
            assert response.status_code == 201, response.text
        assert client.post("/v1/adapters", data={"id": "bad"},
                           files=multipart(b"{}", b"not safetensors")).status_code == 400
        before = client.get("/metrics").text

        prompt_tokens = completion_tokens = sequences = multi_token = 0
        per_adapter: dict[str, list[int]] = {}
        completions = chats = 0
        plan = [("m-a", 1), ("m-a", 2), ("m-b", 1), ("m-c", 1), (None, 1), ("m-d", 1), ("m-a", 1), ("m-b", 1)]
        for k, (adapter, n) in enumerate(plan):
            max_tokens = 1 + k % 4
            body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "n": n}
            if adapter is not None:
                body["adapter_id"] = adapter
            if k % 2:
                body["messages"] = [{"role": "user", "content": f"hello {k}"}]
                response = client.post("/v1/chat/completions", json=body)
                chats += 1
            else:
                body["prompt"] = list(prompt(k, 5 + k))
                response = client.post("/v1/completions", json=body)
                completions += 1
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            prompt_tokens += usage["prompt_tokens"]
            completion_tokens += usage["completion_tokens"]
            sequences += n
            multi_token += n if max_tokens > 1 else 0
            if adapter is not None:
                counts = per_adapter.setdefault(adapter, [0, 0, 0])
                counts[0] += 1
                counts[1] += usage["prompt_tokens"]
                counts[2] += usage["completion_tokens"]
        # A streamed request with usage, and a request for an unknown adapter.
        body = {"prompt": list(prompt(99, 6)), "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                "adapter_id": "m-c", "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        usage = json.loads(events[-2])["usage"]
        prompt_tokens += usage["prompt_tokens"]
        completion_tokens += usage["completion_tokens"]
        sequences += 1
        multi_token += 1
        completions += 1
        counts = per_adapter.setdefault("m-c", [0, 0, 0])
        counts[0] += 1
        counts[1] += usage["prompt_tokens"]
        counts[2] += usage["completion_tokens"]
        assert client.post("/v1/completions", json={"prompt": "x", "adapter_id": "nope"}).status_code == 404
        assert client.delete("/v1/adapters/m-d").status_code == 200
        assert client.delete("/v1/adapters/m-d").status_code == 404

        def check() -> None:
            text = client.get("/metrics").text

            def delta(name: str, **labels: str) -> float:
                return value(text, name, **labels) - value(before, name, **labels)

            ok = {"status_code": "200", "method": "POST"}
            assert delta("lorahive_http_requests_total", endpoint="/v1/completions", **ok) == completions
            assert delta("lorahive_http_requests_total", endpoint="/v1/chat/completions", **ok) == chats
            assert delta("lorahive_http_requests_total", endpoint="/v1/completions", status_code="404") == 1
            assert value(text, "lorahive_adapter_uploads_total") == 4
            assert value(text, "lorahive_adapter_upload_failures_total") == 1
            assert value(text, "lorahive_adapter_deletes_total") == 1
            assert value(text, "lorahive_adapter_delete_failures_total") == 1
            assert delta("lorahive_prompt_tokens_total") == prompt_tokens
            assert delta("lorahive_generation_tokens_total") == completion_tokens
            assert delta("lorahive_requests_finished_total", finish_reason="length") == sequences
            assert delta("lorahive_requests_finished_total") == sequences
            assert delta("lorahive_time_to_first_token_seconds_count") == sequences
            assert delta("lorahive_e2e_request_latency_seconds_count") == sequences
            assert delta("lorahive_request_queue_time_seconds_count") == sequences
            assert delta("lorahive_inter_token_latency_seconds_count") == completion_tokens - sequences
            assert delta("lorahive_time_per_output_token_seconds_count") == multi_token
            # Top 3 adapters by requests keep a label (m-a: 3, m-c: 2, m-b: 2); m-d counts as other.
            labelled = label_values(text, "lorahive_adapter_requests_total", "adapter")
            assert labelled == {"m-a", "m-b", "m-c", OTHER_ADAPTERS}
            for adapter, (requests, prompt_sum, generated) in per_adapter.items():
                label = adapter if adapter in labelled else OTHER_ADAPTERS
                if label == OTHER_ADAPTERS:
                    continue
                assert value(text, "lorahive_adapter_requests_total", adapter=label) == requests
                assert value(text, "lorahive_adapter_prompt_tokens_total", adapter=label) == prompt_sum
                assert value(text, "lorahive_adapter_generation_tokens_total", adapter=label) == generated
            total_adapter_requests = sum(c[0] for c in per_adapter.values())
            assert delta("lorahive_adapter_requests_total") == total_adapter_requests
            adapter_sequences = sum(n for a, n in plan if a is not None) + 1
            lookups = delta("lorahive_adapter_cache_hits_total", tier="gpu") + delta(
                "lorahive_adapter_cache_misses_total", tier="gpu")
            assert lookups == adapter_sequences
            assert value(text, "lorahive_kv_cache_capacity_blocks") == engine.allocator.num_blocks
            assert value(text, "lorahive_kv_cache_used_blocks") == 0
            assert value(text, "lorahive_requests_running") == 0
            assert value(text, "lorahive_requests_waiting") == 0
            assert value(text, "lorahive_adapters_resident", tier="gpu") == engine.pool.resident_count == 2
            assert value(text, "lorahive_adapter_resident_bytes", tier="gpu") == engine.pool.resident_bytes
            assert value(text, "lorahive_adapter_resident_bytes", tier="stacks") == engine.stats().adapter_stack_bytes
            assert value(text, "lorahive_adapter_loads_total", tier="gpu") == engine.pool.loads
            assert value(text, "lorahive_adapter_load_duration_seconds_count", transition="host_to_gpu") == \
                engine.pool.loads
            assert delta("lorahive_step_duration_seconds_count") == delta("lorahive_step_batch_size_sequences_count")
            assert delta("lorahive_step_tokens_sum") >= prompt_tokens

        eventually(check)
