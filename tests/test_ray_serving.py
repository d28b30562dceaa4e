"""lorahive on Ray Serve (server/ray_serving.py): two replicas of the demo model on a local Ray, one store, API keys.

Through the one endpoint: adapters uploaded there are served by both replicas; mixed concurrent traffic
(completions and chat, some streamed) gives what a single `lorahive serve` on the same store gives; each adapter's
requests go to the replica that served it before (measured from the `x-lorahive-replica` header of every answer)
while base-model requests spread over both; the replicas check the keys; a client that leaves mid-stream frees
its sequence on the replica; and a replica killed while it streams is replaced by Ray, its own streams ending
with an error event and every other request unharmed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from server.config import Settings  # noqa: E402
from server.ray_serving import REPLICA_HEADER, application  # noqa: E402
from tests.support.adapter_uploads import MAX_RANK, demo_peft_files, multipart, upload  # noqa: E402
from tests.support.api_keys import KEY_A, KEY_ADMIN, KEY_B, KEY_FILE, bearer  # noqa: E402
from tests.support.prometheus_text import value  # noqa: E402
from tests.support.servers import free_port, serving_engine  # noqa: E402

pytestmark = pytest.mark.slow

ADAPTERS = [f"tenant-{i}" for i in range(6)]
TIMEOUT = httpx.Timeout(120.0)
HEADERS = bearer(KEY_A)  # tenant A uploads the adapters and sends the traffic


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Settings]]:
    """(endpoint URL, the replicas' settings): two replicas behind one router, on a Ray started for this module."""
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps(KEY_FILE))
    settings = Settings(store=tmp_path_factory.mktemp("store"), max_lora_rank=MAX_RANK, max_num_seqs=8,
                        kv_cache_tokens=4096, store_revalidate_seconds=0, api_keys=keys)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(settings, replicas=2, adapters_per_replica=16, replica_cpus=0), name="lorahive",
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=TIMEOUT, headers=HEADERS) as client:
            for i, adapter_id in enumerate(ADAPTERS):
                assert upload(client, adapter_id, demo_peft_files(rank=4, seed=10 + i)).status_code == 201
        yield url, settings
    finally:
        serve.shutdown()
        ray.shutdown()


def body(i: int, adapter_id: str | None, stream: bool, max_tokens: int = 12) -> dict:
    """Request i: a completion, or every fourth a chat completion; some name the adapter by `adapter_id`."""
    request = {"model": adapter_id or "lorahive-demo", "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if i % 3 == 2 and adapter_id is not None:  # the base model in `model`, the adapter in `adapter_id`
        request |= {"model": "lorahive-demo", "adapter_id": adapter_id}
    if i % 4 == 3:
        return request | {"messages": [{"role": "user", "content": f"request {i}: what does the adapter say?"}]}
    return request | {"prompt": f"request {i}: the adapter says"}


def named_adapter(request: dict) -> str | None:
    return request.get("adapter_id") or (request["model"] if request["model"] in ADAPTERS else None)


def text_of(choice: dict) -> str:
    """A choice's text, or its piece of it in a stream: completion and chat completion alike."""
    if "text" in choice:
        return choice["text"]
    return (choice.get("message") or choice.get("delta") or {}).get("content") or ""


async def complete(client: httpx.AsyncClient, request: dict,
                   generating: Callable[[str], None] = lambda replica: None) -> tuple[str, str, str | None]:
    """(text, replica, error): the answer's text, whether streamed or not, the replica that answered ("" from a
    single server), and for a stream that ended with an error event that error's code (or that it ended without
    `[DONE]`)."""
    path = "/v1/chat/completions" if "messages" in request else "/v1/completions"
    if not request["stream"]:
        response = await client.post(path, json=request)
        assert response.status_code == 200, response.text
        return text_of(response.json()["choices"][0]), response.headers.get(REPLICA_HEADER, ""), None
    text, error, done = "", None, False
    async with client.stream("POST", path, json=request) as response:
        assert response.status_code == 200
        replica = response.headers.get(REPLICA_HEADER, "")
        async for line in response.aiter_lines():
            done = done or line == "data: [DONE]"
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                error = event["error"]["code"]
            elif event["choices"]:
                began = bool(text)
                text += text_of(event["choices"][0])
                if text and not began:
                    generating(replica)
    return text, replica, error if done or error else "ended without [DONE]"


async def send_all(url: str, requests: list[dict]) -> list[tuple[str, str, str | None]]:
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, headers=HEADERS) as client:
        return await asyncio.gather(*(complete(client, request) for request in requests))


def homes(url: str) -> dict[str, set[str]]:
    """Each adapter's replicas once Ray routes it steadily: rounds of one request per adapter until a round in
    which every adapter went to a replica that served it before (Ray learns what a replica serves a moment after
    it served it)."""
    served: dict[str, set[str]] = {adapter_id: set() for adapter_id in ADAPTERS}
    for round_ in range(20):
        answers = asyncio.run(send_all(url, [body(round_, adapter_id, False, 2) for adapter_id in ADAPTERS]))
        settled = all(replica in served[a] for a, (_, replica, _) in zip(ADAPTERS, answers, strict=True))
        for adapter_id, (_, replica, _) in zip(ADAPTERS, answers, strict=True):
            served[adapter_id].add(replica)
        if settled:
            return served
        time.sleep(0.5)
    raise AssertionError(f"routing never settled: {served}")


