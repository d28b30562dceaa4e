"""Engine throughput on this machine: base model alone vs a batch spread over N distinct adapters.

Runs the real engine in-process (no HTTP) on the embedded demo model, on `--model DIR`, or on a
random-weight checkpoint of a real model's shape (`--shape llama3-8b`, written to a temporary
directory and loaded through the normal checkpoint loader; the byte tokenizer stands in, and token ids
past it decode to nothing, which costs what a real vocabulary's head costs). Every cell of the matrix
`--adapters` x `--requests` (the batch) x `--prompt-len` (the context) gets the same workload: that many
concurrent greedy requests with that prompt length and `--output-len` generated tokens (EOS ignored).
Adapters are synthetic (random A/B of `--rank` on all seven target modules, the same weights under every
id), so only their cost is measured, not their quality.

    python benchmarks/engine_throughput.py --adapters 0 8 --requests 32
    python benchmarks/engine_throughput.py --shape llama3-8b --adapters 0 1 8 64 --requests 1 64 \
        --prompt-len 1024 8192 --output-len 32 --repeats 1 --budget-s 165

Per cell: prefill tok/s (prompt tokens over the time until every request had its first token), mean time
to first token, decode tok/s (tokens streamed after that moment over the time they took), and both ratios to
the 0-adapter cell of the same batch and context. Cells run cheapest first; with `--budget-s`, a cell that
would end more than that many seconds after the start, set-up included (predicted from the cell before it),
is skipped with every one after it, and the table and the JSON list them as skipped. Prints a table and writes JSON to
benchmarks/results/engine_throughput-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters_store import LoraAdapter, LoraWeight
from server.checkpoint import save_checkpoint
from server.config import Settings
from server.engine import Engine
from server.model import ModelArgs, Transformer
from server.requests import GenerationRequest, SamplingParams
from server.runner_process import ProcessRunner
from server.runtime import build_engine
from server.tokenizer import Tokenizer, build_byte_tokenizer
from server.torch_threads import engine_threads, limit_current_thread

RESULTS = Path(__file__).parent / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {  # real models' shapes (their config.json), for random-weight checkpoints; vocab 128,256 unless given
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=320),
    # many layers of next to no compute: a step's time is its per-layer overhead
    "deep-narrow": dict(dim=64, n_layers=32, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=256,
                        vocab_size=2048),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, intermediate_size=1536,
                         vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=2048),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=8192,
                        rope_theta=500000.0, tie_word_embeddings=True),
    # Llama-3-8B's, and Llama-3.1-8B's but for its longer RoPE
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, intermediate_size=14336,
                      rope_theta=500000.0),
}


def write_random_checkpoint(shape: str, directory: Path, dtype: torch.dtype = torch.bfloat16,
                            tokenizer: Tokenizer | None = None) -> Path:
    """A Hugging Face checkpoint of `shape` with small random weights of `dtype` and `tokenizer` (the byte
    tokenizer unless given)."""
    args = ModelArgs(architecture="LlamaForCausalLM",
                     **(dict(vocab_size=128256, max_position_embeddings=8192) | SHAPES[shape]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.no_grad():
            model = Transformer(args, max_seq_len=args.max_position_embeddings)
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02)
    finally:
        torch.set_default_dtype(previous)
    save_checkpoint(model, directory)
    (tokenizer or build_byte_tokenizer()).save(directory)
    del model
    return directory


def synthetic_adapters(engine: Engine, count: int, rank: int) -> list[LoraAdapter]:
    """`count` adapters of `rank` on every target module, sharing one set of random weights (only their cost
    is measured, and one set keeps 64 adapters of an 8B model quick to build)."""
    args = engine.args
    gen = torch.Generator().manual_seed(0)
    dtype = engine.registry.serving_dtype
    weights = {
        (layer, module): LoraWeight(
            a=(torch.randn(rank, d_in, generator=gen) * 0.02).to(dtype),
            b=(torch.randn(d_out, rank, generator=gen) * 0.02).to(dtype),
            scale=2.0,
        )
        for layer in range(args.n_layers)
        for module, (d_in, d_out) in args.lora_module_dims.items()
    }
    return [LoraAdapter(f"bench-{i}", rank, 2.0 * rank, TARGETS, weights, {"r": rank}) for i in range(count)]


async def run_workload(engine: Engine, adapter_ids: list[str | None], prompt_len: int, output_len: int) -> dict:
    """Submit one request per entry of `adapter_ids` at once; their throughput and first-token times."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    vocab = engine.tokenizer.vocab_size
    token_times: list[list[float]] = [[] for _ in adapter_ids]  # when each request's tokens arrived

    async def one(i: int, adapter_id: str | None) -> None:
        prompt = tuple((7 * i + 3 * j) % (vocab - 8) + 1 for j in range(prompt_len))
        async for delta in engine.submit(GenerationRequest(prompt, params, adapter_id=adapter_id)):
            token_times[i].extend([time.perf_counter()] * len(delta.token_ids))

    steps_before = engine.steps
    start = time.perf_counter()
    await asyncio.gather(*(one(i, a) for i, a in enumerate(adapter_ids)))
    end = time.perf_counter()
    all_first = max(times[0] for times in token_times)  # from here on every request is decoding
    decoded = sum(t > all_first for times in token_times for t in times)
    return {
        "seconds": end - start,
        "output_tokens_per_s": len(adapter_ids) * output_len / (end - start),
        "prefill_tokens_per_s": len(adapter_ids) * prompt_len / (all_first - start),
        "ttft_s": sum(times[0] - start for times in token_times) / len(token_times),
        "decode_tokens_per_s": decoded / (end - all_first) if decoded else None,
        "steps": engine.steps - steps_before,
        "adapter_loads": engine.stats().adapter_loads,
    }


