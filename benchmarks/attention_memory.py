"""Per-step temporaries of attention against batch x context, before and after paged attention (CPU).

Each row is one engine step at one attention layer of a small-head model (4 query heads over 2 KV heads,
head_dim 64, fp32, cache blocks of 16), run two ways on the same cache and queries:

    before   the dense path the model used until paged attention, kept here as the baseline (`dense_groups`,
             `dense_attention`: a compact copy of the old server/step_builder.py and Attention.forward). Per
             step: one attention group of every decode plus one group per prefill chunk, each with a [B, Lk]
             gather index and a [B, 1, Lq, Lk] boolean mask. Per layer: every sequence's whole KV history
             gathered into padded dense [B, Lk, Hkv, D] copies and one masked SDPA per group.
    after    what the model runs now: the step's `AttentionBatch` (block tables, context lengths, query
             offsets) and `kernels.paged_attention` with the torch reference (the backend a CPU serves with):
             neighbouring decodes gathered together, padded, up to DECODE_GROUP_KEYS keys a group, and one
             SDPA per group; per prompt chunk, the keys its queries can see and one SDPA. (On CUDA the Triton
             kernels read the blocks in place and allocate only the output and the decode's split partials.)

Steps: "decode" is B sequences of `context` tokens, one new token each; "prefill" is B - 1 of those decodes
plus one chunk of 256 new tokens on a cached prefix (context - 256 tokens), in one step.

peak MiB   the most bytes of CPU allocations live at once while the step's metadata is built and one layer's
           attention runs (the metadata stays alive for every layer), from the torch profiler's memory events
           (allocations and frees in time order); the cache and queries exist before and are not counted
ms         median wall time of one layer's attention (metadata prebuilt); the metadata's own build time is
           in the JSON (once per step, shared by all layers)

    python benchmarks/attention_memory.py            # batches 1, 8, 64 x contexts 512, 2048, 8192; a few minutes
    python benchmarks/attention_memory.py --smoke    # tiny shapes: checks the script runs

Writes JSON to benchmarks/results/attention_memory-cpu.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.attention_kernels import MODELS
from benchmarks.lora_kernels import RESULTS, Timer, describe
from benchmarks.paged_cache import PagedCase, random_paged_case
from kernels import AttentionBatch, paged_attention
from server.memory_profile import peak_bytes_of

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Chunk:
    """One sequence's part of a step: its blocks, the tokens already cached, the tokens fed now."""

    blocks: list[int]
    num_computed: int
    num_tokens: int


# ----------------------------------------------------------------------------- baseline: the old dense path


@dataclass
class DenseGroup:
    query_index: torch.Tensor  # [B, Lq] row of each query in the step (padding: row 0)
    query_valid: torch.Tensor  # [B, Lq]
    kv_index: torch.Tensor  # [B, Lk] flat cache slot of every key position (padding: slot 0)
    mask: torch.Tensor  # [B, 1, Lq, Lk] True where the query may see the key


