"""Store faults while the server runs: a stored adapter's file damaged on disk, a full disk during an upload.

Damaged adapters are written straight into the running server's store, as another process sharing the
store would, so the server has never loaded them and their only copy is the damaged one on disk. Every
expected output comes from the same request answered while nothing was broken.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import adapters_store.store as store_mod
from adapters_store.peft_format import WEIGHTS_FILE
from server.config import Settings
from server.engine import Engine
from tests.support.adapter_uploads import MAX_RANK, PROMPT, multipart, peft_files, upload
from tests.support.prometheus_text import value
from tests.support.servers import serving_engine
from tests.support.snapshots import snapshot


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Engine]]:
    store = tmp_path_factory.mktemp("store")
    with serving_engine(Settings(store=store, max_gpu_adapters=2, max_lora_rank=MAX_RANK,
                                 max_adapter_bytes=4 * 2**20)) as served:
        yield served


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


@pytest.fixture
def reads(server, monkeypatch) -> list[str]:
    """The ids the server reads from its store, in order, from now on."""
    store = server[1].registry.store
    read, seen = store.read, []

    def counting(adapter_id: str):
        seen.append(adapter_id)
        return read(adapter_id)

    monkeypatch.setattr(store, "read", counting)
    return seen


# ------------------------------------------------------------------------------------------ helpers


def body(adapter: str | None, **extra) -> dict:
    request = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    return request if adapter is None else request | {"adapter_id": adapter}


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """Every completion request at once, so they share the engine's batches."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as aclient:
        return list(await asyncio.gather(*(aclient.post("/v1/completions", json=b) for b in bodies)))


def store_cold(engine: Engine, adapter_id: str, files: tuple[bytes, bytes]) -> Path:
    """Store an adapter behind the server's back (it has never loaded it); the path of its weights file."""
    adapter = engine.registry.validate(adapter_id, *files)
    engine.registry.store.create(adapter_id, *files, rank=adapter.rank, lora_alpha=adapter.lora_alpha,
                                 target_modules=adapter.target_modules)
    return engine.registry.store.root / adapter_id / "v1" / WEIGHTS_FILE


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


# fault -> (what damages the weights file, words the reason must contain)
FAULTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped-byte": (_flip_a_byte, "does not match its sha256 checksum"),
    "truncated": (_truncate, "the manifest says"),
    "deleted": (Path.unlink, "is missing"),
}


def break_adapter(engine: Engine, adapter_id: str, fault: str, seed: int) -> None:
    damage, _ = FAULTS[fault]
    damage(store_cold(engine, adapter_id, peft_files(engine, seed)))


def assert_broken_answer(response: httpx.Response, adapter_id: str, reason: str) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "adapter_broken"
    assert f"'{adapter_id}'" in error["message"] and reason in error["message"]
    assert f"PUT /v1/adapters/{adapter_id}" in error["message"]


def broken_loads(client: httpx.Client) -> float:
    return value(client.get("/metrics").text, "lorahive_adapter_broken_loads_total")


