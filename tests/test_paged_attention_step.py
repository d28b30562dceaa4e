"""The model's attention reads the paged KV cache through the step's block tables: what `build_step` hands the
kernels for a mixed plan, where `KVCache.update` writes, one `paged_attention` call per layer whatever the mix,
the `--attention-backend` setting and the start-up check of the kernels on the served model's shape."""

from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import server.model
from kernels import AttentionShape, attention_reference, self_check
from server.cli import settings_from
from server.config import Settings
from server.demo import build_demo_model
from server.model import KVCache
from server.runtime import build_engine
from server.scheduler import ScheduledChunk
from server.step_builder import build_step
from tests.support.engines import ENGINE_SETTINGS

BLOCK = 4


@dataclass
class _Seq:  # the fields of scheduler.Sequence that build_step reads
    token_ids: list[int]
    num_computed: int
    blocks: list[int]
    slot: int
    num_virtual_tokens: int = 0


def mixed_plan() -> list[ScheduledChunk]:
    """Scheduled in an order the adapter sort changes: a decode (slot 1), a chunk on a cached prefix (slot -1),
    a whole prompt (slot 0) and a second decode (slot 1)."""
    return [
        ScheduledChunk(_Seq(list(range(10)), 9, [7, 3, 11], slot=1), 1),
        ScheduledChunk(_Seq(list(range(100, 114)), 5, [5, 9, 2, 8], slot=-1), 6),  # 11 of 14 tokens in cache
        ScheduledChunk(_Seq(list(range(200, 203)), 0, [4], slot=0), 3),
        ScheduledChunk(_Seq(list(range(300, 305)), 4, [6, 1], slot=1), 1),
    ]


def test_build_step_gives_each_sequence_its_rows_blocks_and_context() -> None:
    step, lora, sampled = build_step(mixed_plan(), BLOCK, sliding_window=6, device="cpu")
    batch = step.attention
    # Ordered by adapter slot (-1, 0, 1, 1): the prefix chunk, the prompt, then both decodes, each contiguous.
    assert batch.host_query_starts == (0, 6, 9, 10, 11)
    assert batch.query_starts.tolist() == [0, 6, 9, 10, 11]
    assert batch.host_context_lens == (11, 3, 10, 5)
    assert batch.context_lens.tolist() == [11, 3, 10, 5]
    assert [row[:n] for row, n in zip(batch.block_tables.tolist(), [4, 1, 3, 2], strict=True)] == [
        [5, 9, 2, 8], [4], [7, 3, 11], [6, 1],
    ]
    assert batch.block_tables.dtype == torch.int32 and not batch.decode_only
    assert step.sliding_window == 6
    # Each row's token, position and cache slot agree with the metadata's rows.
    assert step.input_ids.tolist() == [*range(105, 111), 200, 201, 202, 9, 304]
    assert step.positions.tolist() == [*range(5, 11), 0, 1, 2, 9, 4]
    # Position p of a sequence sits in slot blocks[p // 4] * 4 + p % 4.
    assert step.cache_slots.tolist() == [37, 38, 39, 8, 9, 10, 16, 17, 18, 45, 4]
    assert lora.token_slots.tolist() == [-1] * 6 + [0] * 3 + [1, 1]
    assert step.logits_index.tolist() == [8, 9, 10]  # the prefix chunk ends mid-prompt: nothing sampled
    assert [c.seq.token_ids[0] for c in sampled] == [200, 0, 300]


def test_a_decode_only_step_is_the_decode_kernels_case() -> None:
    decodes = [c for c in mixed_plan() if c.num_tokens == 1]
    step, _, _ = build_step(decodes, BLOCK, sliding_window=None, device="cpu")
    assert step.attention.decode_only and step.sliding_window is None
    assert step.attention.host_context_lens == (10, 5)


def test_kv_cache_update_writes_each_slot_into_its_block() -> None:
    cache = KVCache(n_layers=2, num_blocks=5, block_size=BLOCK, n_kv_heads=2, head_dim=3, dtype=torch.float32,
                    device="cpu")
    k, v = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 3), -torch.ones(2, 2, 3)
    k_pages, v_pages = cache.update(1, torch.tensor([6, 17]), k, v)
    assert k_pages.shape == (5, BLOCK, 2, 3) and k_pages.data_ptr() == cache.k[1].data_ptr()
    assert torch.equal(k_pages[1, 2], k[0]) and torch.equal(k_pages[4, 1], k[1])
    assert torch.equal(v_pages[1, 2], v[0]) and torch.equal(cache.v[1, 4, 1], v[1])
    assert cache.k[0].count_nonzero() == 0  # other layers untouched
    assert k_pages.count_nonzero() == k.count_nonzero()


