"""The torch reference's three ways of adding LoRA deltas, timed against each other, and the one `lora_path` picks.

`kernels.reference.add_lora` runs a layer's LoRA adapter by adapter, all at once (every token against every
page), or gathered (every token reading its own adapter's rows of a stack kept for the layers of one shape),
choosing by a cost model whose free constants are `FLOPS_PER_OP`, the flops a torch op's dispatch is worth, and
`GATHERED_FLOPS_FACTOR`, how much dearer a flop of the gathered way is than one of a GEMM. This script times each way on
layer shapes of SmolLM2-135M (4 adapters, ranks 8/16/32/64 on every slice), of the deep-narrow benchmark model (8
rank-16 adapters), of a 1B-class attention (8 rank-16 adapters) and of the demo model (32 rank-8 adapters, as
issue 17's many-adapter traffic mixes them), at several tokens per adapter, and reports, per
pair of candidate constants, how many microseconds the model's choices lose against the fastest way (its "excess").
The constants in `kernels/reference.py` are the pair with the least excess here.

    PYTHONPATH=. python benchmarks/lora_paths.py            # table, and JSON in benchmarks/results/
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kernels import add_lora, reference
from tests.support.lora_cases import LoraCase, make_case

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("adapter", "dense", "gathered")
SHAPES = {  # name: (d_in, fused slice widths, adapters' ranks)
    "smollm2 qkv": (576, (576, 192, 192), (8, 16, 32, 64)),
    "smollm2 gate_up": (576, (1536, 1536), (8, 16, 32, 64)),
    "smollm2 down": (1536, (576,), (8, 16, 32, 64)),
    "deep-narrow qkv": (64, (64, 32, 32), (16,) * 8),
    "deep-narrow gate_up": (64, (256, 256), (16,) * 8),
    "deep-narrow down": (256, (64,), (16,) * 8),
    "1b qkv": (2048, (2048, 512, 512), (16,) * 8),
    "demo qkv": (256, (256, 128, 128), (8,) * 32),
    "demo down": (688, (256,), (8,) * 32),
}
CANDIDATES = (50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000)
GATHERED_CANDIDATES = (1.0, 1.5, 2.0, 2.5, 3.0)


def time_us(run: Callable[[], None], repeats: int) -> float:
    for _ in range(5):
        run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats * 1e6


def time_paths(case: LoraCase, repeats: int) -> tuple[dict[str, float], tuple]:
    """Microseconds per `add_lora` call of `case`, each way forced; and the arguments `lora_path` decides on."""
    batch, targets, y = case.batch, case.targets(with_weights=True), case.y.clone()
    choose = reference.lora_path
    micros = {}
    try:
        for path in PATHS:
            reference.lora_path = lambda *args, path=path: path
            micros[path] = time_us(lambda: add_lora(y, case.x, case.lora_a, case.lora_b, batch, case.widths,
                                                    case.table, targets=targets), repeats)
    finally:
        reference.lora_path = choose
    return micros, (batch, case.table, case.x.shape[1], case.widths, targets)


def measure(repeats: int, tokens_per_adapter: tuple[int, ...]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (d_in, widths, ranks) in SHAPES.items():
        for per in tokens_per_adapter:
            slots = [slot for slot in range(len(ranks)) for _ in range(per)]
            case = make_case(gen, slots, num_slots=len(ranks), max_rank=max(ranks), d_in=d_in, widths=widths,
                             ranks=[[rank] * len(widths) for rank in ranks], dtype=torch.float32)
            micros, arguments = time_paths(case, repeats)
            rows.append({"shape": name, "tokens": len(slots), "us": micros, "case": arguments})
    return rows


def chosen_path(row: dict) -> str:
    """The way `lora_path` picks for the row's call, decided afresh (it caches its choice on the step's batch)."""
    batch, *rest = row["case"]
    return reference.lora_path(dataclasses.replace(batch, cache={}), *rest)


def excess_by_constants(rows: list[dict]) -> dict[tuple[int, float], float]:
    """Per candidate (FLOPS_PER_OP, GATHERED_FLOPS_FACTOR): microseconds its choices lose against the fastest way,
    summed over the rows."""
    kept = reference.FLOPS_PER_OP, reference.GATHERED_FLOPS_FACTOR
    excess = {}
    try:
        for constants in itertools.product(CANDIDATES, GATHERED_CANDIDATES):
            reference.FLOPS_PER_OP, reference.GATHERED_FLOPS_FACTOR = constants
            excess[constants] = sum(row["us"][chosen_path(row)] - min(row["us"].values()) for row in rows)
    finally:
        reference.FLOPS_PER_OP, reference.GATHERED_FLOPS_FACTOR = kept
    return excess


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--tokens-per-adapter", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--out", type=Path, default=RESULTS / "lora_paths-cpu.json")
    args = parser.parse_args(argv)
    rows = measure(args.repeats, tuple(args.tokens_per_adapter))
    chosen = {id(row): chosen_path(row) for row in rows}
    print(f"torch reference, {torch.get_num_threads()} threads; microseconds per add_lora call "
          f"(FLOPS_PER_OP {reference.FLOPS_PER_OP:,})")
    print(f"{'layer':<20} {'tokens':>6} " + " ".join(f"{p:>9}" for p in PATHS) + f" {'chosen':>9} {'fastest':>9}")
    for row in rows:
        fastest = min(row["us"], key=row["us"].get)
        print(f"{row['shape']:<20} {row['tokens']:>6} " + " ".join(f"{row['us'][p]:>9.0f}" for p in PATHS)
              + f" {chosen[id(row)]:>9} {fastest:>9}")
    excess = excess_by_constants(rows)
    print("\nmicroseconds lost against the fastest way over all rows, per FLOPS_PER_OP (rows) and "
          "GATHERED_FLOPS_FACTOR (columns):")
    print(" " * 11 + "".join(f"{factor:>8}" for factor in GATHERED_CANDIDATES))
    for constant in CANDIDATES:
        print(f"  {constant:>9,}" + "".join(f"{excess[constant, factor]:>8.0f}" for factor in GATHERED_CANDIDATES))
    result = {
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
        "flops_per_op": reference.FLOPS_PER_OP,
        "gathered_flops_factor": reference.GATHERED_FLOPS_FACTOR,
        "rows": [{"shape": r["shape"], "tokens": r["tokens"], "us": r["us"], "chosen": chosen[id(r)]} for r in rows],
        "excess_us_by_flops_per_op_and_gathered_factor": {f"{c},{g}": us for (c, g), us in excess.items()},
        "config": vars(args) | {"out": str(args.out)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