# ----------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_adapter_fails_alone_is_shown_broken_and_is_not_read_again(client, server, reads, fault):
    url, engine = server
    victim, healthy = f"damaged-{fault}", f"healthy-{fault}"
    store_cold(engine, healthy, peft_files(engine, seed=2))
    expected_healthy = text(client.post("/v1/completions", json=body(healthy)))
    expected_base = text(client.post("/v1/completions", json=body(None)))
    break_adapter(engine, victim, fault, seed=1)
    before = client.get(f"/v1/adapters/{victim}").json()
    assert before["status"] == "ready" and before["location"] == "disk"  # not loaded yet: nothing known
    broken_before = broken_loads(client)

    # Found while the request waits for the load; the others, in the same batches, are answered as before.
    victim_answer, *others = asyncio.run(post_all(url, [body(victim), body(healthy), body(None), body(healthy)]))
    reason = FAULTS[fault][1]
    assert_broken_answer(victim_answer, victim, reason)
    assert [text(r) for r in others] == [expected_healthy, expected_base, expected_healthy]

    info = client.get(f"/v1/adapters/{victim}").json()
    assert info["status"] == "broken" and reason in info["error"] and info["location"] == "disk"
    assert f"'{victim}'" not in info["error"]  # the reason, not a sentence naming the adapter twice
    listed = {a["id"]: a for a in client.get("/v1/adapters", params={"limit": 1000}).json()["data"]}
    assert listed[victim]["status"] == "broken"
    assert listed[healthy]["status"] == "ready" and listed[healthy]["error"] is None

    # Known broken: refused at once, streams before their headers, without touching the files again.
    assert_broken_answer(client.post("/v1/completions", json=body(victim)), victim, reason)
    assert_broken_answer(client.post("/v1/completions", json=body(victim, stream=True)), victim, reason)
    chat = {"model": victim, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert_broken_answer(client.post("/v1/chat/completions", json=chat), victim, reason)
    assert reads.count(victim) == 1
    assert broken_loads(client) == broken_before + 1
    # It took no room in any tier.
    version = engine.registry.version(victim)
    assert version.weights is None and version not in engine.registry._host_lru
    assert engine.pool.slot_of(version) is None


def test_weights_that_no_longer_parse_are_broken_too(client, server, reads):
    """Files whose checksums match but that this server cannot parse (say, written for another base model)."""
    engine = server[1]
    config, weights = peft_files(engine, seed=4)
    meta = engine.registry.validate("unparsable", config, weights)
    engine.registry.store.create("unparsable", config, b"not safetensors at all", rank=meta.rank,
                                 lora_alpha=meta.lora_alpha, target_modules=meta.target_modules)
    assert_broken_answer(client.post("/v1/completions", json=body("unparsable")), "unparsable", "no longer parse")
    assert client.get("/v1/adapters/unparsable").json()["status"] == "broken"
    assert_broken_answer(client.post("/v1/completions", json=body("unparsable")), "unparsable", "no longer parse")
    assert reads.count("unparsable") == 1


def test_a_stream_that_finds_its_adapter_broken_ends_with_an_error_event(client, server):
    engine = server[1]
    break_adapter(engine, "damaged-streamed", "flipped-byte", seed=5)
    events = []
    with client.stream("POST", "/v1/completions", json=body("damaged-streamed", stream=True)) as stream:
        # The load fails after the 200 went out: the error is reported in-band, then the stream ends.
        assert stream.status_code == 200
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "adapter_broken"
    assert client.get("/v1/adapters/damaged-streamed").json()["status"] == "broken"


def test_put_of_good_files_serves_a_broken_adapter_again(client, server):
    engine = server[1]
    break_adapter(engine, "mended", "flipped-byte", seed=6)
    assert_broken_answer(client.post("/v1/completions", json=body("mended")), "mended", "sha256")
    good = peft_files(engine, seed=7)
    assert upload(client, "mended-reference", good).status_code == 201
    expected = text(client.post("/v1/completions", json=body("mended-reference")))

    replaced = client.put("/v1/adapters/mended", files=multipart(*good))
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["version"] == 2 and replaced.json()["status"] == "ready"
    assert replaced.json()["error"] is None
    assert text(client.post("/v1/completions", json=body("mended"))) == expected
    assert client.get("/v1/adapters/mended").json()["status"] == "ready"


def test_delete_of_a_broken_adapter(client, server):
    engine = server[1]
    break_adapter(engine, "condemned", "deleted", seed=8)
    assert_broken_answer(client.post("/v1/completions", json=body("condemned")), "condemned", "missing")
    deleted = client.delete("/v1/adapters/condemned")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert client.get("/v1/adapters/condemned").status_code == 404
    assert client.post("/v1/completions", json=body("condemned")).status_code == 404
    assert "condemned" not in engine.registry.store


def test_a_load_failure_that_is_not_the_files_fault_is_retried(client, server, reads, monkeypatch):
    """Out of memory while parsing, say: the waiting request fails, the adapter is not broken, the next loads it."""
    engine = server[1]
    files = peft_files(engine, seed=9)
    assert upload(client, "flaky-reference", files).status_code == 201
    expected = text(client.post("/v1/completions", json=body("flaky-reference")))
    store_cold(engine, "flaky", files)
    parse, failures = engine.registry._parse, []

    def fail_once(*args):
        if not failures:
            failures.append(args[0])
            raise MemoryError("injected")
        return parse(*args)

    monkeypatch.setattr(engine.registry, "_parse", fail_once)
    assert client.post("/v1/completions", json=body("flaky")).status_code == 500
    info = client.get("/v1/adapters/flaky").json()
    assert info["status"] == "ready" and info["error"] is None
    assert text(client.post("/v1/completions", json=body("flaky"))) == expected
    assert failures == ["flaky"] and reads.count("flaky") == 2


# ----------------------------------------------------------------------------------- damaged manifest


def _halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# fault -> what damages the adapter's manifest.json
MANIFEST_FAULTS: dict[str, Callable[[Path], None]] = {
    "deleted": Path.unlink,
    "truncated": _halve,
    "not-an-object": lambda path: path.write_text("[]"),
}


def break_manifest(engine: Engine, adapter_id: str, fault: str, seed: int) -> None:
    store_cold(engine, adapter_id, peft_files(engine, seed))
    MANIFEST_FAULTS[fault](engine.registry.store.root / adapter_id / "manifest.json")


@pytest.mark.parametrize("fault", MANIFEST_FAULTS)
def test_an_adapter_whose_manifest_is_damaged_is_shown_broken_until_a_put_restores_it(client, server, fault):
    url, engine = server
    victim, healthy, reference = f"manifest-{fault}", f"beside-manifest-{fault}", f"reference-manifest-{fault}"
    store_cold(engine, healthy, peft_files(engine, seed=2))
    expected_healthy = text(client.post("/v1/completions", json=body(healthy)))
    expected_base = text(client.post("/v1/completions", json=body(None)))
    break_manifest(engine, victim, fault, seed=1)

    victim_answer, *others = asyncio.run(post_all(url, [body(victim), body(healthy), body(None)]))
    assert_broken_answer(victim_answer, victim, "manifest.json")
    assert [text(r) for r in others] == [expected_healthy, expected_base]
    info = client.get(f"/v1/adapters/{victim}").json()
    # All that was known of it lived in the manifest: the owner too, so that only admins see it now.
    assert info["status"] == "broken" and "manifest.json" in info["error"]
    assert (info["version"], info["owner"], info["files"]) == (1, None, {})
    listed = {a["id"]: a for a in client.get("/v1/adapters", params={"limit": 1000}).json()["data"]}
    assert listed[victim]["status"] == "broken" and listed[healthy]["status"] == "ready"
    assert victim in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert upload(client, victim, peft_files(engine, seed=3)).status_code == 409  # its id is still taken
    patched = client.patch(f"/v1/adapters/{victim}", json={"public": True})
    assert patched.status_code == 409 and patched.json()["error"]["code"] == "adapter_broken"

    files = peft_files(engine, seed=3)
    restored = client.put(f"/v1/adapters/{victim}", files=multipart(*files))
    assert restored.status_code == 200, restored.text
    assert (restored.json()["status"], restored.json()["version"]) == ("ready", 2)
    assert upload(client, reference, files).status_code == 201
    assert text(client.post("/v1/completions", json=body(victim))) == text(
        client.post("/v1/completions", json=body(reference)))


def test_delete_of_an_adapter_whose_manifest_is_damaged_frees_its_id(client, server):
    engine = server[1]
    break_manifest(engine, "manifestless", "deleted", seed=4)
    assert client.get("/v1/adapters/manifestless").json()["status"] == "broken"
    deleted = client.delete("/v1/adapters/manifestless")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert client.get("/v1/adapters/manifestless").status_code == 404
    assert upload(client, "manifestless", peft_files(engine, seed=4)).status_code == 201
    assert client.get("/v1/adapters/manifestless").json()["status"] == "ready"


# ------------------------------------------------------------------------------------------ full disk


def _disk_fills_during_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's writes fail with ENOSPC halfway through the weights file, as a full disk would."""
    write = store_mod._write_file

    def filling(path: Path, data: bytes) -> None:
        if path.name == WEIGHTS_FILE:
            write(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, data)

    monkeypatch.setattr(store_mod, "_write_file", filling)


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_full_disk_during_upload_is_507_and_leaves_the_store_unchanged(client, server, monkeypatch, method):
    engine = server[1]
    assert upload(client, f"kept-{method}", peft_files(engine, seed=10)).status_code == 201
    expected = text(client.post("/v1/completions", json=body(f"kept-{method}")))
    root = engine.registry.store.root
    before = snapshot(root)

    _disk_fills_during_weights(monkeypatch)
    files = peft_files(engine, seed=11)
    if method == "POST":
        response = upload(client, f"new-{method}", files)
    else:
        response = client.put(f"/v1/adapters/kept-{method}", files=multipart(*files))
    monkeypatch.undo()

    assert response.status_code == 507, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "insufficient_storage"
    assert snapshot(root) == before
    assert client.get(f"/v1/adapters/new-{method}").status_code == 404
    kept = client.get(f"/v1/adapters/kept-{method}").json()
    assert kept["version"] == 1 and kept["status"] == "ready"
    assert text(client.post("/v1/completions", json=body(f"kept-{method}"))) == expected
