"""Decode throughput of each kind of PEFT adapter, and of a batch mixing them, against LoRA alone and the base model.

Runs the real engine in-process on the embedded demo model, `--model DIR`, or a random-weight checkpoint of a real
model's shape (`--shape`, as benchmarks/engine_throughput.py). Adapters are the load tester's synthetic ones
(`loadtest.synthetic_adapters`: PEFT's files of each kind, random weights), uploaded through the registry as an
upload is: `--adapters` distinct adapters of each kind. Every workload is `--requests` concurrent greedy requests
of `--prompt-len` prompt and `--output-len` generated tokens, spread over its adapters in turn:

  base     no adapter                       dora     DoRA (rank --rank, every target module)
  lora     LoRA (rank --rank, every module)  ia3      IA3 (PEFT's Llama default: k, v, down)
  prompt   prompt tuning (8 virtual tokens)  mixed    LoRA, DoRA, IA3, prompt and base requests in one batch

Two measurements, workloads alternating within each of `--repeats` rounds (this machine is shared and noisy), the
median kept: decode steps timed straight on the model runner (`--steps` decode steps of the batch, from the same
point each round: the step's cost alone, the precise one), then the workloads through the engine (its thread,
scheduler and streams: what a client sees). Prints decode tok/s and each workload's ratio to LoRA's and to the
base model's, and writes JSON to benchmarks/results/peft_kinds-<device>.json.

    PYTHONPATH=. python benchmarks/peft_kinds.py
    PYTHONPATH=. python benchmarks/peft_kinds.py --shape llama3-8b --requests 64 --prompt-len 256 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.engine_throughput import (
    SHAPES,
    describe_device,
    run_workload,
    write_random_checkpoint,
    write_results,
)
from loadtest.synthetic_adapters import AdapterSpec, BaseDims, adapter_files
from server.config import Settings
from server.engine import Engine
from server.requests import SamplingParams
from server.runtime import build_engine
from server.sampling import SamplerState
from server.scheduler import Sequence
from server.torch_threads import limit_current_thread
from tests.support.runner_steps import step_all

KINDS = ("lora", "dora", "ia3", "prompt")
WORKLOADS = ("base", "lora", "dora", "ia3", "prompt", "mixed")


def provision(engine: Engine, count: int, rank: int) -> dict[str, list[str]]:
    """`count` adapters of every kind, uploaded through the registry; their ids by kind."""
    args = engine.args
    dims = BaseDims(hidden_size=args.dim, intermediate_size=args.intermediate_size, num_layers=args.n_layers,
                    num_heads=args.n_heads, num_kv_heads=args.n_kv_heads, head_dim=args.head_dim)
    ids: dict[str, list[str]] = {}
    for kind in KINDS:
        spec = AdapterSpec(rank=rank, kind=kind, dtype="float32")
        ids[kind] = [f"{kind}-{i}" for i in range(count)]
        for i, adapter_id in enumerate(ids[kind]):
            engine.registry.create(adapter_id, *adapter_files(dims, spec, seed=i), public=True)
    return ids


def workload_adapters(workload: str, ids: dict[str, list[str]], requests: int) -> list[str | None]:
    """Each request's adapter: the workload's adapters in turn."""
    if workload == "base":
        pool: list[str | None] = [None]
    elif workload == "mixed":
        pool = [None, *(adapter for kind in KINDS for adapter in ids[kind])]
    else:
        pool = list(ids[workload])
    return [pool[i % len(pool)] for i in range(requests)]


def measure_engine(engine: Engine, ids: dict[str, list[str]], args: argparse.Namespace) -> dict[str, dict]:
    """Each workload through the running engine: decode tok/s once every request has its first token."""
    runs: dict[str, list[dict]] = {w: [] for w in WORKLOADS}
    for _ in range(args.repeats):
        for workload in WORKLOADS:
            adapters = workload_adapters(workload, ids, args.requests)
            runs[workload].append(asyncio.run(run_workload(engine, adapters, args.prompt_len, args.output_len)))
    return with_ratios({workload: [r["decode_tokens_per_s"] for r in results] for workload, results in runs.items()})


def measure_steps(engine: Engine, ids: dict[str, list[str]], args: argparse.Namespace) -> dict[str, dict]:
    """Each workload's decode steps on the model runner (the engine not started): its batch prefilled once, then
    `args.steps` decode steps timed from the same point every round."""
    runner = engine.runner
    slots = {}
    for adapter_id in (adapter for kind in KINDS for adapter in ids[kind]):
        version = engine.registry.version(adapter_id)
        slots[adapter_id] = engine.pool.acquire(version, version.weights)
    for write in engine.pool.take_writes():
        runner.apply(write)
    batches = {}
    for workload in WORKLOADS:
        seqs = [_sequence(engine, i, slots, adapter, args) for i, adapter in
                enumerate(workload_adapters(workload, ids, args.requests))]
        step_all(runner, seqs)  # the prefill
        batches[workload] = (seqs, [(list(seq.token_ids), seq.num_computed) for seq in seqs])
    runs: dict[str, list[float]] = {w: [] for w in WORKLOADS}
    for _ in range(args.repeats):
        for workload, (seqs, prefilled) in batches.items():
            for seq, (tokens, computed) in zip(seqs, prefilled, strict=True):  # greedy: nothing else to rewind
                seq.token_ids[:], seq.num_computed = tokens, computed
            start = time.perf_counter()
            for _ in range(args.steps):
                step_all(runner, seqs)
            runs[workload].append(args.steps * len(seqs) / (time.perf_counter() - start))
    for slot in slots.values():
        engine.pool.release(slot)
    return with_ratios(runs)


def _sequence(engine: Engine, index: int, slots: dict[str, int], adapter: str | None,
              args: argparse.Namespace) -> Sequence:
    """A greedy sequence on `adapter`'s slot, in KV blocks of its own."""
    virtual = engine.registry.version(adapter).manifest.num_virtual_tokens if adapter else 0
    prompt = [(7 * index + 3 * j) % (engine.tokenizer.vocab_size - 8) + 1 for j in range(args.prompt_len)]
    tokens = [0] * virtual + prompt
    per_seq = -(-(len(tokens) + args.steps + 1) // engine.config.block_size)
    params = SamplingParams(max_tokens=args.steps + 1, temperature=0.0, ignore_eos=True)
    return Sequence(index, f"bench-{index}", 0, tokens, len(tokens), None, SamplerState(params, torch.Generator()),
                    None, blocks=list(range(index * per_seq, (index + 1) * per_seq)),
                    slot=-1 if adapter is None else slots[adapter], num_virtual_tokens=virtual)


def with_ratios(runs: dict[str, list[float]]) -> dict[str, dict]:
    """Per workload: the median decode tok/s of its runs, the runs, and the ratios to LoRA's and the base model's."""
    rows = {workload: {"decode_tokens_per_s": statistics.median(values), "runs": values}
            for workload, values in runs.items()}
    for row in rows.values():
        row["vs_lora"] = row["decode_tokens_per_s"] / rows["lora"]["decode_tokens_per_s"]
        row["vs_base"] = row["decode_tokens_per_s"] / rows["base"]["decode_tokens_per_s"]
    return rows


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(title)
    print(f"{'workload':>9} {'decode tok/s':>13} {'vs LoRA':>8} {'vs base':>8}  runs (tok/s)")
    for workload, row in rows.items():
        runs = ", ".join(f"{r:.0f}" for r in row["runs"])
        print(f"{workload:>9} {row['decode_tokens_per_s']:13.0f} {row['vs_lora']:8.2f} {row['vs_base']:8.2f}  {runs}")


def main() -> None:
    limit_current_thread()  # as `lorahive serve` does (server/torch_threads.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--adapters", type=int, default=4, help="distinct adapters of each kind")
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests (the batch)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per round on the model runner")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    context = args.prompt_len + max(args.output_len, args.steps + 1) + 16  # + the soft prompts' virtual tokens
    settings = dict(max_gpu_adapters=4 * args.adapters, max_lora_rank=args.rank, max_num_seqs=args.requests,
                    max_model_len=context, model_runner_process=False,
                    kv_cache_tokens=args.requests * (context + 32))  # a sequence's blocks round up
    if args.shape is None:
        engine = build_engine(Settings(model=args.model, **settings))
    else:
        with tempfile.TemporaryDirectory(prefix="lorahive-bench-") as scratch:
            engine = build_engine(Settings(model=write_random_checkpoint(args.shape, Path(scratch)), **settings))
    ids = provision(engine, args.adapters, args.rank)
    started = time.perf_counter()
    rows = {"steps": measure_steps(engine, ids, args)}
    engine.start()
    try:
        # Every path compiled and every adapter resident before the first measured run.
        asyncio.run(run_workload(engine, workload_adapters("mixed", ids, 4 * args.adapters + 1), 8, 4))
        rows["engine"] = measure_engine(engine, ids, args)
    finally:
        engine.shutdown()
    seconds = time.perf_counter() - started

    device = describe_device(engine)
    model = args.shape or engine.model_name
    print(f"device: {device}; model: {model}; {args.requests} requests x {args.output_len} tokens, prompt "
          f"{args.prompt_len}, {args.adapters} adapters of each kind, rank {args.rank}; {seconds:.0f} s")
    print_table(f"decode steps on the model runner ({args.steps} a round):", rows["steps"])
    print_table("through the engine:", rows["engine"])
    write_results("peft_kinds", engine, args, device, model, rows)


if __name__ == "__main__":
    main()