def describe_device(engine: Engine) -> str:
    if engine.device.type == "cuda":
        return torch.cuda.get_device_name(engine.device)
    if isinstance(engine.runner, ProcessRunner):
        return f"cpu ({platform.machine()}, {os.cpu_count()} cores, model runner in a worker process)"
    return f"cpu ({platform.machine()}, engine on {engine_threads(engine.config.engine_threads)} torch threads)"


@dataclass(frozen=True)
class Cell:
    adapters: int
    batch: int
    prompt_len: int

    def cost(self, output_len: int) -> int:
        """Tokens through the model, the unit the budget's predictions scale by."""
        return self.batch * (self.prompt_len + output_len)


def ordered_cells(adapters: list[int], batches: list[int], prompt_lens: list[int], output_len: int) -> list[Cell]:
    """Every cell, cheapest (batch, context) first; within one, the base model first (the ratios' reference)."""
    cells = [Cell(a, b, p) for a in adapters for b in batches for p in prompt_lens]
    return sorted(cells, key=lambda c: (c.cost(output_len), c.batch, c.prompt_len, c.adapters))


def predicted_seconds(cell: Cell, done: list[tuple[Cell, float]], output_len: int) -> float:
    """The last cell's time (`done` holds one at least: the first cell always runs) scaled by tokens."""
    last, seconds = done[-1]
    return seconds * cell.cost(output_len) / last.cost(output_len)


