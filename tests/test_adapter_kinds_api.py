"""DoRA and IA3 adapters over the REST routes of a real server: uploaded, listed with their kind, served by
`adapter_id`, counted by kind in the metrics; a hostile upload of either kind gets a 400 naming the field or
tensor at fault and stores nothing."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import pytest
import torch
from safetensors.torch import load, save

from adapters_store import AdapterStore
from adapters_store.peft_export import to_peft_files
from server.config import Settings
from tests.support.adapter_uploads import DEMO_ARGS, PROMPT, upload
from tests.support.engines import make_adapter
from tests.support.prometheus_text import value
from tests.support.servers import serving_engine

MODULES = ("q_proj", "v_proj", "o_proj", "down_proj")
D_OUT_Q = DEMO_ARGS.lora_module_dims["q_proj"][1]
D_IN_DOWN = DEMO_ARGS.lora_module_dims["down_proj"][0]
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
DOWN0 = "base_model.model.model.layers.0.mlp.down_proj"


VIRTUAL = 6  # the soft prompt's length


def kind_files(kind: str, seed: int = 1) -> tuple[bytes, bytes]:
    rank = VIRTUAL if kind == "prompt" else 4  # a soft prompt's "rank" is its length
    return to_peft_files(make_adapter("x", DEMO_ARGS, rank, 8.0, MODULES, seed, kind=kind))


def edited(files: tuple[bytes, bytes], tensors: Callable[[dict], dict] = lambda t: t,
           config: Callable[[dict], dict] = lambda c: c) -> tuple[bytes, bytes]:
    return json.dumps(config(json.loads(files[0]))).encode(), save(tensors(load(files[1])))


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[httpx.Client, object]]:
    with serving_engine(Settings(max_lora_rank=16)) as (url, engine), httpx.Client(base_url=url, timeout=60) as client:
        yield client, engine


def complete(client: httpx.Client, adapter: str | None) -> list:
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 1}
    if adapter is not None:
        body["adapter_id"] = adapter
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["token_logprobs"]


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "prompt"])
def test_each_kind_is_uploaded_listed_served_and_counted(server, kind: str):
    client, _ = server
    adapter_id = f"kind-{kind}"
    assert upload(client, adapter_id, kind_files(kind)).status_code == 201
    info = client.get(f"/v1/adapters/{adapter_id}").json()
    assert info["kind"] == kind and info["target_modules"] == ([] if kind == "prompt" else list(MODULES))
    assert info["rank"] == (4 if kind in ("lora", "dora") else 0)
    assert info["num_virtual_tokens"] == (VIRTUAL if kind == "prompt" else 0)
    listed = {a["id"]: a["kind"] for a in client.get("/v1/adapters").json()["data"]}
    assert listed[adapter_id] == kind
    before = value(client.get("/metrics").text, "lorahive_adapter_kind_requests_total", kind=kind)
    assert complete(client, adapter_id) != complete(client, None)  # the adapter changes what the model says
    metrics = client.get("/metrics").text
    assert value(metrics, "lorahive_adapter_kind_requests_total", kind=kind) == before + 1
    assert value(metrics, "lorahive_adapter_residency", adapter=adapter_id, tier="gpu", kind=kind,
                 rank=str(info["rank"]), pinned="false") == 0


HOSTILE = {
    "dora magnitude of the wrong width": (
        "dora", lambda t: {**t, f"{Q0}.lora_magnitude_vector": torch.ones(D_OUT_Q + 1)}, None,
        f"{Q0}.lora_magnitude_vector"),
    "dora magnitude missing": (
        "dora", lambda t: {k: v for k, v in t.items() if k != f"{Q0}.lora_magnitude_vector"}, None,
        f"{Q0}.lora_A.weight"),
    "dora magnitude NaN": (
        "dora", lambda t: {**t, f"{Q0}.lora_magnitude_vector": torch.full((D_OUT_Q,), float("nan"))}, None,
        f"{Q0}.lora_magnitude_vector"),
    "ia3 vector of the wrong width": (
        "ia3", lambda t: {**t, f"{DOWN0}.ia3_l": torch.ones(1, D_IN_DOWN - 1)}, None, f"{DOWN0}.ia3_l"),
    "ia3 vector NaN": (
        "ia3", lambda t: {**t, f"{DOWN0}.ia3_l": torch.full((1, D_IN_DOWN), float("nan"))}, None, f"{DOWN0}.ia3_l"),
    "ia3 input scaling of a fused module": (
        "ia3", None, lambda c: {**c, "target_modules": [*c["target_modules"], "q_proj"],
                                "feedforward_modules": ["q_proj", "down_proj"]}, "feedforward_modules"),
    "unsupported peft_type": ("ia3", None, lambda c: {**c, "peft_type": "PREFIX_TUNING"}, "peft_type"),
    "soft prompt longer than num_virtual_tokens": (
        "prompt", lambda t: {"prompt_embeddings": torch.ones(VIRTUAL + 1, DEMO_ARGS.dim)}, None, "num_virtual_tokens"),
    "soft prompt of the wrong width": (
        "prompt", lambda t: {"prompt_embeddings": torch.ones(VIRTUAL, DEMO_ARGS.dim + 1)}, None, "prompt_embeddings"),
    "soft prompt NaN": (
        "prompt", lambda t: {"prompt_embeddings": torch.full((VIRTUAL, DEMO_ARGS.dim), float("nan"))}, None,
        "prompt_embeddings"),
    "token_dim not the model's": ("prompt", None, lambda c: {**c, "token_dim": DEMO_ARGS.dim * 2}, "token_dim"),
    "seq2seq prompt tuning": ("prompt", None, lambda c: {**c, "task_type": "SEQ_2_SEQ_LM"}, "task_type"),
    "soft prompt longer than the context": (
        "prompt", lambda t: {"prompt_embeddings": torch.ones(100_000, DEMO_ARGS.dim)},
        lambda c: {**c, "num_virtual_tokens": 100_000}, "num_virtual_tokens"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_uploads_of_each_kind_get_a_400_naming_the_field_and_store_nothing(server, case: str):
    client, engine = server
    kind, tensors, config, field = HOSTILE[case]
    files = edited(kind_files(kind), tensors or (lambda t: t), config or (lambda c: c))
    before = sorted(engine.registry.ids())
    response = upload(client, "hostile", files)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == "invalid_adapter"
    assert field in error["message"]
    assert client.get("/v1/adapters/hostile").status_code == 404
    assert sorted(engine.registry.ids()) == before
    assert not any(p.name.startswith("hostile") for p in engine.registry.store.root.rglob("*"))


def test_a_soft_prompt_counts_against_the_context_not_the_usage(server):
    client, engine = server
    assert upload(client, "soft", kind_files("prompt")).status_code == 201
    body = {"prompt": PROMPT, "adapter_id": "soft"}
    fits = engine.max_model_len - VIRTUAL - len(PROMPT)
    reply = client.post("/v1/completions", json={**body, "max_tokens": 1})
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == len(PROMPT)
    too_long = client.post("/v1/completions", json={**body, "max_tokens": fits + 1})
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["code"] == "context_length_exceeded" and f"soft prompt takes {VIRTUAL}" in error["message"]
    assert engine.registry.version("soft").users == 0  # the refused request let go of the adapter


def test_a_stored_soft_prompt_longer_than_this_server_s_context_is_unservable_not_broken(tmp_path):
    store = tmp_path / "store"
    long_prompt = to_peft_files(make_adapter("x", DEMO_ARGS, 40, 0.0, (), 3, kind="prompt"))
    AdapterStore(store).create("long", *long_prompt, rank=0, lora_alpha=0.0, target_modules=(), kind="prompt",
                               num_virtual_tokens=40)
    with serving_engine(Settings(store=store, max_model_len=32)) as (url, _), httpx.Client(base_url=url) as client:
        info = client.get("/v1/adapters/long").json()
        assert info["status"] == "unservable" and "--max-model-len" in info["error"]
        refused = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "adapter_id": "long"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "adapter_not_servable"
        upload_refused = upload(client, "long2", long_prompt)
        assert upload_refused.status_code == 400 and upload_refused.json()["error"]["param"] == "num_virtual_tokens"
