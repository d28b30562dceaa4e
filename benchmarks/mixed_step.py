"""A decode step of many distinct adapters against a step of a single adapter, timed in one process on the CPU.

Issue 17 asks that a batch of many distinct adapters cost about what a batch of one adapter does. The end-to-end
sweep (`adapter_scale.py`) moves by 0.1-0.2 between runs on a 2-core machine; this script isolates the step. It
builds the demo model (fp32, as a CPU server serves it) and one model runner without pages (a CPU server's) per
adapter count, `--batch` sequences of a 16-token prompt each, the sequences spread round-robin over that many
rank-8 adapters on `--target-modules`; prefills them, then times decode steps of every runner in alternated
rounds, so that the machine's drift falls on every count alike. Reported per count: the median decode step, its
ratio to the first count's, and the median of the step's LoRA calls replayed on their own, each replay with the
step's per-step caches cleared, as a step finds them (`kernels.reference.add_lora`: the cost model, the stack
placement and the gather index are in it; the batch's adapters are in the stack, as in a step whose batch kept its
adapters).

    PYTHONPATH=$PWD python benchmarks/mixed_step.py                       # 1 vs 32 adapters, all modules
    PYTHONPATH=$PWD python benchmarks/mixed_step.py --target-modules q_proj,v_proj --label qv
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from adapters_store import TARGET_MODULES
from kernels import reference
from server.adapter_packer import AdapterPacker
from server.adapter_pool import AdapterSlotPool
from server.demo import build_demo_model
from server.model_runner import ModelRunner, adapter_page_bytes
from server.scheduler import Sequence
from server.torch_threads import default_threads
from tests.support.engines import make_adapter, prompt
from tests.support.runner_steps import sequence, step_all

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_TOKENS = 16
DECODE_STEPS = 5  # per round and count; the sequences are rewound after each round


def build(adapters: int, batch: int, targets: tuple[str, ...]) -> tuple[ModelRunner, list[Sequence]]:
    """A runner holding `adapters` rank-8 adapters and `batch` prefilled sequences spread over them."""
    model = build_demo_model()[0].to(torch.float32)
    pool = AdapterSlotPool(max(adapters, 1), 16, adapter_page_bytes(model), paged=False, max_bytes=2**34)
    runner = ModelRunner(model, num_kv_blocks=2 * batch + 2, block_size=16, num_slots=pool.num_slots, max_rank=16,
                         num_pages=0, paged=False)
    packer = AdapterPacker(torch.float32)
    slots = [pool.acquire(i, packer.pack(make_adapter(f"a{i}", model.args, 8, 16.0, targets, seed=i, std=0.05)))
             for i in range(adapters)]
    for write in pool.take_writes():
        runner.apply(write)
    seqs = [sequence(i, prompt(i + 1, PROMPT_TOKENS), slots[i % adapters]) for i in range(batch)]
    step_all(runner, seqs)  # the prefill
    return runner, seqs


def rewind(seqs: list[Sequence]) -> None:
    """Back to just after the prefill: the next steps decode the same positions again."""
    for seq in seqs:
        del seq.token_ids[PROMPT_TOKENS + 1 :]
        seq.num_computed = PROMPT_TOKENS
        del seq.sampler.output_ids[1:]


def time_decode(runner: ModelRunner, seqs: list[Sequence]) -> float:
    """Milliseconds per decode step, over DECODE_STEPS steps."""
    rewind(seqs)
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        step_all(runner, seqs)
    return (time.perf_counter() - start) / DECODE_STEPS * 1e3


def lora_calls(runner: ModelRunner, seqs: list[Sequence]) -> list[tuple[tuple, dict]]:
    """The `add_lora` calls of one decode step, with their arguments (the step's LoRA batch among them)."""
    rewind(seqs)
    calls = []
    add_lora = reference.add_lora

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return add_lora(*args, **kwargs)

    reference.add_lora = record
    try:
        step_all(runner, seqs)
    finally:
        reference.add_lora = add_lora
    return calls


def time_replay(calls: list[tuple[tuple, dict]]) -> float:
    """Milliseconds the recorded calls take, their batch's per-step caches cleared first."""
    calls[0][0][4].cache.clear()  # every call of a step reads one LoRA batch (add_lora's fifth argument)
    start = time.perf_counter()
    for args, kwargs in calls:
        reference.add_lora(*args, **kwargs)
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", default="1,32", help="distinct adapter counts; ratios are to the first")
    parser.add_argument("--batch", type=int, default=32, help="sequences decoding together")
    parser.add_argument("--target-modules", default="all", help="comma-separated modules, or all")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--label", default="all-modules", help="names the JSON: results/mixed_step-cpu-LABEL.json")
    parser.add_argument("--out", type=Path, help="write the JSON here instead")
    args = parser.parse_args(argv)
    default_threads()
    counts = [int(count) for count in args.adapters.split(",")]
    targets = TARGET_MODULES if args.target_modules == "all" else tuple(args.target_modules.split(","))
    setups = {count: build(count, args.batch, targets) for count in counts}
    recorded = {count: lora_calls(*setups[count]) for count in counts}
    steps: dict[int, list[float]] = {count: [] for count in counts}
    replays: dict[int, list[float]] = {count: [] for count in counts}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for count in counts:
                steps[count].append(time_decode(*setups[count]))
                replays[count].append(time_replay(recorded[count]))
    first = statistics.median(steps[counts[0]])
    rows = [{"adapters": count, "step_ms": statistics.median(steps[count]),
             "step_vs_first": statistics.median(steps[count]) / first,
             "lora_calls_ms": statistics.median(replays[count]), "lora_calls": len(recorded[count])}
            for count in counts]
    print(f"| distinct adapters | decode step ms (vs {counts[0]}) | its LoRA calls ms (calls) |")
    print("| ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['adapters']} | {row['step_ms']:.2f} ({row['step_vs_first']:.2f}) | "
              f"{row['lora_calls_ms']:.2f} ({row['lora_calls']}) |")
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "batch": args.batch,
              "target_modules": list(targets), "rounds": args.rounds, "rows": rows}
    out = args.out or RESULTS / f"mixed_step-cpu-{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
