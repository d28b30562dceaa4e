"""kernels.add_lora and kernels.reference.shrink/expand against a naive per-token float64 loop.

The naive loop is the Punica contract written as plainly as possible, on the *unpadded* per-slot,
per-slice A and B: for every token t with slot s >= 0 and every fused slice k,
    y[t, slice k] += (x[t] @ A_k[s].T) @ B_k[s].T
so it also checks the paged layout: each case scatters its slots' pages over the buffers in a random order,
with spare pages left free, and lower ranks leave zeros in a page.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import LoRABatch, PageTable, add_lora, reference
from kernels.layer_adapters import AdapterStack, StackGroup
from kernels.paging import ZERO_PAGE
from tests.support.lora_cases import TOLERANCES, LoraCase, make_case, naive_lora, naive_shrink

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
REFERENCE_PATHS = {"adapter by adapter": "adapter", "all at once": "dense"}  # the paths that read pages alone
# Every path of the reference, with whether it needs the adapters' weights kept (`AdapterSlices` with weights).
PATHS_AND_WEIGHTS = [(path, with_weights) for path in ("adapter", "dense") for with_weights in (False, True)] + [
    ("gathered", True)]


def force_path(patch: pytest.MonkeyPatch, path: str) -> None:
    patch.setattr(reference, "lora_path", lambda *args: path)


def run_add_lora(case: LoraCase) -> torch.Tensor:
    y = case.y.clone()
    add_lora(y, case.x, case.lora_a, case.lora_b, case.batch, case.widths, case.table)
    return y


def assert_matches_naive(case: LoraCase, actual: torch.Tensor) -> None:
    assert actual.dtype == case.y.dtype and actual.shape == case.y.shape
    expected = naive_lora(case)
    torch.testing.assert_close(actual.cpu().to(torch.float64), expected, **TOLERANCES[case.y.dtype])
    # Tokens without an adapter are never touched, not even by a rounding error.
    untouched = torch.tensor([s < 0 for s in case.token_slots], dtype=torch.bool)
    assert torch.equal(actual.cpu()[untouched], case.y.cpu()[untouched])


# ------------------------------------------------------------------------------------------ add_lora


@pytest.mark.parametrize("device", DEVICES)
def test_all_tokens_in_one_slot(torch_gen: torch.Generator, device: str) -> None:
    case = make_case(torch_gen, [2] * 9, num_slots=3, max_rank=4, d_in=32, widths=(24,), device=device)
    assert_matches_naive(case, run_add_lora(case))


@pytest.mark.parametrize("device", DEVICES)
def test_every_token_in_a_different_slot(torch_gen: torch.Generator, device: str) -> None:
    slots = [5, 0, 3, 6, 1, 4, 2]
    case = make_case(torch_gen, slots, num_slots=7, max_rank=4, d_in=32, widths=(16, 8), device=device)
    assert_matches_naive(case, run_add_lora(case))


@pytest.mark.parametrize("device", DEVICES)
def test_mix_of_slots_and_no_adapter(torch_gen: torch.Generator, device: str) -> None:
    # Segments of one slot, single tokens, -1 at both ends and inside, one slot appearing twice.
    slots = [-1, 0, 0, 0, 2, -1, -1, 1, 1, 2, 0, -1]
    case = make_case(torch_gen, slots, num_slots=4, max_rank=8, d_in=40, widths=(32, 8, 8), device=device)
    assert_matches_naive(case, run_add_lora(case))


@pytest.mark.parametrize("path", REFERENCE_PATHS)
def test_consecutive_pages_are_read_as_views_and_give_the_same_delta(torch_gen: torch.Generator, path: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference slices an adapter's pages when they are consecutive (no copy) and gathers them otherwise."""
    force_path(monkeypatch, REFERENCE_PATHS[path])
    slots = [0, 1, 1, -1, 2, 0, 2, 2]
    scattered = make_case(torch_gen, slots, num_slots=3, max_rank=48, d_in=24, widths=(16, 8, 8))
    assert_matches_naive(scattered, run_add_lora(scattered))
    lora_a, lora_b = torch.zeros_like(scattered.lora_a), torch.zeros_like(scattered.lora_b)
    table = PageTable.empty(3, 48)
    for slot in range(3):
        old = scattered.pages_of(slot)
        new = list(range(1 + 3 * slot, 1 + 3 * slot + len(old)))
        lora_a[new], lora_b[new] = scattered.lora_a[old], scattered.lora_b[old]
        table.assign(slot, int(scattered.table.ranks[slot]), new)
    consecutive = dataclasses.replace(scattered, lora_a=lora_a, lora_b=lora_b, table=table)
    assert all(isinstance(reference._slot_pages(table, slot), slice) for slot in range(3))
    assert any(isinstance(reference._slot_pages(scattered.table, slot), list) for slot in range(3))
    torch.testing.assert_close(run_add_lora(consecutive), run_add_lora(scattered), rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_all_tokens_without_adapter_leave_y_bit_identical(torch_gen: torch.Generator, device: str) -> None:
    case = make_case(torch_gen, [-1] * 6, num_slots=2, max_rank=4, d_in=16, widths=(16, 8), device=device)
    case.lora_a.fill_(float("nan"))  # not even read
    case.lora_b.fill_(float("nan"))
    y = run_add_lora(case)
    assert torch.equal(y, case.y)
    assert not case.batch.has_lora


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(torch_gen: torch.Generator, device: str) -> None:
    case = make_case(torch_gen, [], num_slots=2, max_rank=4, d_in=16, widths=(8, 4), device=device)
    y = run_add_lora(case)
    assert y.shape == (0, 12)
    v = reference.shrink(case.x, case.lora_a, case.batch, case.table)
    assert v.shape == (0, 2 * 16)
    reference.expand(y, v, case.lora_b, case.batch, case.widths, case.table)
    assert y.shape == (0, 12)


@pytest.mark.parametrize("device", DEVICES)
def test_slots_no_token_uses_are_never_read(torch_gen: torch.Generator, device: str) -> None:
    """Stale weights in idle slots' pages and in free pages (here NaN) must not leak into other tokens."""
    slots = [1, 1, -1, 3, 1]
    case = make_case(torch_gen, slots, num_slots=4, max_rank=4, d_in=24, widths=(16, 8), device=device)
    used = {p for slot in (1, 3) for p in case.pages_of(slot)} | {ZERO_PAGE}
    stale = [p for p in range(case.lora_a.shape[0]) if p not in used]
    case.lora_a[stale] = float("nan")
    case.lora_b[stale] = float("nan")
    assert_matches_naive(case, run_add_lora(case))


@pytest.mark.parametrize("device", DEVICES)
def test_rank_one_and_max_rank_with_zero_padding(torch_gen: torch.Generator, device: str) -> None:
    # Slot 0 rank 1, slot 1 the pool's max rank, slot 2 rank 3 on q and skipping k/v (rank 0: not targeted),
    # slot 3 different ranks per slice.
    ranks = [[1, 1, 1], [16, 16, 16], [3, 0, 0], [2, 16, 5]]
    slots = [0, 0, 1, 1, 1, 2, 3, 3, -1, 0, 2]
    case = make_case(
        torch_gen, slots, num_slots=4, max_rank=16, d_in=48, widths=(32, 16, 16), ranks=ranks, device=device
    )
    assert_matches_naive(case, run_add_lora(case))


@pytest.mark.parametrize("with_weights", [False, True], ids=["pages", "weights kept"])
@pytest.mark.parametrize("device", DEVICES)
def test_targets_skip_the_slices_an_adapter_leaves_alone(torch_gen: torch.Generator, device: str,
                                                         with_weights: bool) -> None:
    ranks = [[1, 1, 1], [16, 16, 16], [3, 0, 0], [2, 0, 5], [0, 0, 0]]
    slots = [0, 0, 1, 1, 1, 2, 3, 3, -1, 0, 2, 4]
    case = make_case(
        torch_gen, slots, num_slots=5, max_rank=16, d_in=48, widths=(32, 16, 16), ranks=ranks, device=device
    )
    y = case.y.clone()
    add_lora(y, case.x, case.lora_a, case.lora_b, case.batch, case.widths, case.table,
             targets=case.targets(with_weights))
    assert_matches_naive(case, y)


class MatmulShapes(TorchDispatchMode):
    """Records the (input, weight) shapes of every aten matmul run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm,
                                   torch.ops.aten.baddbmm_):
            self.shapes.append((tuple(args[-2].shape), tuple(args[-1].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_weights", [False, True], ids=["pages", "weights kept"])
def test_the_reference_does_an_adapters_own_rank_on_its_own_slices(torch_gen: torch.Generator, with_weights: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Adapter by adapter, a rank-8 adapter on q and v of a fused q|k|v: one shrink of 2 x 8 rows, two expands of
    8 ranks; a slot whose adapter targets nothing in this layer does no work; a missing entry in `targets` means
    the same."""
    force_path(monkeypatch, "adapter")
    case = make_case(torch_gen, [0, 0, 1, 0, 1], num_slots=2, max_rank=32, d_in=24, widths=(16, 8, 8),
                     ranks=[[8, 0, 8], [0, 0, 0]])
    with MatmulShapes() as recorded:
        add_lora(case.y.clone(), case.x, case.lora_a, case.lora_b, case.batch, case.widths, case.table,
                 targets=case.targets(with_weights))
    assert recorded.shapes == [((3, 24), (24, 16)), ((3, 8), (8, 16)), ((3, 8), (8, 8))]
    with MatmulShapes() as recorded:
        add_lora(case.y.clone(), case.x, case.lora_a, case.lora_b, case.batch, case.widths, case.table, targets={})
    assert recorded.shapes == []


@pytest.mark.parametrize("device", DEVICES)
def test_ranks_over_several_pages(torch_gen: torch.Generator, device: str) -> None:
    # 40 ranks take three pages; 33 on one slice and 17 on another end inside their last page.
    ranks = [[40, 33, 17], [5, 0, 20], [48, 48, 48]]
    slots = [0, 0, 1, -1, 2, 2, 1, 0]
    case = make_case(
        torch_gen, slots, num_slots=3, max_rank=48, d_in=24, widths=(16, 8, 8), ranks=ranks, device=device
    )
    assert [len(case.pages_of(slot)) for slot in range(3)] == [3, 2, 3]
    assert_matches_naive(case, run_add_lora(case))


@pytest.mark.parametrize("device", DEVICES)
def test_odd_dimensions(torch_gen: torch.Generator, device: str) -> None:
    slots = [0, 1, -1, 1, 0, 0, 1]
    case = make_case(torch_gen, slots, num_slots=2, max_rank=3, d_in=33, widths=(17,), device=device)
    assert_matches_naive(case, run_add_lora(case))


@pytest.mark.parametrize(
    "widths",
    [
        pytest.param((17,), id="one-slice"),
        pytest.param((40, 24), id="gate-up"),
        pytest.param((32, 8, 8), id="gqa-qkv"),
        pytest.param((9, 23, 1), id="odd-qkv"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_slices_of_different_widths(
    torch_gen: torch.Generator, device: str, widths: tuple[int, ...]
) -> None:
    slots = [0, 0, 0, 2, 2, -1, 1, 0]
    case = make_case(torch_gen, slots, num_slots=3, max_rank=4, d_in=20, widths=widths, device=device)
    assert_matches_naive(case, run_add_lora(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_dtypes(torch_gen: torch.Generator, device: str, dtype: torch.dtype) -> None:
    slots = [0, 0, 1, -1, 2, 2, 2, 1, -1, 0]
    ranks = [[8, 8, 8], [2, 2, 2], [5, 0, 8]]
    case = make_case(
        torch_gen, slots, num_slots=3, max_rank=8, d_in=64, widths=(32, 16, 16), ranks=ranks, dtype=dtype,
        device=device,
    )
    assert_matches_naive(case, run_add_lora(case))


def test_float64_inputs_keep_float64_precision(torch_gen: torch.Generator) -> None:
    """float64 in, float64 accuracy out: the reference must not round its intermediates to float32."""
    slots = [0, 0, 1, -1, 1]
    case = make_case(torch_gen, slots, num_slots=2, max_rank=8, d_in=64, widths=(32, 16))
    torch.testing.assert_close(run_add_lora(case), naive_lora(case), rtol=1e-13, atol=1e-13)
    assert reference.shrink(case.x, case.lora_a, case.batch, case.table).dtype == torch.float64


# ---------------------------------------------------------------------------------- shrink / expand


@pytest.mark.parametrize("device", DEVICES)
def test_shrink_then_expand_match_naive(torch_gen: torch.Generator, device: str) -> None:
    slots = [1, 1, -1, 0, 2, 2, -1]
    ranks = [[4, 1, 4], [4, 4, 4], [2, 3, 0]]
    case = make_case(
        torch_gen, slots, num_slots=3, max_rank=4, d_in=24, widths=(16, 8, 8), ranks=ranks, device=device
    )
    v = reference.shrink(case.x, case.lora_a, case.batch, case.table)
    assert v.shape == (len(slots), 3 * 16)
    torch.testing.assert_close(v.cpu().to(torch.float64), naive_shrink(case), **TOLERANCES[torch.float64])
    assert torch.count_nonzero(v.cpu()[torch.tensor(slots) < 0]) == 0  # rows of slot -1 are zero

    y = case.y.clone()
    reference.expand(y, v, case.lora_b, case.batch, case.widths, case.table)
    assert_matches_naive(case, y)


# --------------------------------------------------------------------------------------- property


@st.composite
def lora_cases(draw: st.DrawFn) -> tuple[int, list[int], int, int, int, tuple[int, ...], list[list[int]]]:
    num_slots = draw(st.integers(1, 5))
    max_rank = draw(st.integers(1, 40))
    num_tokens = draw(st.integers(0, 40))
    token_slots = draw(st.lists(st.integers(-1, num_slots - 1), min_size=num_tokens, max_size=num_tokens))
    d_in = draw(st.integers(1, 48))
    widths = tuple(draw(st.lists(st.integers(1, 48), min_size=1, max_size=3)))
    # Per slot and slice a rank up to the max (0: that adapter does not target that slice).
    ranks = draw(
        st.lists(
            st.lists(st.integers(0, max_rank), min_size=len(widths), max_size=len(widths)),
            min_size=num_slots,
            max_size=num_slots,
        )
    )
    seed = draw(st.integers(0, 2**32 - 1))
    return seed, token_slots, num_slots, max_rank, d_in, widths, ranks


@pytest.mark.parametrize(("path", "with_weights"), PATHS_AND_WEIGHTS)
@settings(max_examples=60, deadline=None)
@given(lora_cases())
def test_add_lora_matches_naive_on_any_shape(
    path: str, with_weights: bool, params: tuple[int, list[int], int, int, int, tuple[int, ...], list[list[int]]],
) -> None:
    seed, token_slots, num_slots, max_rank, d_in, widths, ranks = params
    gen = torch.Generator().manual_seed(seed)
    case = make_case(gen, token_slots, num_slots, max_rank, d_in, widths, ranks=ranks)
    with pytest.MonkeyPatch.context() as patch:  # hypothesis runs many examples per test: no function fixture
        force_path(patch, path)
        y = case.y.clone()
        add_lora(y, case.x, case.lora_a, case.lora_b, case.batch, case.widths, case.table,
                 targets=case.targets(with_weights))
    assert_matches_naive(case, y)


@settings(max_examples=40, deadline=None)
@given(lora_cases(), st.lists(st.lists(st.integers(-1, 11), min_size=1, max_size=24), min_size=2, max_size=6))
def test_a_kept_stack_serves_batch_after_batch_as_adapters_come_and_go(
    params: tuple[int, list[int], int, int, int, tuple[int, ...], list[list[int]]], batches: list[list[int]],
) -> None:
    """A stack through a stream of batches over the same adapters, as a CPU model runner keeps it from step to step
    for two layers of one shape (every other adapter targets nothing in the second: PEFT's layers_to_transform):
    newcomers are written over positions of adapters the batch does not use (a larger rank or another slice builds
    a new stack), and every batch still gets exactly its own adapters' deltas in both layers."""
    seed, _, num_slots, max_rank, d_in, widths, ranks = params
    gen = torch.Generator().manual_seed(seed)
    skipping = [[0] * len(slot_ranks) if slot % 2 else slot_ranks for slot, slot_ranks in enumerate(ranks)]
    cases = [make_case(gen, [], num_slots, max_rank, d_in, widths, ranks=layer_ranks)
             for layer_ranks in (ranks, skipping)]
    group = StackGroup()
    targets = [case.targets(with_weights=True, group=group) for case in cases]
    with pytest.MonkeyPatch.context() as patch:
        force_path(patch, "gathered")
        for token_slots in batches:
            token_slots = [slot % num_slots if slot >= 0 else -1 for slot in token_slots]
            batch = LoRABatch.from_token_slots(token_slots)  # one step: both layers read what it caches
            for case, layer_targets in zip(cases, targets, strict=True):
                step = dataclasses.replace(
                    case, token_slots=token_slots,
                    x=torch.randn(len(token_slots), d_in, generator=gen, dtype=torch.float64),
                    y=torch.randn(len(token_slots), sum(widths), generator=gen, dtype=torch.float64))
                y = step.y.clone()
                add_lora(y, step.x, None, None, batch, widths, case.table, targets=layer_targets)
                assert_matches_naive(step, y)


def test_the_reference_takes_every_adapter_at_once_where_ops_cost_more_than_flops(
    torch_gen: torch.Generator,
) -> None:
    """Eight rank-16 adapters on a 32-wide layer: one shrink over all eight pages and one expand per slice, not
    a GEMM per adapter; with a single adapter, or wide layers, each adapter alone."""
    slots = [t % 8 for t in range(16)]
    narrow = make_case(torch_gen, slots, num_slots=8, max_rank=16, d_in=32, widths=(32, 16))
    with MatmulShapes() as recorded:
        y = run_add_lora(narrow)
    assert recorded.shapes == [((16, 32), (32, 8 * 2 * 16)), ((16, 8 * 16), (8 * 16, 32)), ((16, 8 * 16), (8 * 16, 16))]
    assert_matches_naive(narrow, y)
    wide = make_case(torch_gen, slots, num_slots=8, max_rank=16, d_in=2048, widths=(2048,))
    with MatmulShapes() as recorded:
        run_add_lora(wide)
    assert len(recorded.shapes) == 2 * 8


class OpNames(TorchDispatchMode):
    """Records the name of every aten op run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def count(self, *fragments: str) -> int:
        return sum(1 for name in self.names if any(fragment in name for fragment in fragments))


@pytest.mark.parametrize(("slots", "every_token"), [
    ([t // 2 for t in range(16)], True), ([5, 0, 7, 3, 1, 6, 2, 4], True),
    ([-1, 0, 0, 0, 1, 2, 2, -1, 3, 4, 5, 6, 7, 7], False)], ids=[
    "grouped, runs of two", "one token each, out of order", "scattered runs of one to three, some without adapter"])
def test_many_small_adapters_with_kept_weights_are_gathered_from_a_kept_stack(
    torch_gen: torch.Generator, slots: list[int], every_token: bool,
) -> None:
    """Eight rank-16 adapters (one of rank 8, one targeting only the second slice) on a 32-wide layer, weights kept
    and no pages (a CPU model runner's): no GEMM, one gathered shrink and one gathered expand per slice; where every
    token has an adapter, not a single gather or scatter of tokens either. The stack is kept while batches reuse
    it, and an adapter loaded again is written over a position no adapter of the batch holds, the others left
    where they are."""
    ranks = [[16, 16]] * 6 + [[8, 8], [0, 16]]
    case = make_case(torch_gen, slots, num_slots=8, max_rank=16, d_in=32, widths=(32, 16), ranks=ranks)
    targets = case.targets(with_weights=True)
    assert reference.lora_path(case.batch, case.table, 32, case.widths, targets, False) == "gathered"

    def run() -> torch.Tensor:
        y = case.y.clone()
        add_lora(y, case.x, None, None, case.batch, case.widths, case.table, targets=targets)
        return y

    with OpNames() as recorded:
        y = run()
    assert recorded.count("mm") == 0
    assert recorded.count("embedding_bag") == 1 + 2
    assert recorded.count("index_select", "index_add", "index_copy", "gather", "scatter") == (0 if every_token else 2)
    assert targets.stack.capacity > 8  # room for a few more adapters
    assert_matches_naive(case, y)
    stack = targets.stack
    held = list(stack.held)
    assert torch.equal(run(), y) and targets.stack is stack and stack.held == held
    # Slot 3 loaded again, with A zero this time: its tokens get no delta, the others' stay where they are.
    targets[3] = dataclasses.replace(targets[3], a_t=torch.zeros_like(targets[3].a_t))
    reloaded = run()
    assert targets.stack is stack and [s for s in stack.held if s != 3] == [s for s in held if s != 3]
    slot_3 = torch.tensor(slots) == 3
    assert torch.equal(reloaded[~slot_3], y[~slot_3]) and torch.equal(reloaded[slot_3], case.y[slot_3])


@pytest.mark.parametrize("grouped", [False, True], ids=["a stack each", "one stack for both"])
@pytest.mark.parametrize("planned_on", ["every adapter's layer", "half the adapters' layer"])
def test_layers_of_one_shape_that_disagree_on_what_an_adapter_targets_each_add_their_own(
    torch_gen: torch.Generator, planned_on: str, grouped: bool,
) -> None:
    """A step's layers of one shape share one plan, made on the first of them; here half the adapters target one
    layer and not the other (PEFT's layers_to_transform). Each layer still adds exactly its own adapters'
    deltas, whichever of the two the plan was made on, and whether the layers read their own stacks or, as a
    model runner's layers of one shape do, one stack placed once for both (zeros where an adapter targets
    nothing)."""
    slots = list(range(8))  # a decode step: one token per adapter, gathered
    every = make_case(torch_gen, slots, num_slots=8, max_rank=8, d_in=256, widths=(256, 128))
    half = make_case(torch_gen, slots, num_slots=8, max_rank=8, d_in=256, widths=(256, 128),
                     ranks=[[0, 0]] * 4 + [[8, 8]] * 4)
    layers = (every, half) if planned_on == "every adapter's layer" else (half, every)
    group = StackGroup() if grouped else None
    targets = [case.targets(with_weights=True, group=group) for case in layers]
    batch = LoRABatch.from_token_slots(slots)  # one step: both layers read what it caches
    assert reference.lora_path(batch, layers[0].table, 256, layers[0].widths, targets[0], False) == "gathered"
    for case, layer_targets in zip(layers, targets, strict=True):
        y = case.y.clone()
        add_lora(y, case.x, None, None, batch, case.widths, case.table, targets=layer_targets)
        assert_matches_naive(case, y)
    stacks = {id(layer_targets.stack) for layer_targets in targets}
    assert len(stacks) == (1 if grouped else 2) and None not in {layer_targets.stack for layer_targets in targets}


@pytest.mark.parametrize("room", ["none", "no slack", "one group of two"])
def test_a_stack_never_outgrows_its_groups_bound(torch_gen: torch.Generator, room: str) -> None:
    """A group's kept stack holds at most `max_elements` (the model runner's share of the stacks' budget): with no
    room for one of the batch's adapters the step goes adapter by adapter and builds no stack; with room for
    exactly its adapters the stack has no spare positions; where the plan's group had room and another group of
    the shape has none, that one goes adapter by adapter. Every layer still adds exactly its adapters' deltas."""
    slots = list(range(8))  # a decode step of eight adapters: gathered where a stack fits
    cases = [make_case(torch_gen, slots, num_slots=8, max_rank=8, d_in=64, widths=(64, 32)) for _ in range(2)]
    position = AdapterStack.position_elements((0, 1), 8, 64, (64, 32))
    limit = {"none": 8 * position - 1, "no slack": 8 * position, "one group of two": None}[room]
    batch = LoRABatch.from_token_slots(slots)  # one step: both layers read what it caches
    layers = [case.targets(with_weights=True) for case in cases]
    layers[0].group.max_elements = limit
    layers[1].group.max_elements = limit if room != "one group of two" else 8 * position - 1
    for case, targets in zip(cases, layers, strict=True):
        y = case.y.clone()
        add_lora(y, case.x, None, None, batch, case.widths, case.table, targets=targets)
        assert_matches_naive(case, y)
    path = reference.lora_path(batch, cases[0].table, 64, cases[0].widths, layers[0], False)
    assert path == ("adapter" if room == "none" else "gathered")
    stacks = [targets.stack for targets in layers]
    if room == "none":
        assert stacks == [None, None]
    elif room == "no slack":
        assert [stack.capacity for stack in stacks] == [8, 8]
    else:
        assert stacks[0] is not None and stacks[0].capacity > 8 and stacks[1] is None
    for targets, stack in zip(layers, stacks, strict=True):
        bound = targets.group.max_elements
        assert stack is None or bound is None or stack.capacity * position <= bound


def test_a_long_run_among_gathered_ones_gets_gemms_of_its_own(torch_gen: torch.Generator) -> None:
    """A 64-token prefill chunk among seven decode tokens of other adapters: the decodes are gathered, the chunk
    goes through its adapter's own GEMMs (row by row it would read its adapter 64 times)."""
    slots = [0] * 64 + list(range(1, 8))
    case = make_case(torch_gen, slots, num_slots=8, max_rank=16, d_in=256, widths=(256, 128))
    targets = case.targets(with_weights=True)
    assert reference.lora_path(case.batch, case.table, 256, case.widths, targets, False) == "gathered"
    y = case.y.clone()
    with MatmulShapes() as recorded, OpNames() as ops:
        add_lora(y, case.x, None, None, case.batch, case.widths, case.table, targets=targets)
    assert recorded.shapes == [((64, 256), (256, 2 * 16)), ((64, 16), (16, 256)), ((64, 16), (16, 128))]
    assert ops.count("embedding_bag") == 3
    assert_matches_naive(case, y)


# -------------------------------------------------------------------------------------- LoRABatch


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tokens_already_grouped_by_slot_are_updated_where_they_are(torch_gen: torch.Generator,
                                                                  dtype: torch.dtype) -> None:
    slots = [-1, 0, 0, 1, 1, 1, 3, -1]
    case = make_case(torch_gen, slots, num_slots=4, max_rank=8, d_in=24, widths=(16, 8), dtype=dtype)
    assert case.batch.grouped_from == 1
    assert_matches_naive(case, run_add_lora(case))


@pytest.mark.parametrize(("token_slots", "grouped_from"), [
    ([-1, 0, 0, 2, 2, -1], 1), ([0, 0], 0), ([2, 0], None), ([0, -1, 0], None), ([0, 2, 1, 3], None), ([-1], None),
])
def test_lora_batch_knows_when_its_tokens_are_grouped_by_slot(token_slots: list[int], grouped_from: int | None) -> None:
    assert LoRABatch.from_token_slots(token_slots).grouped_from == grouped_from


def test_lora_batch_segments_and_active_slots() -> None:
    batch = LoRABatch.from_token_slots([3, 3, -1, -1, 0, 3, 3, 3, -1])
    assert batch.token_slots.tolist() == [3, 3, -1, -1, 0, 3, 3, 3, -1]
    assert batch.token_slots.dtype == torch.int64
    assert batch.segment_starts.tolist() == [0, 2, 4, 5, 8, 9]
    assert batch.segment_slots.tolist() == [3, -1, 0, 3, -1]
    assert batch.segment_starts.dtype == batch.segment_slots.dtype == torch.int64
    assert batch.active_slots == (0, 3)
    assert batch.has_lora
    assert batch.by_slot.tolist() == [4, 0, 1, 5, 6, 7]  # slot 0's token, then slot 3's in token order
    assert batch.slot_runs == ((0, 0, 1), (3, 1, 6))


def test_lora_batch_of_base_model_tokens_only() -> None:
    batch = LoRABatch.from_token_slots([-1, -1, -1])
    assert batch.segment_starts.tolist() == [0, 3]
    assert batch.segment_slots.tolist() == [-1]
    assert batch.active_slots == ()
    assert not batch.has_lora


def test_lora_batch_empty() -> None:
    batch = LoRABatch.from_token_slots([])
    assert batch.token_slots.shape == (0,)
    assert batch.segment_starts.tolist() == [0]
    assert batch.segment_slots.tolist() == []
    assert batch.active_slots == ()
    assert not batch.has_lora


def test_lora_batch_single_token_segments() -> None:
    batch = LoRABatch.from_token_slots([4, 1, 0, 2])
    assert batch.segment_starts.tolist() == [0, 1, 2, 3, 4]
    assert batch.segment_slots.tolist() == [4, 1, 0, 2]
    assert batch.active_slots == (0, 1, 2, 4)


@given(st.lists(st.integers(-1, 6), max_size=30))
def test_lora_batch_segments_cover_the_tokens(token_slots: list[int]) -> None:
    batch = LoRABatch.from_token_slots(token_slots)
    starts, slots = batch.segment_starts.tolist(), batch.segment_slots.tolist()
    assert starts[0] == 0 and starts[-1] == len(token_slots) and len(starts) == len(slots) + 1
    for i, slot in enumerate(slots):
        assert starts[i] < starts[i + 1]  # no empty segment
        assert token_slots[starts[i] : starts[i + 1]] == [slot] * (starts[i + 1] - starts[i])
        if i:
            assert slots[i - 1] != slot  # maximal segments
    assert batch.active_slots == tuple(sorted({s for s in token_slots if s >= 0}))
    assert batch.has_lora == any(s >= 0 for s in token_slots)
    # The reference's grouping: every token with a slot once, each run holding exactly that slot's tokens.
    by_slot = batch.by_slot.tolist()
    assert sorted(by_slot) == [t for t, s in enumerate(token_slots) if s >= 0]
    assert [slot for slot, _, _ in batch.slot_runs] == list(batch.active_slots)
    for slot, start, end in batch.slot_runs:
        assert by_slot[start:end] == [t for t, s in enumerate(token_slots) if s == slot]
    assert batch.slot_runs[-1][2] == len(by_slot) if batch.slot_runs else by_slot == []
