"""Several `lorahive serve` processes on one `--store`, as replicas behind a router run them: uploads, replaces and
deletes of the same ids from both at once, and a process killed while it uploads.

Afterwards the store is whole (every stored adapter reads back against its checksums), both servers report the
same version of every adapter, and both serve it with the same weights. tests/test_shared_store.py covers what
one server learns of the other's changes, in one process; tests/test_store.py a SIGKILL at every step of a write.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from adapters_store import AdapterStore
from tests.support.adapter_uploads import MAX_RANK, PROMPT, demo_peft_files, multipart

pytestmark = pytest.mark.slow

IDS = [f"shared-{i}" for i in range(4)]
EXPECTED = {"create": {201, 409}, "replace": {200, 404}, "delete": {200, 404}}  # 409: taken; 404: gone already
# Each server takes all its clients' uploads at once (its own concurrency caps answer 429 past them).
SERVER = {"store_revalidate_seconds": 0, "max_lora_rank": MAX_RANK, "max_concurrent_uploads": 8,
          "max_concurrent_uploads_per_tenant": 8}
FILES = [demo_peft_files(rank=1 + i % MAX_RANK, seed=100 + i) for i in range(6)]  # small adapters of varied rank


def mutate(url: str, seed: int, count: int) -> list[tuple[str, int]]:
    """`count` random creates, replaces and deletes of the shared ids through one server: (what, status) of each."""
    rng = random.Random(seed)
    done = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(count):
            what, adapter_id, files = rng.choice(list(EXPECTED)), rng.choice(IDS), rng.choice(FILES)
            if what == "create":
                response = client.post("/v1/adapters", data={"id": adapter_id}, files=multipart(*files))
            elif what == "replace":
                response = client.put(f"/v1/adapters/{adapter_id}", files=multipart(*files))
            else:
                response = client.delete(f"/v1/adapters/{adapter_id}")
            done.append((what, response.status_code))
    return done


def listing(url: str) -> dict[str, tuple[int, dict]]:
    """id -> (version, files with their checksums), as the server reports them."""
    adapters = httpx.get(f"{url}/v1/adapters", params={"limit": 100}, timeout=30).json()["data"]
    return {a["id"]: (a["version"], a["files"]) for a in adapters}


def completion(url: str, adapter_id: str) -> str:
    response = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": adapter_id, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def assert_whole_and_agreed(store: Path, urls: list[str]) -> None:
    reopened = AdapterStore(store)  # opening also sweeps what an interrupted write left
    for adapter_id in reopened.ids():
        reopened.read(adapter_id)  # raises on a missing file or a checksum that does not match
    listings = [listing(url) for url in urls]
    assert all(found == listings[0] for found in listings)
    assert set(listings[0]) == set(reopened.ids())
    for adapter_id in listings[0]:
        assert len({completion(url, adapter_id) for url in urls}) == 1


def test_two_servers_mutating_the_same_ids_at_once_leave_one_whole_store_they_agree_on(start_server, tmp_path):
    store = tmp_path / "store"
    servers = [start_server(5, store=store, **SERVER) for _ in range(2)]
    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(mutate, servers[worker % 2].url, worker, 15) for worker in range(8)]
        done = [result for job in jobs for result in job.result()]
    unexpected = [(what, status) for what, status in done if status not in EXPECTED[what]]
    assert not unexpected
    assert {status for _, status in done} >= {200, 201}  # the race was real: things were created and changed
    assert_whole_and_agreed(store, [server.url for server in servers])


def test_a_server_killed_while_it_uploads_leaves_the_store_whole_for_the_other(start_server, tmp_path):
    """Three times: a second server takes uploads and replaces from four clients and is SIGKILLed after a random
    moment, with writes in flight; the first one serves on, from a whole store."""
    store = tmp_path / "store"
    survivor = start_server(5, store=store, **SERVER)
    rng = random.Random(7)
    for round_ in range(3):
        victim = start_server(5, store=store, **SERVER)
        with ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(mutate, victim.url, 10 * round_ + worker, 200) for worker in range(4)]
            time.sleep(rng.uniform(0.2, 1.0))
            victim.process.kill()
            victim.process.wait()
            for job in jobs:
                with pytest.raises(httpx.TransportError):  # its clients see the connection go, not a hang
                    job.result()
        assert_whole_and_agreed(store, [survivor.url])
