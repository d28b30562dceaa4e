"""LoRA shrink + expand of one layer: the Triton kernels against two torch baselines, on real model shapes.

For the projections of Llama-3-8B and Llama-2-70B (fused q|k|v, o, fused gate|up, down), adapter ranks
8/16/64 in a pool of max rank 64, decode batches of 1-256 tokens and prefill steps of 2k-8k tokens (sequences
of `--prefill-seq-len` tokens), and Punica's four adapter popularity mixes over the batch's sequences:

    distinct   every sequence its own adapter
    uniform    ceil(sqrt(n)) adapters, each sequence picks one uniformly
    skewed     Zipf(alpha=1.5) over n adapters
    identical  one adapter for all

each row prints the time of one shrink + expand (the step's metadata is built once per step and shared by
every layer, so it is not timed), the bytes the work must move at least (x, the adapters' own A and B rows,
v, y read and written), the achieved GB/s and its share of this device's measured copy bandwidth, and the
same work done by two torch baselines in the same process: a loop over the batch's adapters (how HF PEFT
serves a mixed batch) and gather + bmm (per-token copies of the weights, then batched GEMVs). Both
baselines use each adapter's own rank. The L2 cache is flushed before every timed call, as a real forward
pass, whose other layers evict it, would see. A second table compares rank-8 adapters in a max-rank-64
pool with the same adapters in a max-rank-8 pool (rank-aware work).

    python benchmarks/lora_kernels.py                     # full grid, needs a CUDA GPU and triton
    python benchmarks/lora_kernels.py --models llama3-8b --ranks 16 --decode 64 --prefill
    python benchmarks/lora_kernels.py --smoke             # tiny shapes; on a CPU: torch paths only

Targets (issue 3), checked and printed at the end on a GPU: decode shrink+expand >= 70% of copy bandwidth
for distinct at batch >= 64; distinct within 1.5x of identical at batch 64; >= 3x faster than gather+bmm
and >= 10x faster than the loop for distinct at batch 64 rank 16; rank 8 in a rank-64 pool within 1.3x of
a rank-8 pool. On a CPU the numbers say nothing about those targets: GPU numbers need a GPU.

Writes JSON to benchmarks/results/lora_kernels-<device>.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import LoRABatch, PageTable, add_lora, resolve_backend
from kernels.paging import pack_dense

RESULTS = Path(__file__).parent / "results"
MIXES = ("distinct", "uniform", "skewed", "identical")


@dataclass(frozen=True)
class Shape:
    dim: int
    q_out: int
    kv_out: int
    hidden: int

    def projections(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """name -> (d_in, fused output widths), as the model fuses them."""
        return {
            "qkv": (self.dim, (self.q_out, self.kv_out, self.kv_out)),
            "o": (self.q_out, (self.dim,)),
            "gate_up": (self.dim, (self.hidden, self.hidden)),
            "down": (self.hidden, (self.dim,)),
        }


MODELS = {
    "llama3-8b": Shape(dim=4096, q_out=4096, kv_out=1024, hidden=14336),
    "llama2-70b": Shape(dim=8192, q_out=8192, kv_out=1024, hidden=28672),
    "tiny": Shape(dim=256, q_out=256, kv_out=64, hidden=512),  # --smoke
}


# ---------------------------------------------------------------------------------------- workloads


def adapters_of(mix: str, num_seqs: int, rng: random.Random) -> list[int]:
    """Adapter index (= slot) of each sequence, sorted as the step builder lays the batch out."""
    if mix == "distinct":
        slots = list(range(num_seqs))
    elif mix == "uniform":
        slots = [rng.randrange(math.ceil(math.sqrt(num_seqs))) for _ in range(num_seqs)]
    elif mix == "skewed":
        weights = [k**-1.5 for k in range(1, num_seqs + 1)]
        slots = rng.choices(range(num_seqs), weights=weights, k=num_seqs)
    elif mix == "identical":
        slots = [0] * num_seqs
    else:
        raise ValueError(mix)
    return sorted(slots)


@dataclass
class Workload:
    x: torch.Tensor
    y: torch.Tensor
    lora_a: torch.Tensor  # dense per slot [S, K * R, d_in], for the torch baselines
    lora_b: torch.Tensor  # [S, sum(widths), R]
    pages: tuple[torch.Tensor, torch.Tensor, PageTable]  # the same weights as the server lays them out
    batch: LoRABatch
    widths: tuple[int, ...]
    rank: int
    slots: list[int]  # per token

    @property
    def distinct(self) -> list[int]:
        return sorted(set(self.slots))

    def min_bytes(self) -> int:
        """x read, each present adapter's own A rows and B columns, v written and read (fp32), y read + written."""
        tokens, d_in = self.x.shape
        n_out, k = sum(self.widths), len(self.widths)
        elt = self.x.element_size()
        weights = len(self.distinct) * (k * self.rank * d_in + n_out * self.rank) * elt
        return tokens * d_in * elt + weights + 2 * tokens * k * self.rank * 4 + 2 * tokens * n_out * elt


