"""Engine throughput on this machine: base model alone vs a batch spread over N distinct adapters.

Runs the real engine in-process (no HTTP) on the embedded demo model, on `--model DIR`, or on a
random-weight checkpoint of a real model's shape (`--shape llama3.2-1b`, written to a temporary
directory and loaded through the normal checkpoint loader; the byte tokenizer stands in, and token ids
past it decode to nothing, which costs what a real vocabulary's head costs). Every
configuration gets the same workload: `--requests` concurrent greedy requests with the same prompt
length and `--output-len` generated tokens (EOS ignored). Adapters are synthetic (random A/B of
`--rank` on all seven target modules), so only their cost is measured, not their quality.

    python benchmarks/engine_throughput.py --adapters 0 8 --requests 32

Prints a table and writes JSON to benchmarks/results/engine_throughput-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from adapters_store import LoraAdapter, LoraWeight
from server.checkpoint import save_checkpoint
from server.config import Settings
from server.engine import Engine
from server.model import ModelArgs, Transformer
from server.requests import GenerationRequest, SamplingParams
from server.runtime import build_engine
from server.tokenizer import build_byte_tokenizer

RESULTS = Path(__file__).parent / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {  # real models' shapes (their config.json), for random-weight checkpoints
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=8192,
                        rope_theta=500000.0, tie_word_embeddings=True),
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, intermediate_size=14336,
                      rope_theta=500000.0),
}


def write_random_checkpoint(shape: str, directory: Path) -> Path:
    """A Hugging Face checkpoint of `shape` with small random bf16 weights and the byte tokenizer."""
    args = ModelArgs(architecture="LlamaForCausalLM", vocab_size=128256, max_position_embeddings=8192,
                     **SHAPES[shape])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
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
    build_byte_tokenizer().save(directory)
    del model
    return directory


def synthetic_adapter(engine: Engine, adapter_id: str, rank: int, seed: int) -> LoraAdapter:
    args = engine.model.args
    gen = torch.Generator().manual_seed(seed)
    weights = {
        (layer, module): LoraWeight(
            a=torch.randn(rank, d_in, generator=gen) * 0.02,
            b=torch.randn(d_out, rank, generator=gen) * 0.02,
            scale=2.0,
        )
        for layer in range(args.n_layers)
        for module, (d_in, d_out) in args.lora_module_dims.items()
    }
    return LoraAdapter(adapter_id, rank, 2.0 * rank, TARGETS, weights, {"r": rank})


async def run_workload(engine: Engine, adapter_ids: list[str | None], prompt_len: int, output_len: int) -> dict:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    vocab = engine.tokenizer.vocab_size

    async def one(i: int, adapter_id: str | None) -> None:
        prompt = tuple((7 * i + 3 * j) % (vocab - 8) + 1 for j in range(prompt_len))
        async for _ in engine.submit(GenerationRequest(prompt, params, adapter_id=adapter_id)):
            pass

    steps_before = engine.steps
    start = time.perf_counter()
    await asyncio.gather(*(one(i, a) for i, a in enumerate(adapter_ids)))
    elapsed = time.perf_counter() - start
    generated = len(adapter_ids) * output_len
    return {
        "seconds": elapsed,
        "output_tokens_per_s": generated / elapsed,
        "steps": engine.steps - steps_before,
        "adapter_loads": engine.stats().adapter_loads,
    }


def describe_device(engine: Engine) -> str:
    if engine.device.type == "cuda":
        return torch.cuda.get_device_name(engine.device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="serve a random-weight checkpoint of this real model's shape instead of --model")
    parser.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 8], help="distinct adapters per run")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; the best is kept")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()

    slots = max(max(args.adapters), 1)
    if args.shape is not None:
        args.model = write_random_checkpoint(args.shape, Path(tempfile.mkdtemp(prefix="lorahive-bench-")))
    engine = build_engine(Settings(model=args.model, max_gpu_adapters=slots, max_lora_rank=args.rank,
                                   max_num_seqs=args.requests))
    for i in range(max(args.adapters)):
        engine.registry.add(synthetic_adapter(engine, f"bench-{i}", args.rank, seed=i))
    engine.start()
    rows = []
    try:
        asyncio.run(run_workload(engine, [None] * 4, 8, 4))  # warm-up
        for count in args.adapters:
            ids = [None if count == 0 else f"bench-{i % count}" for i in range(args.requests)]
            runs = [asyncio.run(run_workload(engine, ids, args.prompt_len, args.output_len))
                    for _ in range(args.repeats)]
            best = max(runs, key=lambda r: r["output_tokens_per_s"])
            rows.append({"distinct_adapters": count, **best})
    finally:
        engine.shutdown()

    base = next((r for r in rows if r["distinct_adapters"] == 0), rows[0])
    device = describe_device(engine)
    model = args.shape or engine.model_name
    print(f"device: {device}; model: {model}; {args.requests} requests x {args.output_len} tokens, "
          f"prompt {args.prompt_len}, rank {args.rank}")
    print(f"{'adapters':>8} {'tok/s':>10} {'vs base':>8} {'steps':>6} {'seconds':>8}")
    for r in rows:
        r["ratio_to_base"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
        print(f"{r['distinct_adapters']:>8} {r['output_tokens_per_s']:>10.1f} {r['ratio_to_base']:>8.2f} "
              f"{r['steps']:>6} {r['seconds']:>8.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if engine.device.type == "cuda" else "cpu"
    out = args.out or RESULTS / f"engine_throughput-{tag}{'-' + args.shape if args.shape else ''}.json"
    out.write_text(json.dumps({"device": device, "model": model, "config": vars(args) | {
        "model": str(args.model), "out": str(out)}, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