def run_matrix(engine: Engine, args: argparse.Namespace, started: float) -> list[dict]:
    """One row per cell; cells that would end past `--budget-s` after `started` are rows with `skipped` set."""
    rows: list[dict] = []
    done: list[tuple[Cell, float]] = []
    out_of_budget = False
    for cell in ordered_cells(args.adapters, args.requests, args.prompt_len, args.output_len):
        row: dict = {"distinct_adapters": cell.adapters, "batch": cell.batch, "prompt_len": cell.prompt_len}
        elapsed = time.perf_counter() - started
        out_of_budget = out_of_budget or (args.budget_s is not None and bool(done) and
                                          elapsed + predicted_seconds(cell, done, args.output_len) > args.budget_s)
        if out_of_budget:
            rows.append(row | {"skipped": f"over --budget-s {args.budget_s:g}"})
            continue
        ids = [None if cell.adapters == 0 else f"bench-{i % cell.adapters}" for i in range(cell.batch)]
        runs = [asyncio.run(run_workload(engine, ids, cell.prompt_len, args.output_len))
                for _ in range(args.repeats)]
        done.append((cell, sum(r["seconds"] for r in runs)))
        rows.append(row | max(runs, key=lambda r: r["output_tokens_per_s"]))
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Each measured cell's decode and prefill speed over the 0-adapter cell's of the same batch and context."""
    for row in rows:
        base = next((r for r in rows if r["distinct_adapters"] == 0 and "skipped" not in r
                     and (r["batch"], r["prompt_len"]) == (row["batch"], row["prompt_len"])), None)
        if "skipped" in row or base is None:
            continue
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "output_tokens_per_s"):
            ratio_key = key.replace("tokens_per_s", "vs_base")
            row[ratio_key] = None if row[key] is None or base[key] is None else row[key] / base[key]


def print_table(rows: list[dict]) -> None:
    number = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    print(f"{'adapters':>8} {'batch':>5} {'context':>7} {'decode tok/s':>12} {'vs base':>7} {'prefill tok/s':>13} "
          f"{'vs base':>7} {'TTFT s':>7} {'steps':>6} {'seconds':>8}")
    for r in rows:
        cell = f"{r['distinct_adapters']:>8} {r['batch']:>5} {r['prompt_len']:>7}"
        if "skipped" in r:
            print(f"{cell} skipped ({r['skipped']})")
            continue
        print(f"{cell} {number(r['decode_tokens_per_s'], '12.1f')} {number(r.get('decode_vs_base'), '7.2f')} "
              f"{r['prefill_tokens_per_s']:>13.1f} {number(r.get('prefill_vs_base'), '7.2f')} {r['ttft_s']:>7.3f} "
              f"{r['steps']:>6} {r['seconds']:>8.2f}")
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        print(f"skipped {len(skipped)} of {len(rows)} cells, the costliest: {skipped[0]['skipped']}")


def main() -> None:
    # As `lorahive serve` does: this thread never owns an OpenMP team beside the engine's (server/torch_threads.py).
    limit_current_thread()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="serve a random-weight checkpoint of this real model's shape instead of --model")
    parser.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 8], help="distinct adapters per run")
    parser.add_argument("--requests", type=int, nargs="+", default=[32], help="concurrent requests (the batch)")
    parser.add_argument("--prompt-len", type=int, nargs="+", default=[64], help="prompt tokens (the context)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the best is kept")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the cells (costliest last) that would end past this many seconds from the start")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="the server's --enforce-eager: no CUDA graphs of decode steps (to compare with them)")
    args = parser.parse_args()

    started = time.perf_counter()  # the budget counts the set-up too: what a caller's time limit sees
    settings = dict(max_gpu_adapters=max(max(args.adapters), 1), max_lora_rank=args.rank,
                    max_num_seqs=max(args.requests), max_model_len=max(args.prompt_len) + args.output_len,
                    enforce_eager=args.enforce_eager,
                    model_runner_process=False)  # submits in process and reads the runner's model: no HTTP to fend off
    if args.shape is None:
        engine = build_engine(Settings(model=args.model, **settings))
    else:  # the checkpoint (16 GB for 8B) goes once its weights are loaded
        with tempfile.TemporaryDirectory(prefix="lorahive-bench-") as scratch:
            engine = build_engine(Settings(model=write_random_checkpoint(args.shape, Path(scratch)), **settings))
    for adapter in synthetic_adapters(engine, max(args.adapters), args.rank):
        engine.registry.add(adapter)
    engine.start()
    try:
        # Both paths compiled and every adapter resident before any cell, so no cell pays for either.
        asyncio.run(run_workload(engine, [None] + [f"bench-{i}" for i in range(max(args.adapters))], 8, 4))
        rows = run_matrix(engine, args, started)
    finally:
        engine.shutdown()

    device = describe_device(engine)
    model = args.shape or engine.model_name
    steps = "eager" if args.enforce_eager or not engine.runner.can_capture_graphs else "decode CUDA graphs"
    print(f"device: {device}; model: {model}; {args.output_len} output tokens per request, rank {args.rank}; {steps}")
    print_table(rows)
    write_results("engine_throughput", engine, args, device, model, rows)


def write_results(name: str, engine: Engine, args: argparse.Namespace, device: str, model: str, rows) -> None:
    """`rows` as JSON at `args.out`, or benchmarks/results/<name>-<cuda|cpu>[-<shape>].json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if engine.device.type == "cuda" else "cpu"
    out = args.out or RESULTS / f"{name}-{tag}{'-' + args.shape if args.shape else ''}.json"
    out.write_text(json.dumps({"device": device, "model": model, "config": vars(args) | {
        "model": str(args.model), "out": str(out)}, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
