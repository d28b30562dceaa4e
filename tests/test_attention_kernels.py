"""Paged attention: the torch reference against a naive float64 definition, the Triton kernels against both.

The naive definition is the contract written plainly: every sequence's keys gathered position by position
from its block table, a dense explicit mask (causal, queries at the end of the context, window W: key j
visible from position p when j <= p and p - j < W), softmax in float64. Every case scatters the sequences'
blocks over the cache in a random order and poisons with NaN everything a kernel must not read: free blocks,
the slots past a sequence's end in its last block, and the block-table entries past its own blocks (pointed
at a NaN block). Without CUDA the Triton kernels run through the interpreter (TRITON_INTERPRET=1, set before
triton is first imported); the `cuda` parameters run them compiled (marked `gpu`). Interpreter shapes stay
small, and the tests shrink the kernels' blocks so that short sequences still cross every key-block and
query-tile edge.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from benchmarks.paged_cache import random_paged_case  # noqa: E402
from kernels import (  # noqa: E402
    AttentionBatch,
    AttentionShape,
    attention_reference,
    paged_attention,
    resolve_attention_backend,
)
from kernels import attention_triton as ops  # noqa: E402
from tests.support.lora_cases import TOLERANCES  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not ops.INTERPRETED, reason="kernels compiled for the GPU")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
GQA = [pytest.param(group, id=f"gqa{group}") for group in (1, 4, 8)]
HEAD_DIMS = [pytest.param(dim, id=f"d{dim}") for dim in (64, 128)]
WINDOWS = [pytest.param(None, id="full"), pytest.param(5, id="window5")]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16")]
NUM_KV_HEADS = 2

# (context length, new tokens) per sequence. Decode: lengths 1, on both sides of a block edge, long.
DECODE = [(1, 1), (16, 1), (17, 1), (50, 1), (33, 1)]
# A mixed prefill/extend batch: a one-token prompt, decode tokens, whole prompts and chunks on a cached prefix,
# crossing block (16) and query-tile edges.
MIXED = [(1, 1), (17, 17), (45, 12), (33, 1), (16, 16), (40, 3)]


@dataclass
class AttentionCase:
    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [N, P, Hkv, D]
    v_cache: torch.Tensor
    batch: AttentionBatch
    tables: list[list[int]]  # each sequence's own blocks
    window: int | None

    def run_reference(self) -> torch.Tensor:
        return attention_reference.paged_attention(self.q, self.k_cache, self.v_cache, self.batch, self.window)


def make_case(
    gen: torch.Generator,
    seqs: list[tuple[int, int]],
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    window: int | None = None,
    block_size: int = 16,
    device: str = "cpu",
) -> AttentionCase:
    """Random queries and caches; blocks shuffled over the cache with spares; NaN wherever no one may read."""
    case = random_paged_case(gen, seqs, NUM_KV_HEADS * group, NUM_KV_HEADS, head_dim, dtype, block_size,
                             spare_blocks=3, device=device)  # spares: free, one the target of padding entries
    k_cache, v_cache = case.k_cache, case.v_cache
    for free in case.free_blocks:
        k_cache[free] = v_cache[free] = float("nan")
    for (context, _), blocks in zip(seqs, case.tables, strict=True):
        k_cache[blocks[-1], context - (len(blocks) - 1) * block_size :] = float("nan")
        v_cache[blocks[-1], context - (len(blocks) - 1) * block_size :] = float("nan")
    for row, blocks in enumerate(case.tables):  # padding entries name a NaN block: following one shows
        case.batch.block_tables[row, len(blocks) :] = case.free_blocks[-1]
    return AttentionCase(case.q, k_cache, v_cache, case.batch, case.tables, window)


def naive_attention(case: AttentionCase) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(D)) v with a dense explicit mask, keys gathered position by position."""
    block_size = case.k_cache.shape[1]
    group = case.q.shape[1] // case.k_cache.shape[2]
    q = case.q.cpu().double()
    out = torch.empty_like(q)
    starts = case.batch.host_query_starts
    for seq, blocks in enumerate(case.tables):
        context = case.batch.host_context_lens[seq]
        first_query = context - (starts[seq + 1] - starts[seq])
        slots = [(blocks[j // block_size], j % block_size) for j in range(context)]
        k = torch.stack([case.k_cache[b, s] for b, s in slots]).cpu().double().repeat_interleave(group, dim=1)
        v = torch.stack([case.v_cache[b, s] for b, s in slots]).cpu().double().repeat_interleave(group, dim=1)
        query_pos = torch.arange(first_query, context)[:, None]
        key_pos = torch.arange(context)[None, :]
        mask = key_pos <= query_pos
        if case.window is not None:
            mask &= query_pos - key_pos < case.window
        scores = torch.einsum("qhd,khd->hqk", q[starts[seq] : starts[seq + 1]], k) / q.shape[-1] ** 0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[starts[seq] : starts[seq + 1]] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), **TOLERANCES[dtype])


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Key blocks of 16 and query tiles of 16 rows: the short test sequences cross every edge."""
    monkeypatch.setattr(ops, "BLOCK_N", 16)
    monkeypatch.setattr(ops, "PREFILL_ROWS", 16)


# ------------------------------------------------------------------------------------------ reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GQA)
@pytest.mark.parametrize("seqs", [pytest.param(DECODE, id="decode"), pytest.param(MIXED, id="mixed")])
def test_reference_matches_naive(
    torch_gen: torch.Generator, seqs: list, group: int, head_dim: int, window: int | None, dtype: torch.dtype
) -> None:
    case = make_case(torch_gen, seqs, group, head_dim, dtype, window)
    assert_close(case.run_reference(), naive_attention(case), dtype)


def recorded_sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """(batch, queries, keys, mask shape, is_causal) of each SDPA call the reference makes from now on."""
    calls = []
    sdpa = attention_reference.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        assert q.dim() == k.dim() == 4  # 4-D: SDPA's fused CPU kernel, not its math fallback
        mask = None if attn_mask is None else tuple(attn_mask.shape)
        calls.append((q.shape[0], q.shape[2], k.shape[2], mask, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(attention_reference.F, "scaled_dot_product_attention", recording_sdpa)
    return calls


def test_reference_batches_decode_and_masks_only_what_sdpa_needs(torch_gen: torch.Generator,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Neighbouring decode sequences: one SDPA call over their blocks padded to the widest, masked. Prompts: one
    call each over the keys their queries can see, a mask only for a prefix or a window, and then [new tokens,
    keys seen]."""
    calls = recorded_sdpa_calls(monkeypatch)
    seqs = [(1, 1), (40, 1), (17, 17), (45, 12), (20, 1)]
    make_case(torch_gen, seqs, 4, 64, torch.float32).run_reference()
    assert calls == [(2, 1, 48, (2, 1, 1, 48), False), (1, 1, 32, (1, 1, 1, 32), False),
                     (1, 17, 17, None, True), (1, 12, 45, (12, 45), False)]
    calls.clear()
    make_case(torch_gen, seqs, 4, 64, torch.float32, window=5).run_reference()
    # Keys before the window of a prompt's first query are not even gathered.
    assert calls == [(2, 1, 48, (2, 1, 1, 48), False), (1, 1, 32, (1, 1, 1, 32), False),
                     (1, 17, 17, (17, 17), False), (1, 12, 16, (12, 16), False)]


@pytest.mark.parametrize("window", WINDOWS)
def test_decode_groups_stay_within_their_key_budget(torch_gen: torch.Generator, monkeypatch: pytest.MonkeyPatch,
                                                    window: int | None) -> None:
    """With room for 64 padded keys a group holds two 2-block sequences; a 4-block one is a group of its own."""
    monkeypatch.setattr(attention_reference, "DECODE_GROUP_KEYS", 64)
    calls = recorded_sdpa_calls(monkeypatch)
    case = make_case(torch_gen, [(20, 1), (30, 1), (17, 1), (50, 1), (3, 1)], 4, 64, torch.float32, window)
    assert_close(case.run_reference(), naive_attention(case), torch.float32)
    assert [(batch, keys) for batch, _, keys, _, _ in calls] == [(2, 32), (1, 32), (1, 64), (1, 16)]


# --------------------------------------------------------------------------------------------- triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GQA)
@pytest.mark.parametrize("device", DEVICES)
def test_triton_decode_matches_reference(
    torch_gen: torch.Generator, device: str, group: int, head_dim: int, window: int | None, dtype: torch.dtype,
    small_blocks: None,
) -> None:
    case = make_case(torch_gen, DECODE, group, head_dim, dtype, window, device=device)
    expected = case.run_reference()
    for splits in (1, 3):  # 3 splits of a 1- or 5-key window: some splits have no keys at all
        out = ops.decode(case.q, case.k_cache, case.v_cache, case.batch, window, splits=splits)
        assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GQA)