def make_workload(
    d_in: int, widths: tuple[int, ...], rank: int, pool_rank: int, seq_slots: list[int], seq_len: int,
    dtype: torch.dtype, device: torch.device, decode: bool,
) -> Workload:
    gen = torch.Generator(device).manual_seed(0)
    num_slots = max(seq_slots) + 1
    k = len(widths)
    lora_a = torch.zeros(num_slots, k * pool_rank, d_in, dtype=dtype, device=device)
    lora_b = torch.zeros(num_slots, sum(widths), pool_rank, dtype=dtype, device=device)
    for i in range(k):
        lora_a[:, i * pool_rank : i * pool_rank + rank].normal_(0, d_in**-0.5, generator=gen)
    lora_b[:, :, :rank].normal_(0, rank**-0.5, generator=gen)
    slots = [s for s in seq_slots for _ in range(seq_len)]
    return Workload(
        x=torch.randn(len(slots), d_in, generator=gen, device=device).to(dtype),
        y=torch.randn(len(slots), sum(widths), generator=gen, device=device).to(dtype),
        lora_a=lora_a,
        lora_b=lora_b,
        pages=pack_dense(lora_a, lora_b, widths, ranks=[rank] * num_slots),
        batch=LoRABatch.from_token_slots(slots, device, fixed_shape=decode),
        widths=widths,
        rank=rank,
        slots=slots,
    )


# ---------------------------------------------------------------------------------------- the contenders


def run_kernel(w: Workload, backend: str) -> None:
    pages_a, pages_b, table = w.pages
    add_lora(w.y, w.x, pages_a, pages_b, w.batch, w.widths, table, backend)


def run_loop(w: Workload) -> None:
    """PEFT's mixed batch: for each adapter, its tokens through its own A and B (own rank), scattered back."""
    pool_rank = w.lora_b.shape[2]
    token_slots = w.batch.token_slots
    for slot in w.distinct:
        rows = (token_slots == slot).nonzero().squeeze(1)
        x = w.x.index_select(0, rows)
        delta = torch.empty(len(rows), sum(w.widths), dtype=w.y.dtype, device=w.y.device)
        offset = 0
        for k, width in enumerate(w.widths):
            a = w.lora_a[slot, k * pool_rank : k * pool_rank + w.rank]
            b = w.lora_b[slot, offset : offset + width, : w.rank]
            delta[:, offset : offset + width] = (x @ a.T) @ b.T
            offset += width
        w.y.index_add_(0, rows, delta)


def gather_bytes(w: Workload) -> int:
    tokens, d_in = w.x.shape
    return tokens * w.rank * (len(w.widths) * d_in + sum(w.widths)) * w.x.element_size()


def run_gather_bmm(w: Workload) -> None:
    """Per-token copies of the token's A and B (own rank), then one batched GEMV per slice."""
    pool_rank = w.lora_b.shape[2]
    k = len(w.widths)
    a = w.lora_a.view(w.lora_a.shape[0], k, pool_rank, -1)[:, :, : w.rank]  # [S, K, r, d_in]
    a_tok = a[w.batch.token_slots].flatten(1, 2)  # [T, K*r, d_in]
    v = torch.bmm(a_tok, w.x.unsqueeze(2))  # [T, K*r, 1]
    b_tok = w.lora_b[w.batch.token_slots][:, :, : w.rank]  # [T, N, r]
    offset = 0
    for i, width in enumerate(w.widths):
        v_k = v[:, i * w.rank : (i + 1) * w.rank]
        w.y[:, offset : offset + width] += torch.bmm(b_tok[:, offset : offset + width], v_k).squeeze(2)
        offset += width


