"""Random LoRA adapters as the PEFT files a client uploads, the multipart form that carries them, and the
prompt and rank limit of the servers they are uploaded to."""

from __future__ import annotations

import httpx

from adapters_store import TARGET_MODULES
from adapters_store.peft_export import to_peft_files
from server.demo import build_demo_model
from server.engine import Engine
from tests.support.engines import make_adapter, prompt

PROMPT = list(prompt(7, 12))  # compared with and without an adapter
MAX_RANK = 16  # the --max-lora-rank of the servers these adapters go to


def peft_files(engine: Engine, seed: int, rank: int = 8, std: float = 0.1) -> tuple[bytes, bytes]:
    return to_peft_files(make_adapter("x", engine.args, rank, 2.0 * rank, TARGET_MODULES, seed, std))


def multipart(config: bytes, weights: bytes) -> dict:
    return {"adapter_config": ("adapter_config.json", config), "adapter_model": ("adapter_model.safetensors", weights)}


def upload(client: httpx.Client, adapter_id: str, files: tuple[bytes, bytes]) -> httpx.Response:
    return client.post("/v1/adapters", data={"id": adapter_id}, files=multipart(*files))


def peft_multipart(engine: Engine, seed: int) -> dict[str, tuple[str, bytes]]:
    return multipart(*to_peft_files(make_adapter("x", engine.args, 2, 4.0, ("q_proj", "v_proj"), seed)))


DEMO_ARGS = build_demo_model()[0].args


def demo_peft_files(rank: int, seed: int) -> tuple[bytes, bytes]:
    return to_peft_files(make_adapter("x", DEMO_ARGS, rank, 2.0 * rank, ("q_proj", "v_proj"), seed))


# A small and a big adapter (on q_proj and v_proj) for the demo model, made once.
SMALL, BIG = demo_peft_files(rank=1, seed=1), demo_peft_files(rank=4, seed=2)