def test_mixed_traffic_matches_one_server_and_each_adapter_stays_on_its_replica(
    cluster: tuple[str, Settings],
) -> None:
    url, settings = cluster
    served = homes(url)
    requests = [body(i, adapter_id, stream=i % 2 == 0) for i, adapter_id in enumerate(ADAPTERS * 3 + [None] * 4)]
    answers = asyncio.run(send_all(url, requests))
    with serving_engine(settings) as (single_url, _):
        expected = asyncio.run(send_all(single_url, [request | {"stream": False} for request in requests]))
    assert [text for text, _, _ in answers] == [text for text, _, _ in expected]
    assert all(error is None for _, _, error in answers)
    on_home = [replica in served[adapter_id] for request, (_, replica, _) in zip(requests, answers, strict=True)
               if (adapter_id := named_adapter(request)) is not None]
    affinity = sum(on_home) / len(on_home)
    print(f"adapter requests on a replica that served the adapter before: {affinity:.0%} of {len(on_home)}")
    assert affinity >= 0.9
    assert len({replica for replicas in served.values() for replica in replicas}) == 2  # both replicas serve


def test_base_model_requests_spread_over_both_replicas(cluster: tuple[str, Settings]) -> None:
    url, _ = cluster
    answers = asyncio.run(send_all(url, [body(i, None, True, max_tokens=64) for i in range(12)]))
    assert len({replica for _, replica, _ in answers}) == 2


def test_the_replicas_check_the_keys_behind_the_router(cluster: tuple[str, Settings]) -> None:
    """No key: 401; tenant B cannot see tenant A's private adapters (404), nor list them, through the endpoint."""
    url, _ = cluster
    request = body(0, ADAPTERS[0], False)
    assert httpx.post(f"{url}/v1/completions", json=request, timeout=TIMEOUT).status_code == 401
    response = httpx.post(f"{url}/v1/completions", json=request, headers=bearer(KEY_B), timeout=TIMEOUT)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    listed = httpx.get(f"{url}/v1/adapters", headers=bearer(KEY_B), timeout=TIMEOUT).json()["data"]
    assert not {adapter["id"] for adapter in listed} & set(ADAPTERS)


BAD_BODIES = [(b"{not json", None), (b'["a list"]', None),
              (b'{"model": "tenant-0", "prompt": "x", "max_tokens": -1}', "max_tokens")]


