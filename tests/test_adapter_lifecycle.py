"""Adapters uploaded, replaced and deleted over real HTTP while the server serves.

Outputs are checked against the same request through an adapter whose weights are known, so "the
stream finished on the old weights" means token-for-token equality, not a guess.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from adapters_store.peft_export import to_peft_files
from server.config import Settings
from server.engine import Engine
from tests.support.adapter_uploads import MAX_RANK, PROMPT, multipart, peft_files, upload
from tests.support.engines import make_adapter
from tests.support.servers import serving_engine


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


def complete(client: httpx.Client, adapter: str | None, max_tokens: int = 12) -> str:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if adapter is not None:
        body["adapter_id"] = adapter
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_upload_then_complete_at_once(client, server):
    engine = server[1]
    response = upload(client, "fresh", peft_files(engine, seed=1))
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["id"] == "fresh" and info["version"] == 1 and info["rank"] == 8
    assert info["location"] in ("host", "device")
    assert set(info["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert complete(client, "fresh") != complete(client, None)  # the adapter is applied
    assert client.get("/v1/adapters/fresh").json()["requests_served"] == 1
    assert upload(client, "fresh", peft_files(engine, seed=2)).status_code == 409


def test_archive_uploads(client, server):
    config, weights = peft_files(server[1], seed=3)
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tar:
        for name, data in (("peft/adapter_config.json", config), ("peft/adapter_model.safetensors", weights)):
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("adapter_config.json", config)
        z.writestr("adapter_model.safetensors", weights)
    for adapter_id, archive in (("from-tgz", tgz.getvalue()), ("from-zip", zipped.getvalue())):
        response = client.post("/v1/adapters", data={"id": adapter_id}, files={"archive": ("a", archive)})
        assert response.status_code == 201, response.text
    assert complete(client, "from-tgz") == complete(client, "from-zip")


def test_replace_while_streaming_keeps_old_weights_for_the_running_stream(client, server):
    engine = server[1]
    old, new = peft_files(engine, seed=10), peft_files(engine, seed=11)
    assert upload(client, "probe-old", old).status_code == 201
    assert upload(client, "probe-new", new).status_code == 201
    expected_old, expected_new = complete(client, "probe-old", 40), complete(client, "probe-new", 40)
    assert expected_old != expected_new
    assert upload(client, "swapped", old).status_code == 201

    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True,
            "adapter_id": "swapped"}
    text = ""
    with client.stream("POST", "/v1/completions", json=body) as stream:
        events = stream.iter_lines()
        for line in events:
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
                break  # the stream is running on the old version: replace it now
        replaced = client.put("/v1/adapters/swapped", files=multipart(*new))
        assert replaced.status_code == 200 and replaced.json()["version"] == 2
        for line in events:
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text == expected_old
    assert complete(client, "swapped", 40) == expected_new


def test_delete_during_a_running_request_frees_every_tier_after_it(client, server):
    engine = server[1]
    files = peft_files(engine, seed=20)
    assert upload(client, "doomed", files).status_code == 201
    expected = complete(client, "doomed", 40)

    async def scenario() -> str:
        async with httpx.AsyncClient(base_url=server[0], timeout=60) as aclient:
            body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True,
                    "adapter_id": "doomed"}
            text = ""
            async with aclient.stream("POST", "/v1/completions", json=body) as stream:
                deleted = False
                async for line in stream.aiter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
                        if not deleted:
                            assert (await aclient.delete("/v1/adapters/doomed")).status_code == 200
                            deleted = True
                            gone = await aclient.post("/v1/completions", json={**body, "stream": False})
                            assert gone.status_code == 404
            return text

    assert asyncio.run(scenario()) == expected
    assert client.get("/v1/adapters/doomed").status_code == 404
    assert "doomed" not in [a["id"] for a in client.get("/v1/adapters").json()["data"]]
    # The last request finished: no tier holds the deleted weights any more.
    engine_idle = complete(client, None, 2)  # one more engine round handles the slot release
    assert engine_idle
    assert all(v.adapter_id != "doomed" for v in engine.registry._host_lru)
    assert all(key.adapter_id != "doomed" for key in engine.pool.resident_keys)


def test_listing_is_paginated(client, server):
    engine = server[1]
    for i in range(5):
        assert upload(client, f"page-{i}", peft_files(engine, seed=30 + i, rank=2)).status_code == 201
    seen, after = [], None
    while True:
        page = client.get("/v1/adapters", params={"limit": 2} | ({"after": after} if after else {})).json()
        assert len(page["data"]) <= 2
        seen += [a["id"] for a in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert [s for s in seen if s.startswith("page-")] == [f"page-{i}" for i in range(5)]
    assert seen == sorted(seen)


def _bad_uploads(engine: Engine) -> dict[str, dict]:
    config, weights = peft_files(engine, seed=40)
    nan = make_adapter("x", engine.args, 4, 8.0, ("q_proj",), seed=41)
    nan.weights[(0, "q_proj")].a[0, 0] = float("nan")
    wrong_shape = save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 7),
                        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(7, 4)})
    pickled = io.BytesIO()
    torch.save({"x": torch.zeros(2)}, pickled)
    slip = io.BytesIO()
    with zipfile.ZipFile(slip, "w") as z:
        z.writestr("../adapter_config.json", config)
        z.writestr("adapter_model.safetensors", weights)
    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w:gz") as tar:
        entry = tarfile.TarInfo("adapter_model.safetensors")
        entry.type, entry.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(entry)
    huge_header = (10 * 2**30).to_bytes(8, "little") + b"{}"
    return {
        "truncated": multipart(config, weights[: len(weights) // 2]),
        "huge-header": multipart(config, huge_header),
        "wrong-shape": multipart(config, wrong_shape),
        "rank-too-big": multipart(*peft_files(engine, seed=42, rank=MAX_RANK * 2)),
        "nan": multipart(*to_peft_files(nan)),
        "pickle": multipart(config, pickled.getvalue()),
        "zip-slip": {"archive": ("a.zip", slip.getvalue())},
        "symlink": {"archive": ("a.tgz", link.getvalue())},
        "missing-file": {"adapter_config": ("adapter_config.json", config)},
    }


BAD_UPLOADS = ["truncated", "huge-header", "wrong-shape", "rank-too-big", "nan", "pickle", "zip-slip", "symlink",
               "missing-file"]


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_uploads_are_refused_and_leave_nothing(client, server, case):
    engine = server[1]
    store_root: Path = engine.registry.store.root
    before = sorted(p.name for p in store_root.iterdir())
    response = client.post("/v1/adapters", data={"id": f"bad-{case}"}, files=_bad_uploads(engine)[case])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert sorted(p.name for p in store_root.iterdir()) == before
    assert client.get(f"/v1/adapters/bad-{case}").status_code == 404


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "", ".hidden", "x" * 200, "é"])
def test_bad_ids_are_refused(client, server, bad_id):
    response = upload(client, bad_id, peft_files(server[1], seed=50))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "id"


def test_body_over_the_limit_is_413_before_parsing(client, server):
    config, _ = peft_files(server[1], seed=60)
    response = upload(client, "too-big", (config, b"\0" * (6 * 2**20)))
    assert response.status_code == 413
    assert response.json()["error"]["message"]
    assert client.get("/v1/adapters/too-big").status_code == 404


def test_command_line_client_round_trip(server, tmp_path, capsys):
    from server.cli import main

    url = server[0]
    config, weights = peft_files(server[1], seed=70)
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_bytes(config)
    (peft_dir / "adapter_model.safetensors").write_bytes(weights)

    main(["adapters", "--url", url, "upload", "cli-made", str(peft_dir)])
    assert json.loads(capsys.readouterr().out)["version"] == 1
    main(["adapters", "--url", url, "upload", "cli-made", str(peft_dir), "--replace"])
    assert json.loads(capsys.readouterr().out)["version"] == 2
    main(["adapters", "--url", url, "list"])
    assert "cli-made" in capsys.readouterr().out
    main(["adapters", "--url", url, "show", "cli-made"])
    assert json.loads(capsys.readouterr().out)["id"] == "cli-made"
    main(["adapters", "--url", url, "delete", "cli-made"])
    with pytest.raises(SystemExit, match="404"):
        main(["adapters", "--url", url, "show", "cli-made"])
