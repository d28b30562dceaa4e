"""The Triton shrink/expand kernels against the naive float64 per-token loop of tests/support/lora_cases.py.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set here before triton is
first imported); with CUDA the same tests run compiled on the GPU (the `cuda` parameters, marked `gpu`).
The interpreter is slow (about a millisecond per kernel operation), so shapes stay small; a `small_blocks`
variant shrinks the block sizes so that small shapes still cross every block edge (d_in and output blocks,
rank blocks, tile boundaries).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernels import LoRABatch, add_lora, reference, resolve_backend  # noqa: E402
from kernels import triton_ops as ops  # noqa: E402
from kernels.metadata import LARGE_TILE_ROWS, SMALL_TILE_ROWS  # noqa: E402
from kernels.paging import PAGE_RANK, ZERO_PAGE  # noqa: E402
from tests.support.lora_cases import TOLERANCES, LoraCase, make_case, naive_lora, naive_shrink  # noqa: E402

# Half precision: the kernel rounds once (y + fp32 delta), the naive loop not at all.
TOLERANCES = TOLERANCES | {torch.float16: {"rtol": 2e-3, "atol": 4e-3}}
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not ops.INTERPRETED, reason="kernels compiled for the GPU")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float64", "float32", "bfloat16", "float16"]


@pytest.fixture(params=["default-blocks", "small-blocks"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "small-blocks":
        monkeypatch.setattr(ops, "BLOCK_K", 16)
        monkeypatch.setattr(ops, "BLOCK_N", 16)
    return request.param


def poison_padding(case: LoraCase) -> LoraCase:
    """NaN wherever a rank-aware kernel must not read: each slot's page rows past its rank, and the pages its
    page-table entries past its rank name (pointed at a NaN spare page here instead of the zero page).
    A kernel that does more than rank-r work, or follows an entry past the rank, fails loudly."""
    spare = next(p for p in range(1, case.lora_a.shape[0]) if all(p not in case.pages_of(s) for s in range(
        case.table.ranks.shape[0])))
    case.lora_a[spare] = float("nan")
    case.lora_b[spare] = float("nan")
    num_slices = len(case.widths)
    for slot, rank in enumerate(case.table.ranks.tolist()):
        pages = case.pages_of(slot)
        case.table.pages[slot, len(pages):] = spare
        if pages and rank % PAGE_RANK:
            last, used = pages[-1], rank % PAGE_RANK
            for k in range(num_slices):
                case.lora_a[last, k * PAGE_RANK + used : (k + 1) * PAGE_RANK] = float("nan")
            case.lora_b[last, used:] = float("nan")
    return case


def run_triton(case: LoraCase, splits: int | None = None, fixed_shape: bool = False) -> torch.Tensor:
    y = case.y.clone()
    batch = LoRABatch.from_token_slots(case.token_slots, case.x.device, fixed_shape=fixed_shape)
    ops.add_lora(y, case.x, case.lora_a, case.lora_b, batch, case.widths, case.table, splits=splits)
    return y


def assert_matches(case: LoraCase, actual: torch.Tensor) -> None:
    """Close to the naive float64 loop in the case's dtype; rows of slot -1 bit-identical to the input."""
    assert actual.dtype == case.y.dtype and actual.shape == case.y.shape
    torch.testing.assert_close(actual.cpu().double(), naive_lora(case), **TOLERANCES[case.y.dtype])
    untouched = torch.tensor([s < 0 for s in case.token_slots], dtype=torch.bool)
    assert torch.equal(actual.cpu()[untouched], case.y.cpu()[untouched])


# ------------------------------------------------------------------------------------------- add_lora


