"""The device tier in pages: a byte budget spent by rank, LRU eviction that makes room, pins, prefetch.

The pool decides; the model runner carries out its queued writes (`written`), which the page table shows."""

from __future__ import annotations

import pytest
import torch

from adapters_store import TARGET_MODULES
from kernels import PageTable
from kernels.paging import PAGE_RANK, ZERO_PAGE
from server.adapter_packer import AdapterPacker, PackedAdapter
from server.adapter_pool import AdapterSlotPool
from server.demo import build_demo_model
from server.model_runner import ModelRunner, adapter_page_bytes
from tests.support.engines import make_adapter

MAX_RANK = 64  # four pages per max-rank adapter


@pytest.fixture(scope="module")
def model():
    return build_demo_model()[0].to(torch.float32)


def adapter(model, name: str, rank: int, seed: int = 0, kind: str = "lora") -> PackedAdapter:
    """Packed for `model`'s pages, as the host tier holds it."""
    packer = AdapterPacker(model.output.weight.dtype)
    return packer.pack(make_adapter(name, model.args, rank, 2.0 * rank, TARGET_MODULES, seed=seed, kind=kind))


def pool_of(model, num_slots: int, pages: int | None, max_rank: int = MAX_RANK) -> AdapterSlotPool:
    page_bytes = adapter_page_bytes(model)
    budget = None if pages is None else pages * page_bytes
    return AdapterSlotPool(num_slots, max_rank, page_bytes, budget)


def runner_for(model, pool: AdapterSlotPool) -> ModelRunner:
    return ModelRunner(model, num_kv_blocks=1, block_size=16, num_slots=pool.num_slots, max_rank=pool.max_rank,
                       num_pages=pool.num_pages)


