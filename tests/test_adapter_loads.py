"""Adapter loads stay off the engine's critical path: the loader threads pack an adapter for the device pages,
the host tier counts the packed bytes, and the engine thread only copies."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from adapters_store import AdapterStore, BaseModelShape
from server.adapter_packer import AdapterPacker
from server.adapter_registry import AdapterRegistry
from server.config import Settings
from server.demo import build_demo_model
from server.runtime import build_engine
from tests.support.engines import ADAPTER_SPECS, ENGINE_SETTINGS, generate, greedy, make_adapter, prompt


def test_the_engine_thread_packs_no_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Adapters read from disk while the engine runs are packed on the loader threads, never on the engine's,
    and those run torch with one intra-op thread (a second OpenMP team would oversubscribe the engine's cores)."""
    settings = Settings(**(ENGINE_SETTINGS | {"store": tmp_path}))
    writer = build_engine(settings)  # stores the adapters; the engine below starts with a cold host tier
    for i, name in enumerate(ADAPTER_SPECS):
        writer.registry.add(make_adapter(name, writer.args, *ADAPTER_SPECS[name], seed=40 + i))
    writer.shutdown()

    packing_threads: list[tuple[str, int]] = []
    pack = AdapterPacker.pack

    def recording_pack(packer, adapter):
        packing_threads.append((threading.current_thread().name, torch.get_num_threads()))
        return pack(packer, adapter)

    monkeypatch.setattr(AdapterPacker, "pack", recording_pack)
    engine = build_engine(settings)
    engine.start()
    try:
        choices = generate(engine, [greedy(prompt(i, 7), 3, name) for i, name in enumerate(ADAPTER_SPECS)])
    finally:
        engine.shutdown()
    assert all(choice.finish_reason == "length" for (choice,) in choices)
    assert len(packing_threads) == len(ADAPTER_SPECS)
    assert all(name.startswith("lorahive-adapter-load") and intra_op == 1 for name, intra_op in packing_threads), (
        packing_threads)


def test_the_host_tier_holds_and_counts_the_packed_bytes(tmp_path: Path):
    """Packed in the serving dtype: in bfloat16 the host tier holds (and its budget counts) half the parsed fp32
    weights' bytes, exactly each module's rank rows, with no padding to whole pages and nothing for modules the
    adapter does not target."""
    args = build_demo_model()[0].args
    registry = AdapterRegistry(AdapterStore(tmp_path), BaseModelShape(args.n_layers, args.lora_module_dims),
                               max_rank=16, host_budget_bytes=2**30, serving_dtype=torch.bfloat16)
    adapters = [make_adapter(name, args, *ADAPTER_SPECS[name], seed=60 + i) for i, name in enumerate(("a1", "a4"))]
    versions = [registry.add(adapter) for adapter in adapters]
    rows = [sum(w.rank * (w.a.shape[1] + w.b.shape[0]) for w in adapter.weights.values()) for adapter in adapters]
    assert [v.weights.num_bytes for v in versions] == [2 * r for r in rows]
    assert [v.weights.num_bytes for v in versions] == [a.num_bytes // 2 for a in adapters]
    assert registry.stats.host == sum(v.weights.num_bytes for v in versions)
    registry.close()