def _dense_group(chunks: list[Chunk], first_rows: list[int], window: int | None) -> DenseGroup:
    q_lens = [c.num_tokens for c in chunks]
    kv_lens = [c.num_computed + c.num_tokens for c in chunks]
    q_offsets = torch.arange(max(q_lens))
    query_valid = q_offsets[None, :] < torch.tensor(q_lens)[:, None]
    query_index = torch.where(query_valid, torch.tensor(first_rows)[:, None] + q_offsets[None, :], 0)
    q_pos = torch.tensor([c.num_computed for c in chunks])[:, None] + q_offsets[None, :]
    k_pos = torch.arange(max(kv_lens))[None, None, :]
    mask = k_pos <= q_pos[:, :, None]
    if window is not None:
        mask &= q_pos[:, :, None] - k_pos < window
    mask |= ~query_valid[:, :, None] & (k_pos == 0)
    max_blocks = -(-max(kv_lens) // BLOCK_SIZE)
    table = torch.zeros(len(chunks), max_blocks, dtype=torch.int64)
    for b, c in enumerate(chunks):
        table[b, : len(c.blocks[:max_blocks])] = torch.tensor(c.blocks[:max_blocks])
    positions = torch.arange(max(kv_lens))
    kv_index = table[:, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    kv_index[positions[None, :] >= torch.tensor(kv_lens)[:, None]] = 0
    return DenseGroup(query_index, query_valid, kv_index, mask[:, None])


def dense_groups(chunks: list[Chunk], window: int | None) -> list[DenseGroup]:
    """Baseline step metadata: all decodes in one padded group, each prefill chunk in its own."""
    first_rows = [sum(c.num_tokens for c in chunks[:i]) for i in range(len(chunks))]
    decodes = [i for i, c in enumerate(chunks) if c.num_tokens == 1]
    groups = [_dense_group([chunks[i] for i in decodes], [first_rows[i] for i in decodes], window)] if decodes else []
    groups += [_dense_group([c], [first_rows[i]], window) for i, c in enumerate(chunks) if c.num_tokens > 1]
    return groups


def dense_attention(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                    groups: list[DenseGroup]) -> torch.Tensor:
    """Baseline layer: gather every group's whole KV history into dense tensors, one masked SDPA per group."""
    out = torch.empty_like(q)
    for group in groups:
        qg = q[group.query_index].transpose(1, 2)
        kg = k_flat[group.kv_index].transpose(1, 2)
        vg = v_flat[group.kv_index].transpose(1, 2)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=group.mask, enable_gqa=True)
        out[group.query_index[group.query_valid]] = og.transpose(1, 2)[group.query_valid]
    return out


# --------------------------------------------------------------------------------------- the paged path


def paged_metadata(chunks: list[Chunk]) -> AttentionBatch:
    return AttentionBatch.from_sequences([c.blocks for c in chunks], [c.num_computed + c.num_tokens for c in chunks],
                                         [c.num_tokens for c in chunks])


# ------------------------------------------------------------------------------------------ measurement


def step_chunks(case: PagedCase, seqs: list[tuple[int, int]]) -> list[Chunk]:
    return [Chunk(blocks, context - new, new) for blocks, (context, new) in zip(case.tables, seqs, strict=True)]


def measure(phase: str, batch: int, context: int, chunk: int, window: int | None, timer: Timer,
            gen: torch.Generator) -> dict:
    shape = MODELS["tiny"]
    seqs = [(context, 1)] * batch if phase == "decode" else [(context, 1)] * (batch - 1) + [(context, chunk)]
    case = random_paged_case(gen, seqs, shape.n_heads, shape.n_kv_heads, shape.head_dim, torch.float32, BLOCK_SIZE)
    chunks = step_chunks(case, seqs)
    k_flat, v_flat = case.k_cache.flatten(0, 1), case.v_cache.flatten(0, 1)

    def before() -> torch.Tensor:
        return dense_attention(case.q, k_flat, v_flat, dense_groups(chunks, window))

    def after() -> torch.Tensor:
        return paged_attention(case.q, case.k_cache, case.v_cache, paged_metadata(chunks), window, "torch")

    groups, metadata = dense_groups(chunks, window), paged_metadata(chunks)
    error = (before() - after()).abs().max().item()
    device = case.k_cache.device
    row = {"phase": phase, "batch": batch, "context": context, "new_tokens": sum(n for _, n in seqs),
           "before_peak_bytes": peak_bytes_of(before, device), "after_peak_bytes": peak_bytes_of(after, device),
           "before_layer_s": timer(lambda: dense_attention(case.q, k_flat, v_flat, groups)),
           "after_layer_s": timer(lambda: paged_attention(case.q, case.k_cache, case.v_cache, metadata, window,
                                                          "torch")),
           "before_metadata_s": timer(lambda: dense_groups(chunks, window)),
           "after_metadata_s": timer(lambda: paged_metadata(chunks)),
           "max_abs_difference": error}
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64])
    parser.add_argument("--contexts", type=int, nargs="*", default=[512, 2048, 8192])
    parser.add_argument("--chunk", type=int, default=256, help="new tokens of the prefill chunk")
    parser.add_argument("--window", type=int, default=None, help="sliding window (default: none, as Llama)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); "
                        "1 keeps a machine shared with other jobs from stalling the timings")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few reps: checks the script runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.contexts, args.chunk, args.reps = [1, 3], [40], 8, 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    device_name, device_tag = describe(device)
    timer = Timer(device, args.reps)
    gen = torch.Generator().manual_seed(0)
    print(f"device: {device_name}; tiny {MODELS['tiny']}; float32; cache blocks of {BLOCK_SIZE}; "
          f"prefill chunk {args.chunk}; window {args.window}")
    print(f"{'phase':>7} {'batch':>5} {'context':>7} {'before MiB':>10} {'after MiB':>9} {'ratio':>7} "
          f"{'before ms':>9} {'after ms':>8}")
    rows = []
    started = time.perf_counter()
    for phase in ("decode", "prefill"):
        for batch in args.batches:
            for context in args.contexts:
                with warnings.catch_warnings():  # SDPA's notes on which kernel a CPU run cannot use
                    warnings.simplefilter("ignore")
                    row = measure(phase, batch, context, args.chunk, args.window, timer, gen)
                rows.append(row)
                before, after = row["before_peak_bytes"], row["after_peak_bytes"]
                print(f"{phase:>7} {batch:>5} {context:>7} {before / 2**20:>10.2f} {after / 2**20:>9.2f} "
                      f"{before / max(after, 1):>6.1f}x {row['before_layer_s'] * 1e3:>9.2f} "
                      f"{row['after_layer_s'] * 1e3:>8.2f}")
    out_path = args.out or RESULTS / f"attention_memory-{device_tag}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name, "model": "tiny", "dtype": "float32", "block_size": BLOCK_SIZE,
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "seconds": time.perf_counter() - started, "rows": rows}
    out_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