@pytest.mark.parametrize("device", DEVICES)
def test_all_tokens_in_one_slot(torch_gen: torch.Generator, device: str, blocks: str) -> None:
    # 37 tokens: two full tiles of 16 and a ragged one.
    case = make_case(torch_gen, [2] * 37, num_slots=3, max_rank=8, d_in=40, widths=(24,), device=device)
    assert_matches(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
def test_every_token_in_a_different_slot(torch_gen: torch.Generator, device: str) -> None:
    slots = [5, 0, 3, 6, 1, 4, 2]
    case = make_case(torch_gen, slots, num_slots=7, max_rank=4, d_in=32, widths=(16, 8), device=device)
    assert_matches(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
def test_mix_of_slots_and_no_adapter(torch_gen: torch.Generator, device: str, blocks: str) -> None:
    # Segment boundaries off the tile grid: 3, 17 (a full tile + 1), 1, 2; -1 at both ends and inside.
    slots = [-1, 0, 0, 0, *[2] * 17, -1, -1, 1, 1, 2, 0, -1]
    case = make_case(torch_gen, slots, num_slots=4, max_rank=8, d_in=40, widths=(32, 8, 8), device=device)
    assert_matches(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
def test_base_only_batch_launches_nothing(
    torch_gen: torch.Generator, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = make_case(torch_gen, [-1] * 6, num_slots=2, max_rank=4, d_in=16, widths=(16, 8), device=device)

    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError("a LoRA kernel was launched for a batch without adapter tokens")

    monkeypatch.setattr(ops, "_launch_shrink", no_launch)
    monkeypatch.setattr(ops, "_launch_expand", no_launch)
    for backend in ("triton", "auto"):
        y = case.y.clone()
        add_lora(y, case.x, case.lora_a, case.lora_b, case.batch, case.widths, case.table, backend=backend)
        assert torch.equal(y, case.y)
    assert torch.equal(run_triton(case, fixed_shape=True), case.y)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(torch_gen: torch.Generator, device: str) -> None:
    case = make_case(torch_gen, [], num_slots=2, max_rank=4, d_in=16, widths=(8, 4), device=device)
    assert run_triton(case).shape == (0, 12)
    assert ops.shrink(case.x, case.lora_a, case.batch, case.table).shape == (0, 2 * PAGE_RANK)


@pytest.mark.parametrize("device", DEVICES)
def test_slots_no_token_uses_are_never_read(torch_gen: torch.Generator, device: str) -> None:
    slots = [1, 1, -1, 3, 1]
    case = make_case(torch_gen, slots, num_slots=4, max_rank=4, d_in=24, widths=(16, 8), device=device)
    used = {p for slot in (1, 3) for p in case.pages_of(slot)} | {ZERO_PAGE}
    stale = [p for p in range(case.lora_a.shape[0]) if p not in used]
    case.lora_a[stale] = float("nan")
    case.lora_b[stale] = float("nan")
    assert_matches(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
def test_rank_one_and_max_rank_64(torch_gen: torch.Generator, device: str) -> None:
    # Slot 0 rank 1, slot 1 the pool's max 64, slot 2 rank 3 on q only, slot 3 different ranks per slice.
    ranks = [[1, 1, 1], [64, 64, 64], [3, 0, 0], [2, 64, 17]]
    slots = [0, 0, 1, 1, 1, 2, 3, 3, -1, 0, 2]
    case = make_case(
        torch_gen, slots, num_slots=4, max_rank=64, d_in=48, widths=(32, 16, 16), ranks=ranks, device=device
    )
    assert_matches(case, run_triton(case))


@pytest.mark.parametrize("device", DEVICES)
def test_rank_aware_kernels_never_read_past_a_slots_rank(
    torch_gen: torch.Generator, device: str, blocks: str
) -> None:
    """A rank-r adapter in a max-rank-64 pool: nothing past rank r (here NaN) is ever loaded."""
    ranks = [[8, 8], [1, 0], [17, 5], [64, 64]]
    slots = [0, 0, 0, 1, 2, 2, -1, 3, 0]
    case = make_case(torch_gen, slots, num_slots=4, max_rank=64, d_in=40, widths=(24, 8), ranks=ranks, device=device)
    assert_matches(case, run_triton(poison_padding(case)))


@pytest.mark.parametrize("device", DEVICES)
def test_odd_dimensions(torch_gen: torch.Generator, device: str, blocks: str) -> None:
    slots = [0, 1, -1, 1, 0, 0, 1]
    case = make_case(torch_gen, slots, num_slots=2, max_rank=3, d_in=33, widths=(17,), device=device)
    assert_matches(case, run_triton(case))


@pytest.mark.parametrize(
    "widths",
    [
        pytest.param((17,), id="one-slice"),
        pytest.param((40, 24), id="gate-up"),
        pytest.param((32, 8, 8), id="gqa-qkv"),
        pytest.param((9, 23, 1), id="odd-qkv"),
        pytest.param((5, 3, 7, 2), id="four-slices"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_slices_of_different_widths(
    torch_gen: torch.Generator, device: str, widths: tuple[int, ...], blocks: str
) -> None:
    slots = [0, 0, 0, 2, 2, -1, 1, 0]
    case = make_case(torch_gen, slots, num_slots=3, max_rank=4, d_in=20, widths=widths, device=device)
    assert_matches(case, run_triton(case))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_dtypes(torch_gen: torch.Generator, device: str, dtype: torch.dtype) -> None:
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the server never runs float64 on a GPU; auto dispatch keeps it on the reference")
    slots = [0, 0, 1, -1, 2, 2, 2, 1, -1, 0]
    ranks = [[8, 8, 8], [2, 2, 2], [5, 0, 8]]
    case = make_case(
        torch_gen, slots, num_slots=3, max_rank=8, d_in=64, widths=(32, 16, 16), ranks=ranks, dtype=dtype,
        device=device,
    )
    y = run_triton(case)
    assert_matches(case, y)
    if dtype == torch.float64:  # fp64 in, fp64 accumulation: as exact as the reference
        torch.testing.assert_close(y, naive_lora(case).to(device), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_split_d_in_partials_add_up(torch_gen: torch.Generator, device: str, splits: int, blocks: str) -> None:
    """d_in split over programs (small decode batches): the expand sums the shrink's partials."""
    slots = [3, 1, 0, -1, 2, 2]
    case = make_case(torch_gen, slots, num_slots=4, max_rank=8, d_in=70, widths=(24, 8, 8), device=device)
    assert_matches(case, run_triton(poison_padding(case), splits=splits))


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_sized_step_uses_large_tiles(torch_gen: torch.Generator, device: str) -> None:
    slots = [1] * 150 + [-1] * 20 + [0] * 90 + [2] + [1] * 40  # 301 tokens: tiles of 64
    case = make_case(torch_gen, slots, num_slots=3, max_rank=4, d_in=24, widths=(16, 8), device=device)
    assert case.batch.tile_rows == LARGE_TILE_ROWS
    assert_matches(case, run_triton(poison_padding(case)))


# ---------------------------------------------------------------------- decode metadata (CUDA graphs)


def test_fixed_shape_tiles_depend_only_on_the_token_count() -> None:
    for slots in ([0] * 8, [0, 1, 2, 3, 4, 5, 6, 7], [-1] * 8, [3, 3, -1, 1, 1, 1, 0, -1]):
        batch = LoRABatch.from_token_slots(slots, fixed_shape=True)
        assert batch.tiles.shape == (8, 3) and batch.tiles.dtype == torch.int32
        assert batch.tile_rows == SMALL_TILE_ROWS
    batch = LoRABatch.from_token_slots([3, 3, -1, 1, 1, 1, 0, -1], fixed_shape=True)
    assert batch.tiles.tolist() == [[0, 2, 3], [3, 6, 1], [6, 7, 0]] + [[0, 0, -1]] * 5


@pytest.mark.parametrize("device", DEVICES)
def test_padded_decode_metadata_gives_the_same_result(torch_gen: torch.Generator, device: str) -> None:
    slots = [0, 0, 0, 4, -1, 1, 1, 3, 2, 2]
    case = make_case(torch_gen, slots, num_slots=5, max_rank=8, d_in=24, widths=(16, 8), device=device)
    assert_matches(case, run_triton(poison_padding(case), fixed_shape=True))


@pytest.mark.gpu
def test_cuda_graph_replay_with_a_different_adapter_mix(torch_gen: torch.Generator) -> None:
    """Captured with 2 adapters in the batch, replayed with 8 distinct ones: every delta is applied."""
    widths, slots_at_capture, slots_at_replay = (64, 16, 16), [0] * 4 + [1] * 4, [7, 6, 5, 4, 3, 2, 1, 0]
    capture = make_case(torch_gen, slots_at_capture, num_slots=8, max_rank=16, d_in=64, widths=widths,
                        dtype=torch.bfloat16, device="cuda")
    replay = make_case(torch_gen, slots_at_replay, num_slots=8, max_rank=16, d_in=64, widths=widths,
                       dtype=torch.bfloat16, device="cuda")
    batch = LoRABatch.from_token_slots(slots_at_capture, "cuda", fixed_shape=True)
    x, y = capture.x.clone(), capture.y.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and fill the caches outside the capture
        ops.add_lora(y.clone(), x, replay.lora_a, replay.lora_b, batch, widths, replay.table)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.add_lora(y, x, replay.lora_a, replay.lora_b, batch, widths, replay.table)
    x.copy_(replay.x)
    y.copy_(replay.y)
    batch.tiles.copy_(LoRABatch.from_token_slots(slots_at_replay, "cuda", fixed_shape=True).tiles)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(replay, y)


# ------------------------------------------------------------------------------------- shrink / expand


@pytest.mark.parametrize("device", DEVICES)
def test_shrink_then_expand_match_naive(torch_gen: torch.Generator, device: str, blocks: str) -> None:
    slots = [1, 1, -1, 0, 2, 2, -1]
    ranks = [[4, 1, 4], [4, 4, 4], [2, 3, 0]]
    case = make_case(
        torch_gen, slots, num_slots=3, max_rank=4, d_in=24, widths=(16, 8, 8), ranks=ranks, device=device
    )
    batch = case.batch
    for splits in (1, 2):
        v = ops.shrink(case.x, case.lora_a, batch, case.table, splits=splits)
        assert v.shape == (len(slots), 3 * PAGE_RANK) and v.dtype == torch.float64
        torch.testing.assert_close(v.cpu(), naive_shrink(case), **TOLERANCES[torch.float64])
        assert torch.count_nonzero(v.cpu()[torch.tensor(slots) < 0]) == 0
    y = case.y.clone()
    ops.expand(y, v, case.lora_b, batch, case.widths, case.table)
    assert_matches(case, y)
    y = case.y.clone()  # the Triton expand of the reference's v
    ops.expand(y, reference.shrink(case.x, case.lora_a, batch, case.table), case.lora_b, batch, case.widths, case.table)
    assert_matches(case, y)


@pytest.mark.parametrize("device", DEVICES)
def test_shrink_of_half_inputs_is_fp32(torch_gen: torch.Generator, device: str) -> None:
    slots = [0, 0, 1, -1]
    case = make_case(torch_gen, slots, num_slots=2, max_rank=4, d_in=32, widths=(8,), dtype=torch.bfloat16,
                     device=device)
    v = ops.shrink(case.x, case.lora_a, case.batch, case.table)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v.cpu().double(), naive_shrink(case), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ property


@st.composite
def kernel_cases(draw: st.DrawFn) -> dict:
    num_slots = draw(st.integers(1, 5))
    max_rank = draw(st.integers(1, 40))
    num_tokens = draw(st.integers(0, 40))
    widths = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
    return {
        "seed": draw(st.integers(0, 2**32 - 1)),
        "token_slots": draw(st.lists(st.integers(-1, num_slots - 1), min_size=num_tokens, max_size=num_tokens)),
        "num_slots": num_slots,
        "max_rank": max_rank,
        "d_in": draw(st.integers(1, 72)),
        "widths": widths,
        "ranks": draw(st.lists(st.lists(st.integers(0, max_rank), min_size=len(widths), max_size=len(widths)),
                               min_size=num_slots, max_size=num_slots)),
        "poison": draw(st.booleans()),
        "splits": draw(st.sampled_from([None, 1, 2, 3])),
        "fixed_shape": draw(st.booleans()),
        "block": draw(st.sampled_from([16, 32])),
        "dtype": draw(st.sampled_from([torch.float64, torch.float32])),
    }


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=kernel_cases())
def test_add_lora_matches_naive_on_any_shape(device: str, params: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "BLOCK_K", params["block"])
    monkeypatch.setattr(ops, "BLOCK_N", params["block"])
    gen = torch.Generator().manual_seed(params["seed"])
    case = make_case(gen, params["token_slots"], params["num_slots"], params["max_rank"], params["d_in"],
                     params["widths"], ranks=params["ranks"], dtype=params["dtype"], device=device)
    if params["poison"]:
        poison_padding(case)
    assert_matches(case, run_triton(case, params["splits"], params["fixed_shape"]))


# ------------------------------------------------------------------------------------------ dispatch


def test_resolve_backend() -> None:
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"
    if ops.INTERPRETED:
        assert resolve_backend("triton", "cpu") == "triton"
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            resolve_backend("triton", "cpu")
    if torch.cuda.is_available():
        assert resolve_backend("auto", "cuda") == "triton"
    with pytest.raises(ValueError):
        resolve_backend("cuda-magic", "cpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_that_disagree_with_the_reference_never_serve(
    device: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At start the kernels compute a test batch on the device; a wrong answer (or a crash) means torch serves."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    assert resolve_backend("triton", device, dtype) == "triton"
    right = ops.add_lora

    def doubled(y: torch.Tensor, *args: object) -> None:  # a kernel that adds its delta twice
        before = y.clone()
        right(y, *args)
        y += y - before

    monkeypatch.setattr(ops, "add_lora", doubled)
    with caplog.at_level("WARNING", logger="lorahive.kernels"):
        assert resolve_backend("triton", device, dtype) == "torch"
    assert "differs from the reference" in caplog.text

    def crashing(*args: object) -> None:
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(ops, "add_lora", crashing)
    assert resolve_backend("triton", device, dtype) == "torch"
    assert "no kernel image" in caplog.text


def test_lora_backend_setting_from_flag_and_environment() -> None:
    from argparse import Namespace

    from server.cli import settings_from

    assert settings_from(Namespace(), {}).lora_backend == "auto"
    assert settings_from(Namespace(), {"LORAHIVE_LORA_BACKEND": "triton"}).lora_backend == "triton"
    assert settings_from(Namespace(lora_backend="torch"), {"LORAHIVE_LORA_BACKEND": "triton"}).lora_backend == "torch"


# ------------------------------------------------------------------------------------------ end to end


def test_engine_with_triton_backend_matches_torch_backend() -> None:
    """The demo engine with the Triton path forced on (the interpreter here) decodes the same greedy tokens.

    A mixed batch: two adapters of different ranks and target subsets and a base-model request, prefill
    and then fixed-shape decode steps. Kept short because every kernel runs interpreted on the CPU; with
    compiled kernels both engines run on the GPU (in float32, so their greedy tokens agree).
    """
    from server.demo import build_demo_model
    from tests.support.engines import ADAPTER_SPECS, assert_idle, generate, greedy, make_adapter, prompt, start_engine

    args = build_demo_model()[0].args
    adapters = {
        adapter_id: make_adapter(adapter_id, args, *ADAPTER_SPECS[adapter_id], seed=100 + i)
        for i, adapter_id in enumerate(["a1", "a2"])
    }
    requests = [greedy(prompt(70 + i, 4 + i), 3, adapter, ignore_eos=True) for i, adapter in
                enumerate(["a2", None, "a1"])]
    outputs = {}
    for backend in ("torch", "triton"):
        engine = start_engine(adapters, lora_backend=backend, device="cpu" if ops.INTERPRETED else "cuda")
        try:
            assert engine.runner.model.lora.backend == backend
            outputs[backend] = [[c.token_ids for c in choices] for choices in generate(engine, requests)]
            assert_idle(engine)
            # The runner published each resident adapter's rank for the kernels (a1: 4, a2: 16).
            assert sorted(r for r in engine.runner.table.ranks.tolist() if r) == [4, 16]
        finally:
            engine.shutdown()
    assert outputs["triton"] == outputs["torch"]
    assert all(len(tokens) == 3 for choices in outputs["torch"] for tokens in choices)


# ------------------------------------------------------------------------------------------- benchmark


def test_kernel_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/lora_kernels.py runs end to end (tiny shapes; torch paths on a CPU) and writes its JSON."""
    from benchmarks.lora_kernels import main

    out = tmp_path / "lora_kernels.json"
    result = main(["--smoke", "--projections", "qkv", "--mixes", "distinct", "identical", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert {(r["phase"], r["mix"]) for r in result["rows"]} == {
        (phase, mix) for phase in ("decode", "prefill") for mix in ("distinct", "identical")
    }
    assert all(r["kernel_s"] > 0 and r["min_bytes"] > 0 for r in result["rows"])
    assert len(result["rank_aware"]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_kernels_launch_on_the_tensors_own_gpu(torch_gen: torch.Generator) -> None:
    """`--device cuda:1`: the launches go to cuda:1 although the current device stays cuda:0."""
    case = make_case(torch_gen, [0, 1, 1, -1], num_slots=2, max_rank=16, d_in=64, widths=(32, 16),
                     dtype=torch.bfloat16, device="cuda:1")
    assert torch.cuda.current_device() == 0
    assert_matches(case, run_triton(case))