# --------------------------------------------------------------------------------------------- timing


class Timer:
    """Median time of `fn` in seconds; on CUDA with CUDA events and the L2 cache flushed before each call."""

    def __init__(self, device: torch.device, reps: int):
        self.device = device
        self.reps = reps
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn: Callable[[], None]) -> float:
        fn()  # warm-up (and Triton compilation)
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start_s = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start_s)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    numel = (2**30 if device.type == "cuda" else 2**26) // 2  # 2 GiB moved on a GPU, 128 MiB on a CPU
    x = torch.empty(numel, dtype=torch.float16, device=device)
    x.fill_(1.0)
    seconds = timer(lambda: torch.empty_like(x).copy_(x))
    return 2 * x.numel() * x.element_size() / seconds


def describe(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "cpu"


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama3-8b", "llama2-70b"], choices=list(MODELS))
    parser.add_argument("--projections", nargs="+", default=["qkv", "o", "gate_up", "down"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--pool-rank", type=int, default=64, help="the pool's max rank (--max-lora-rank)")
    parser.add_argument("--decode", type=int, nargs="*", default=[1, 8, 32, 64, 128, 256], help="decode batches")
    parser.add_argument("--prefill", type=int, nargs="*", default=[2048, 4096, 8192], help="prefill tokens")
    parser.add_argument("--prefill-seq-len", type=int, default=512, help="tokens per prefilling sequence")
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=MIXES)
    parser.add_argument("--rank-aware-batch", type=int, default=64, help="decode batch of the rank-aware table")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--max-gather-gib", type=float, default=8.0, help="skip gather+bmm above this footprint")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few reps: checks the script runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.ranks, args.pool_rank, args.decode, args.prefill = ["tiny"], [8], 16, [1, 8], [64]
        args.prefill_seq_len, args.reps, args.rank_aware_batch = 16, 2, 8
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    backend = resolve_backend("auto", device)
    device_name, device_tag = describe(device)
    timer = Timer(device, args.reps)
    bandwidth = copy_bandwidth(device, timer)
    print(f"device: {device_name}; LoRA kernels: {backend}; copy bandwidth {bandwidth / 1e9:.0f} GB/s; {args.dtype}")
    if device.type != "cuda":
        print("NOTE: no GPU here. The kernel column is the torch reference on the CPU; these numbers say nothing "
              "about the GPU targets. Run this script on a CUDA machine for them.")
    rng = random.Random(0)

    rows = []
    header = (f"{'model':>10} {'proj':>7} {'rank':>4} {'phase':>7} {'tokens':>6} {'mix':>9} {'adapters':>8} "
              f"{'kernel us':>10} {'MB':>8} {'GB/s':>7} {'%copy':>6} {'loop us':>10} {'x':>6} {'gather us':>10} "
              f"{'x':>6}")
    print(header)
    for model in args.models:
        for proj in args.projections:
            d_in, widths = MODELS[model].projections()[proj]
            for rank in args.ranks:
                steps = [("decode", n, 1) for n in args.decode]
                steps += [("prefill", n // args.prefill_seq_len, args.prefill_seq_len) for n in args.prefill]
                for phase, num_seqs, seq_len in steps:
                    for mix in args.mixes:
                        seq_slots = adapters_of(mix, num_seqs, rng)
                        w = make_workload(d_in, widths, rank, args.pool_rank, seq_slots, seq_len, dtype, device,
                                          decode=phase == "decode")
                        kernel_s = timer(lambda w=w: run_kernel(w, backend))
                        loop_s = timer(lambda w=w: run_loop(w))
                        fits = gather_bytes(w) <= args.max_gather_gib * 2**30
                        gather_s = timer(lambda w=w: run_gather_bmm(w)) if fits else None
                        moved = w.min_bytes()
                        row = {
                            "model": model, "projection": proj, "d_in": d_in, "widths": list(widths), "rank": rank,
                            "pool_rank": args.pool_rank, "phase": phase, "tokens": len(w.slots), "mix": mix,
                            "adapters": len(w.distinct), "kernel_s": kernel_s, "min_bytes": moved,
                            "gb_per_s": moved / kernel_s / 1e9, "copy_fraction": moved / kernel_s / bandwidth,
                            "loop_s": loop_s, "gather_bmm_s": gather_s,
                        }
                        rows.append(row)
                        gather = f"{gather_s * 1e6:>10.1f} {gather_s / kernel_s:>6.1f}" if gather_s else (
                            f"{'skipped':>10} {'':>6}")
                        print(f"{model:>10} {proj:>7} {rank:>4} {phase:>7} {len(w.slots):>6} {mix:>9} "
                              f"{len(w.distinct):>8} {kernel_s * 1e6:>10.1f} {moved / 1e6:>8.2f} "
                              f"{row['gb_per_s']:>7.0f} {row['copy_fraction']:>6.0%} {loop_s * 1e6:>10.1f} "
                              f"{loop_s / kernel_s:>6.1f} {gather}")
                        del w

    print(f"\nrank-aware: rank-8 adapters, distinct, decode batch {args.rank_aware_batch}: pool of max rank "
          f"{args.pool_rank} vs pool of max rank 8")
    rank_aware = []
    for model in args.models:
        for proj in args.projections:
            d_in, widths = MODELS[model].projections()[proj]
            seq_slots = adapters_of("distinct", args.rank_aware_batch, rng)
            times = {}
            for pool_rank in (args.pool_rank, 8):
                w = make_workload(d_in, widths, 8, pool_rank, seq_slots, 1, dtype, device, decode=True)
                times[pool_rank] = timer(lambda w=w: run_kernel(w, backend))
            ratio = times[args.pool_rank] / times[8]
            rank_aware.append({"model": model, "projection": proj, "big_pool_s": times[args.pool_rank],
                               "rank8_pool_s": times[8], "ratio": ratio})
            print(f"{model:>10} {proj:>7}  {times[args.pool_rank] * 1e6:>8.1f} us vs {times[8] * 1e6:>8.1f} us: "
                  f"{ratio:.2f}x")

    targets = check_targets(rows, rank_aware) if device.type == "cuda" else {}
    for name, (value, ok) in targets.items():
        print(f"target {name}: {value} -> {'met' if ok else 'MISSED'}")
    out = args.out or RESULTS / f"lora_kernels-{device_tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": device_name, "backend": backend, "dtype": args.dtype, "copy_bandwidth_bytes_per_s": bandwidth,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows, "rank_aware": rank_aware,
        "targets": {name: {"value": value, "met": ok} for name, (value, ok) in targets.items()},
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


def check_targets(rows: list[dict], rank_aware: list[dict]) -> dict[str, tuple[str, bool]]:
    """The issue's targets, from whatever part of the grid was run."""
    def pick(**match: object) -> list[dict]:
        return [r for r in rows if all(r[k] == v for k, v in match.items())]

    targets: dict[str, tuple[str, bool]] = {}
    big = [r for r in pick(phase="decode", mix="distinct") if r["tokens"] >= 64]
    if big:
        worst = min(r["copy_fraction"] for r in big)
        targets["decode distinct batch>=64 copy bandwidth >= 70% (worst)"] = (f"{worst:.0%}", worst >= 0.7)
    ratios = []
    for r in pick(phase="decode", mix="distinct", tokens=64):
        same = pick(phase="decode", mix="identical", tokens=64, model=r["model"], projection=r["projection"],
                    rank=r["rank"])
        ratios += [r["kernel_s"] / s["kernel_s"] for s in same]
    if ratios:
        targets["distinct / identical at batch 64 <= 1.5 (worst)"] = (f"{max(ratios):.2f}", max(ratios) <= 1.5)
    r16 = pick(phase="decode", mix="distinct", tokens=64, rank=16)
    gathers = [r["gather_bmm_s"] / r["kernel_s"] for r in r16 if r["gather_bmm_s"]]
    if gathers:
        targets["vs gather+bmm, distinct batch 64 rank 16 >= 3x (worst)"] = (f"{min(gathers):.1f}x", min(gathers) >= 3)
    if r16:
        loops = [r["loop_s"] / r["kernel_s"] for r in r16]
        targets["vs adapter loop, distinct batch 64 rank 16 >= 10x (worst)"] = (f"{min(loops):.1f}x", min(loops) >= 10)
    if rank_aware:
        worst = max(r["ratio"] for r in rank_aware)
        targets["rank 8 in big pool / rank-8 pool <= 1.3 (worst)"] = (f"{worst:.2f}", worst <= 1.3)
    return targets


if __name__ == "__main__":
    main()