def written(pool: AdapterSlotPool, runner: ModelRunner) -> PageTable:
    """The page table once the runner has carried out every write the pool queued."""
    for write in pool.take_writes():
        runner.apply(write)
    return runner.table


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_default_budget_fits_every_slot_at_max_rank(model, kind: str):
    """The largest adapter, one of max rank with a vector page (DoRA), fits every slot; LoRA ones fit too."""
    pool = pool_of(model, num_slots=3, pages=None)
    assert pool.num_pages == 3 * (MAX_RANK // PAGE_RANK + 1)
    for i in range(3):
        assert pool.acquire(i, adapter(model, f"a{i}", MAX_RANK, seed=i, kind=kind)) is not None
    assert pool.evictions == 0
    rank_pages = 3 * MAX_RANK // PAGE_RANK
    assert pool.resident_bytes == (pool.capacity_bytes if kind == "dora" else rank_pages * pool.page_bytes)


def test_dora_and_ia3_adapters_take_one_more_page_for_their_vectors(model):
    pool = pool_of(model, num_slots=4, pages=16)
    runner = runner_for(model, pool)
    for key, kind, rank in (("lora", "lora", 16), ("dora", "dora", 16), ("ia3", "ia3", 0)):
        pool.release(pool.acquire(key, adapter(model, key, rank, kind=kind)))
    table = written(pool, runner)
    assert pool.resident_bytes == (1 + 2 + 1) * pool.page_bytes
    lora, dora, ia3 = (pool.slot_of(key) for key in ("lora", "dora", "ia3"))
    assert table.scale_pages[lora].item() == ZERO_PAGE and not table.has_vectors[lora]
    for slot, rank_pages in ((dora, 1), (ia3, 0)):
        vector_page = table.scale_pages[slot].item()
        assert table.has_vectors[slot] and vector_page != ZERO_PAGE
        assert len(table.host_pages[slot]) == rank_pages and vector_page not in table.host_pages[slot]
    assert table.scale_pages[-1].item() == ZERO_PAGE  # what a token without a slot (-1) reads


def test_byte_budget_holds_four_times_more_rank_16_than_rank_64_adapters(model):
    pool = pool_of(model, num_slots=8, pages=5)  # the least a max-rank (64) adapter with a vector page needs
    runner = runner_for(model, pool)
    for i in range(5):
        pool.release(pool.acquire(("r16", i), adapter(model, f"r16-{i}", 16, seed=i)))
    assert pool.resident_count == 5 and pool.evictions == 0
    assert pool.resident_bytes == 5 * pool.page_bytes == pool.capacity_bytes

    # One rank-64 adapter needs four pages: four rank-16 ones leave, least recently used first.
    pool.release(pool.acquire("r64", adapter(model, "r64", 64, seed=9)))
    assert pool.resident_count == 2 and pool.evictions == 4 and pool.slot_of(("r16", 4)) is not None
    table = written(pool, runner)
    assert sorted(p for p in table.pages[pool.slot_of("r64")].tolist()) == [1, 2, 3, 4]
    assert table.ranks[pool.slot_of("r64")] == 64


def test_eviction_takes_only_as_many_lru_adapters_as_the_pages_needed(model):
    pool = pool_of(model, num_slots=8, pages=6)
    for i, rank in enumerate([16, 32, 16, 16]):  # 1 + 2 + 1 + 1 pages, one page free
        pool.release(pool.acquire(i, adapter(model, f"a{i}", rank, seed=i)))
    pool.release(pool.acquire(0, None))  # 0 becomes the most recently used
    pool.release(pool.acquire("big", adapter(model, "big", 48, seed=7)))  # three pages: evict 1 (two pages)
    assert pool.slot_of(1) is None and pool.evictions == 1
    assert all(pool.slot_of(key) is not None for key in (0, 2, 3, "big"))
    assert pool.resident_bytes == pool.capacity_bytes


def test_pinned_adapters_are_never_evicted_and_a_load_that_cannot_fit_evicts_nothing(model):
    pool = pool_of(model, num_slots=8, pages=4, max_rank=48)  # 4 pages: the least a rank-48 DoRA adapter needs
    pinned = pool.acquire("pinned", adapter(model, "pinned", 32, seed=1))  # two pages, kept pinned
    pool.release(pool.acquire("idle", adapter(model, "idle", 16, seed=2)))
    assert pool.acquire("big", adapter(model, "big", 48, seed=3)) is None  # 3 pages: only 2 could be freed
    assert pool.slot_of("idle") is not None and pool.evictions == 0  # nothing evicted in vain
    pool.release(pinned)
    assert pool.acquire("big", adapter(model, "big", 48, seed=3)) is not None
    # The formerly pinned one is least recently used: its two pages and the free one suffice.
    assert pool.slot_of("pinned") is None and pool.slot_of("idle") is not None and pool.evictions == 1


def test_out_of_slots_evicts_even_when_pages_are_free(model):
    pool = pool_of(model, num_slots=2, pages=None)
    for i in range(3):
        pool.release(pool.acquire(i, adapter(model, f"a{i}", 8, seed=i)))
    assert pool.resident_count == 2 and pool.slot_of(0) is None and pool.evictions == 1


def test_freed_pages_are_reused_and_the_table_points_past_the_rank_at_the_zero_page(model):
    pool = pool_of(model, num_slots=4, pages=4, max_rank=48)
    runner = runner_for(model, pool)
    slot = pool.acquire("a", adapter(model, "a", 20, seed=1))  # two pages
    assert written(pool, runner).pages[slot].tolist() == [1, 2, ZERO_PAGE]
    pool.release(slot)
    pool.discard("a")
    table = written(pool, runner)
    assert table.ranks[slot] == 0 and table.pages[slot].tolist() == [ZERO_PAGE] * 3
    assert pool.resident_bytes == 0
    slot = pool.acquire("b", adapter(model, "b", 40, seed=2))
    assert sorted(written(pool, runner).pages[slot].tolist()[:3]) == [1, 2, 3]


def test_prefetch_evicts_only_what_is_neither_pinned_nor_wanted(model):
    pool = pool_of(model, num_slots=4, pages=4, max_rank=48)
    pinned = pool.acquire("pinned", adapter(model, "pinned", 16, seed=1))
    pool.release(pool.acquire("wanted", adapter(model, "wanted", 16, seed=2)))
    pool.release(pool.acquire("stale", adapter(model, "stale", 16, seed=3)))
    keep = {"wanted", "b", "c"}
    assert pool.prefetch("b", adapter(model, "b", 16, seed=4), keep)  # the one free page
    assert pool.prefetch("c", adapter(model, "c", 16, seed=5), keep)  # evicts "stale"
    assert pool.slot_of("stale") is None and pool.evictions == 1
    assert not pool.prefetch("d", adapter(model, "d", 16, seed=6), keep | {"d"})  # only wanted or pinned left
    assert pool.evictions == 1 and pool.prefetches == 2
    assert all(pool.slot_of(key) is not None for key in ("pinned", "wanted", "b", "c"))
    pool.release(pinned)


def test_a_budget_below_one_max_rank_adapter_is_refused_naming_the_flag(model):
    with pytest.raises(ValueError, match="--max-gpu-adapter-bytes"):
        pool_of(model, num_slots=4, pages=4)  # a rank-64 DoRA adapter needs 4 pages and a vector page


@pytest.mark.gpu
def test_a_slot_freed_behind_queued_compute_keeps_the_adapter_loaded_into_it():
    """The clear of an evicted slot and the load that reuses it are ordered, however long the compute queue.

    The slot's last reader is still queued on the compute stream (a long sleep stands in for a step) when a
    prefetch evicts its adapter and loads another into the same slot. Were the clear left on the compute
    stream while the load goes on the copy stream, the clear would land last and the new adapter's row would
    read as empty: silently no LoRA."""
    model = build_demo_model()[0].to("cuda", torch.bfloat16)
    pool = pool_of(model, num_slots=1, pages=None)
    runner = runner_for(model, pool)
    slot = pool.acquire("old", adapter(model, "old", 16, seed=1))
    written(pool, runner)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of queued work on the compute stream
    runner.mark_read([slot])  # as a step reading the slot does
    pool.release(slot)
    assert pool.prefetch("new", adapter(model, "new", 32, seed=2), keep=())
    table = written(pool, runner)
    torch.cuda.synchronize()
    assert pool.slot_of("new") == slot
    assert table.ranks[slot].item() == 32
    assert (table.pages[slot, :2] != ZERO_PAGE).all()