@pytest.mark.parametrize(("content", "param"), BAD_BODIES)
def test_a_bad_request_through_the_router_gets_the_servers_400(cluster: tuple[str, Settings], content: bytes,
                                                               param: str | None) -> None:
    """What the router cannot route by (no JSON object) or routes to a replica that refuses it: the replica's own
    400 in OpenAI's shape, never a 500 of the router."""
    url, _ = cluster
    response = httpx.post(f"{url}/v1/completions", content=content, timeout=TIMEOUT,
                          headers=HEADERS | {"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


def test_models_and_the_adapter_routes_through_the_endpoint(cluster: tuple[str, Settings]) -> None:
    """/v1/models lists the base model and the caller's adapters; a replace through the endpoint changes what the
    adapter generates, a delete makes it unknown, whichever replica answers."""
    url, _ = cluster
    with httpx.Client(base_url=url, timeout=TIMEOUT, headers=HEADERS) as client:
        models = {card["id"] for card in client.get("/v1/models").json()["data"]}
        assert models >= {"lorahive-demo", *ADAPTERS}
        assert upload(client, "short-lived", demo_peft_files(rank=2, seed=1)).status_code == 201
        request = body(0, "short-lived", False, max_tokens=16)
        before = asyncio.run(send_all(url, [request] * 2))
        replaced = client.put("/v1/adapters/short-lived", files=multipart(*demo_peft_files(rank=8, seed=2)))
        assert replaced.status_code == 200 and replaced.json()["version"] == 2
        after = asyncio.run(send_all(url, [request] * 2))
        assert {text for text, _, _ in before} != {text for text, _, _ in after}
        assert len({text for text, _, _ in after}) == 1
        assert client.delete("/v1/adapters/short-lived").status_code == 200
        gone = [client.post("/v1/completions", json=request) for _ in range(4)]
        assert {response.status_code for response in gone} == {404}


def test_a_client_that_leaves_mid_stream_frees_its_sequence_on_the_replica(cluster: tuple[str, Settings]) -> None:
    """Closing the connection after the first event cancels the request down to the replica's engine: the replica
    that streamed it counts an abort and runs nothing (its series of the router's /metrics)."""
    url, _ = cluster
    request = body(0, ADAPTERS[1], True, max_tokens=1000) | {"ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=request, headers=HEADERS, timeout=TIMEOUT) as response:
        replica = response.headers[REPLICA_HEADER]
        next(line for line in response.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 30
    while True:  # the router's /metrics shows what each replica posted in the last few seconds
        text = httpx.get(f"{url}/metrics", headers=bearer(KEY_ADMIN), timeout=TIMEOUT).text
        aborted = value(text, "lorahive_requests_finished_total", finish_reason="abort", replica=replica)
        if aborted >= 1 and value(text, "lorahive_requests_running", replica=replica) == 0:
            break
        assert time.monotonic() < deadline, "the replica still runs the abandoned request"
        time.sleep(0.2)


def test_metrics_through_the_endpoint_show_every_replica(cluster: tuple[str, Settings]) -> None:
    """GET /metrics through the router: both replicas' series, each labelled with its replica, as the keys allow
    (401 without one)."""
    url, _ = cluster
    assert httpx.get(f"{url}/metrics", timeout=TIMEOUT).status_code == 401
    deadline = time.monotonic() + 30
    while True:
        response = httpx.get(f"{url}/metrics", headers=bearer(KEY_ADMIN), timeout=TIMEOUT)
        assert response.status_code == 200
        reporting = {sample.labels.get("replica") for family in text_string_to_metric_families(response.text)
                     if family.name == "lorahive_requests_running" for sample in family.samples}
        if len(reporting) == 2 and None not in reporting:
            break
        assert time.monotonic() < deadline, f"replicas reporting: {reporting}"
        time.sleep(0.5)


def model_runners() -> list[int]:
    """Process ids of the model runners' worker processes (multiprocessing's spawned children) on this machine."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"--multiprocessing-fork" in command:
            found.append(int(pid))
    return found


def test_a_killed_replica_is_replaced_and_only_its_own_streams_fail(cluster: tuple[str, Settings]) -> None:
    url, _ = cluster
    runners = len(model_runners())

    async def scenario() -> tuple[str, list[tuple[str, str, str | None]]]:
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, headers=HEADERS) as client:
            began: list[str] = []  # the replica of each stream, once it produced text
            streams = [asyncio.create_task(complete(client, body(i, adapter_id, True, max_tokens=300), began.append))
                       for i, adapter_id in enumerate(ADAPTERS + [None, None])]
            while len(began) < len(streams):
                await asyncio.sleep(0.01)
            victim = Counter(began).most_common(1)[0][0]
            ray.kill(ray.get_actor(f"SERVE_REPLICA::lorahive#LorahiveReplica#{victim}", namespace="serve"))
            return victim, await asyncio.wait_for(asyncio.gather(*streams), timeout=120)

    victim, answers = asyncio.run(scenario())
    for text, replica, error in answers:
        if replica == victim:
            assert error == "replica_unavailable"  # told, not left hanging
        else:
            assert error is None and len(text) > 0
    assert any(replica != victim for _, replica, _ in answers)
    # Requests after the kill are served at once (by the survivor, or the replacement when it is up) ...
    after = asyncio.run(send_all(url, [body(i, adapter_id, i % 2 == 0) for i, adapter_id in enumerate(ADAPTERS)]))
    assert all(error is None and text for text, _, error in after)
    # ... and Ray replaces the dead replica; its model runner's process did not outlive it.
    deadline = time.monotonic() + 120
    while serve.status().applications["lorahive"].deployments["LorahiveReplica"].replica_states != {"RUNNING": 2}:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    while len(model_runners()) != runners:
        assert time.monotonic() < deadline, f"{len(model_runners())} model runner processes, not {runners}"
        time.sleep(0.5)


def test_a_replica_shut_down_by_a_scale_down_lets_its_streams_finish(cluster: tuple[str, Settings]) -> None:
    """Redeployed with one replica instead of two while streams run on both: the one Ray shuts down drains (as
    SIGTERM drains `lorahive serve`), so every stream finishes whole; then the two replicas come back."""
    url, settings = cluster

    async def scenario() -> list[tuple[str, str, str | None]]:
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, headers=HEADERS) as client:
            # Streams started one by one, each once the last is generating, until both replicas stream: Ray's router
            # picks by queue lengths it learns a moment late, so a burst could all land on one replica.
            began: list[str] = []  # the replica of each stream, once it produced text
            streams = []
            while len(streams) < 6 or len(set(began)) < 2:
                assert len(streams) < 16, f"every stream went to one replica: {began}"
                request = body(len(streams), None, True, max_tokens=300) | {"ignore_eos": True}
                streams.append(asyncio.create_task(complete(client, request, began.append)))
                while len(began) < len(streams):
                    await asyncio.sleep(0.01)
            await asyncio.to_thread(serve.run, application(settings, replicas=1, adapters_per_replica=16,
                                                           replica_cpus=0), name="lorahive", route_prefix="/")
            return await asyncio.wait_for(asyncio.gather(*streams), timeout=120)

    try:
        answers = asyncio.run(scenario())
        assert len({replica for _, replica, _ in answers}) == 2  # both replicas were streaming
        assert all(error is None for _, _, error in answers)
        assert all(len(text) > 0 for text, _, _ in answers)
    finally:
        serve.run(application(settings, replicas=2, adapters_per_replica=16, replica_cpus=0), name="lorahive",
                  route_prefix="/")