def test_every_layer_makes_one_paged_attention_call_for_a_mixed_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """No per-group loop and no dense copy of the cache: the whole mix is one call per layer, on the cache's
    own memory, with the step's metadata and window and the model's backend."""
    model, _ = build_demo_model()
    args = model.args
    model.attention_context.backend = "torch"
    cache = KVCache(args.n_layers, 16, BLOCK, args.n_kv_heads, args.head_dim, torch.float32, "cpu")
    mixed = [  # a decode and a chunk on a cached prefix
        ScheduledChunk(_Seq(list(range(1, 16)), 14, [5, 9, 2, 8], -1), 1),
        ScheduledChunk(_Seq(list(range(20, 29)), 4, [0, 3, 11], -1), 5),
    ]
    step, lora, _ = build_step(mixed, BLOCK, sliding_window=5, device="cpu")
    calls = []
    real = server.model.paged_attention

    def recording(q, k_cache, v_cache, batch, window, backend):
        calls.append((q.shape[0], k_cache.data_ptr(), batch is step.attention, window, backend))
        return real(q, k_cache, v_cache, batch, window, backend)

    monkeypatch.setattr(server.model, "paged_attention", recording)
    model.lora.batch = lora
    logits = model(step, cache)
    assert logits.shape == (2, args.vocab_size) and torch.isfinite(logits).all()
    assert calls == [(6, cache.k[layer].data_ptr(), True, 5, "torch") for layer in range(args.n_layers)]


def test_attention_backend_setting_from_flag_and_environment() -> None:
    assert settings_from(Namespace(), {}).attention_backend == "auto"
    assert settings_from(Namespace(), {"LORAHIVE_ATTENTION_BACKEND": "triton"}).attention_backend == "triton"
    flag = Namespace(attention_backend="torch")
    assert settings_from(flag, {"LORAHIVE_ATTENTION_BACKEND": "triton"}).attention_backend == "torch"


def test_the_engine_checks_the_attention_kernels_on_its_own_model(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """build_engine runs the start-up check on the model's heads, the cache's block size and the model's window,
    and serves with the torch reference when the kernels disagree."""
    checked = []

    def disagreeing(ops, device, dtype, shape: AttentionShape) -> str:
        checked.append((torch.device(device).type, dtype, shape))
        return "a test disagreement"

    monkeypatch.setattr(self_check, "attention_disagreement", disagreeing)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # triton on a CPU: the interpreter
    settings = ENGINE_SETTINGS | {"device": device, "block_size": 8, "attention_backend": "triton"}
    with caplog.at_level("WARNING", logger="lorahive.kernels"):
        engine = build_engine(Settings(**settings))
    args = engine.args
    assert checked == [(device, torch.float32, AttentionShape(args.n_heads, args.n_kv_heads, args.head_dim, 8,
                                                              args.sliding_window))]
    assert engine.runner.model.attention_context.backend == "torch"
    assert "attention backend: using the torch reference instead of Triton" in caplog.text
    assert "a test disagreement" in caplog.text


def test_attention_memory_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/attention_memory.py runs end to end (tiny shapes); the paged path agrees with the dense
    baseline, and its temporaries follow one decode group's keys (here one sequence's 48: the budget is cut to
    that) while the baseline's follow batch x context."""
    from benchmarks.attention_memory import main

    monkeypatch.setattr(attention_reference, "DECODE_GROUP_KEYS", 48)  # the smoke's contexts of 40, padded

    out = tmp_path / "attention_memory.json"
    result = main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {(row["phase"], row["batch"]): row for row in result["rows"]}
    assert set(rows) == {(phase, batch) for phase in ("decode", "prefill") for batch in (1, 3)}
    assert all(row["max_abs_difference"] < 1e-4 and row["after_layer_s"] > 0 for row in rows.values())
    one, three = rows["decode", 1], rows["decode", 3]
    assert three["before_peak_bytes"] > 2.5 * one["before_peak_bytes"]
    assert three["after_peak_bytes"] < 1.5 * one["after_peak_bytes"]