@pytest.mark.parametrize("device", DEVICES)
def test_triton_prefill_matches_reference(
    torch_gen: torch.Generator, device: str, group: int, head_dim: int, window: int | None, dtype: torch.dtype,
    small_blocks: None,
) -> None:
    case = make_case(torch_gen, MIXED, group, head_dim, dtype, window, device=device)
    out = ops.prefill(case.q, case.k_cache, case.v_cache, case.batch, window)
    assert_close(out, case.run_reference(), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_with_default_blocks_and_another_block_size(torch_gen: torch.Generator, device: str) -> None:
    """The blocks the engine launches, on cache blocks of 8 slots; the decode split count left to the kernel."""
    for seqs in (DECODE, MIXED):
        case = make_case(torch_gen, seqs, 4, 64, torch.float32, window=20, block_size=8, device=device)
        out = paged_attention(case.q, case.k_cache, case.v_cache, case.batch, case.window, backend="triton")
        assert_close(out, naive_attention(case), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_splits_at_most_one_per_key_block(torch_gen: torch.Generator, device: str, small_blocks: None) -> None:
    """More splits than the longest context has key blocks: the extra splits are empty and weigh nothing."""
    case = make_case(torch_gen, DECODE, 8, 64, torch.float32, device=device)
    out = ops.decode(case.q, case.k_cache, case.v_cache, case.batch, splits=8)
    assert_close(out, naive_attention(case), torch.float32)


def test_decode_kernel_refuses_a_batch_with_longer_chunks(torch_gen: torch.Generator) -> None:
    case = make_case(torch_gen, MIXED, 1, 64, torch.float32)
    with pytest.raises(ValueError, match="one query per sequence"):
        ops.decode(case.q, case.k_cache, case.v_cache, case.batch)


def test_default_splits_fill_the_gpu_only_where_there_is_one() -> None:
    assert ops.default_splits(1, 8, 8192, torch.device("cpu")) == 1
    if torch.cuda.is_available():
        device = torch.device("cuda")
        assert ops.default_splits(1, 8, 8192, device) > 1  # a batch of one still spreads over the SMs
        assert ops.default_splits(1, 8, 100, device) == 1  # too short to be worth splitting
        assert ops.default_splits(256, 8, 8192, device) == 1


# ------------------------------------------------------------------------------------- metadata, dispatch


def test_prefill_tiles_cut_each_sequence_into_runs() -> None:
    batch = AttentionBatch.from_sequences([[0], [1, 2], [3]], [3, 20, 5], [3, 9, 1])
    assert batch.prefill_tiles(4).tolist() == [[0, 0, 3], [1, 3, 7], [1, 7, 11], [1, 11, 12], [2, 12, 13]]
    assert batch.query_starts.tolist() == [0, 3, 12, 13] and not batch.decode_only
    assert AttentionBatch.from_sequences([[0], [1]], [3, 1], [1, 1]).decode_only


@pytest.mark.parametrize(
    ("tables", "contexts", "queries"),
    [([[0]], [4], [5]), ([[0]], [4], [0]), ([[]], [4], [1]), ([[0], [1]], [4], [1, 1])],
)
def test_metadata_refuses_inconsistent_sequences(tables: list, contexts: list, queries: list) -> None:
    with pytest.raises(ValueError):
        AttentionBatch.from_sequences(tables, contexts, queries)


def test_dispatch_and_backend_setting(torch_gen: torch.Generator) -> None:
    case = make_case(torch_gen, MIXED, 4, 64, torch.float32, window=5)
    expected = case.run_reference()
    for backend in ("torch", "auto"):  # auto: the reference for CPU tensors
        out = paged_attention(case.q, case.k_cache, case.v_cache, case.batch, case.window, backend=backend)
        assert torch.equal(out, expected)
    assert resolve_attention_backend("torch", "cpu") == "torch"
    assert resolve_attention_backend("auto", "cpu") == "torch"
    if ops.INTERPRETED:
        assert resolve_attention_backend("triton", "cpu") == "triton"
    if torch.cuda.is_available():
        assert resolve_attention_backend("auto", "cuda") == "triton"
    with pytest.raises(ValueError, match="--attention-backend"):
        resolve_attention_backend("flash", "cpu")  # type: ignore[arg-type]



@pytest.mark.parametrize("device", DEVICES)
def test_attention_kernels_that_disagree_with_the_reference_never_serve(
    device: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At start the kernels run a decode and a prefill/extend step of the model's shape on the device; a wrong
    answer (or a crash) in either means the torch reference serves, with a warning that says why."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = AttentionShape(n_heads=8, n_kv_heads=2, head_dim=64, block_size=16, window=8)
    assert resolve_attention_backend("triton", device, dtype, shape) == "triton"
    right = ops.paged_attention

    def windowless_prefill(q, k_cache, v_cache, batch, window=None):  # right for decode, wrong past the window
        return right(q, k_cache, v_cache, batch, window if batch.decode_only else None)

    monkeypatch.setattr(ops, "paged_attention", windowless_prefill)
    with caplog.at_level("WARNING", logger="lorahive.kernels"):
        assert resolve_attention_backend("triton", device, dtype, shape) == "torch"
        assert "prefill/extend output differs from the reference" in caplog.text

        def crashing(*args: object) -> None:
            raise RuntimeError("no kernel image is available for execution on the device")

        monkeypatch.setattr(ops, "paged_attention", crashing)
        assert resolve_attention_backend("triton", device, dtype, shape) == "torch"
        assert "the decode kernel failed on a test batch: RuntimeError: no kernel image" in caplog.text


# ------------------------------------------------------------------------------------------- benchmark


def test_attention_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/attention_kernels.py runs end to end (tiny shapes; on a CPU the kernels interpreted)."""
    from benchmarks.attention_kernels import main

    out = tmp_path / "attention_kernels.json"
    result = main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert {row["phase"] for row in result["rows"]} == {"decode", "prefill"}
    assert all(row["triton_s"] > 0 and row["sdpa_s"] > 0 and row["reference_s"] > 0 for row in result["rows"])
    assert all(row["max_abs_error"] < 0.05 for row in result["rows"])
