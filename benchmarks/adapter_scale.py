"""Throughput as the number of distinct adapters grows: one server, up to thousands of adapters (S-LoRA's scale).

Starts `lorahive serve` on the embedded demo model or on a random-weight checkpoint of a real model's shape
(`--shape smollm2-135m`; benchmarks/engine_throughput.py's SHAPES, with a tokenizer whose every id is a word,
so that every generated token streams text and the time to the first one is measured), provisions
`--provision` synthetic adapters over REST, and runs the load tester's sweep over the number of adapters the
traffic spreads across (`lorahive-loadtest sweep --vary adapters`), once per popularity (zipf:1.0, as S-LoRA's
traces, and uniform). Closed loop: `--concurrency` clients, `--requests` requests of `--input-len` prompt and
`--output-len` generated tokens per point. Each point is compared with the first (one adapter): output tok/s and
median TTFT ratios.

    PYTHONPATH=. python benchmarks/adapter_scale.py                       # the demo model, 1 ... 2000 adapters
    PYTHONPATH=. python benchmarks/adapter_scale.py --shape smollm2-135m --values 1,100,1000 --provision 1000 \
        --target-modules q_proj,v_proj
    PYTHONPATH=. python benchmarks/adapter_scale.py --tag slots16 --serve-flag=--max-gpu-adapters=16
    PYTHONPATH=. python benchmarks/adapter_scale.py --device cuda --shape llama3.2-1b --values 1,100,500 \
        --provision 500 --target-modules q_proj,v_proj --concurrency 64 --requests 256   # benchmarks/gpu_check

Prints a table and writes JSON to benchmarks/results/adapter_scale-<shape>[-<tag>]-<device>.json, and beside it a
PNG of both ratios against the adapter count, a line per popularity (`--plot JSON` draws it again from a JSON
written before, running nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from adapters_store import TARGET_MODULES
from benchmarks.engine_throughput import RESULTS, SHAPES, write_random_checkpoint
from benchmarks.vs_peft import numbered_tokenizer
from loadtest.plots import plot_ratio_sweeps
from tests.support.servers import free_port

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 300


def serve(model: Path | None, store: Path, port: int, flags: list[str], log: Path, device: str = "cpu",
          dtype: str = "float32") -> subprocess.Popen:
    command = [sys.executable, "-m", "server.cli", "serve", f"--port={port}", f"--store={store}", f"--device={device}",
               "--log-level=warning", *([f"--model={model}", f"--dtype={dtype}"] if model else []), *flags]
    return start_until_ready(command, port, log)


def start_until_ready(command: list[str], port: int, log: Path) -> subprocess.Popen:
    """`command` (a lorahive server on `port`, this checkout first on the path), once its /ready answers 200."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=sink)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"{' '.join(command[2:5])} did not become ready:\n{log.read_text()[-4000:]}")


def sweep(url: str, popularity: str, args: argparse.Namespace, out: Path) -> list[dict]:
    """One `lorahive-loadtest sweep` over the adapter counts (provisioning uploads only the ids not there yet, shaped
    by the server's model card); its rows, one per count."""
    flags = {"url": url, "vary": "adapters", "values": args.values, "popularity": popularity,
             "concurrency": args.concurrency, "num-requests": args.requests, "warmup-requests": args.warmup_requests,
             "input-len": args.input_len, "output-len": args.output_len, "rank": args.rank,
             "target-modules": args.target_modules, "repeats": args.repeats, "provision": args.provision, "out": out}
    command = [sys.executable, "-m", "loadtest", "sweep", *(f"--{k}={v}" for k, v in flags.items()), "--no-plots",
               "--no-progress"]
    subprocess.run(command, cwd=REPO, check=True)
    return json.loads((out / "sweep.json").read_text())["rows"]


def print_table(result: dict) -> None:
    print(f"\n{result['shape']} on {result['device']}; {result['workload']}; server flags: "
          f"{' '.join(result['serve_flags']) or '(defaults)'}")
    print("| popularity | adapters | output tok/s | vs 1 adapter | p50 TTFT ms | vs 1 adapter | p50 TPOT ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for popularity, rows in result["sweeps"].items():
        for row in rows:
            print(f"| {popularity} | {row['value']} | {row['output_throughput']:,.0f} | "
                  f"{row['output_throughput_ratio']:.2f} | {row['p50_ttft_ms']:.0f} | {row['p50_ttft_ms_ratio']:.2f} | "
                  f"{row['p50_tpot_ms']:.1f} |")


def describe_device(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def write_plot(result: dict, json_path: Path) -> Path:
    """The PNG of `result`'s sweeps beside its JSON: tok/s and p50 TTFT vs one adapter, a line per popularity."""
    return plot_ratio_sweeps(result["sweeps"], f"distinct adapters, {result['shape']} on {result['device']}",
                             json_path.with_suffix(".png"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["demo", *sorted(SHAPES)], default="demo")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the server runs (cuda: a checkpoint shape's weights in bfloat16)")
    parser.add_argument("--values", default="1,10,100,1000,2000", help="adapter counts the traffic spreads over")
    parser.add_argument("--popularity", nargs="+", default=["zipf:1.0", "uniform"])
    parser.add_argument("--provision", type=int, default=2000, help="adapters uploaded before the sweeps")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=192, help="requests per point")
    parser.add_argument("--warmup-requests", type=int, default=16, help="requests per point not measured")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--target-modules", default=",".join(TARGET_MODULES))
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the values, alternated; medians kept")
    parser.add_argument("--serve-flag", action="append", default=[], help="extra `lorahive serve` flag (repeatable)")
    parser.add_argument("--tag", default="", help="suffix of the JSON's name")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--plot", type=Path, help="only draw the PNG of this JSON, written by an earlier run")
    args = parser.parse_args(argv)
    if args.plot:
        result = json.loads(args.plot.read_text())
        print(f"wrote {write_plot(result, args.plot)}")
        return result
    with tempfile.TemporaryDirectory(prefix="lorahive-adapter-scale-") as scratch:
        scratch = Path(scratch)
        checkpoint = None
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        if args.shape != "demo":  # every token id decodes to text, so the first token's time is measured
            checkpoint = write_random_checkpoint(args.shape, scratch / "model", dtype,
                                                 numbered_tokenizer(SHAPES[args.shape]["vocab_size"]))
        port = free_port()
        server = serve(checkpoint, scratch / "store", port, args.serve_flag, scratch / "serve.log", args.device,
                       str(dtype).removeprefix("torch."))
        try:
            sweeps = {popularity: sweep(f"http://127.0.0.1:{port}", popularity, args, scratch / f"sweep-{i}")
                      for i, popularity in enumerate(args.popularity)}
        finally:
            server.terminate()
            server.wait(60)
    result = {
        "benchmark": "adapter_scale", "shape": args.shape, "device": describe_device(args.device),
        "serve_flags": args.serve_flag,
        "workload": f"{args.concurrency} concurrent, {args.requests} requests of {args.input_len} + {args.output_len} "
        f"tokens per point, rank-{args.rank} adapters on {args.target_modules}, {args.provision} provisioned",
        "sweeps": sweeps,
    }
    print_table(result)
    out = args.out or RESULTS / f"adapter_scale-{args.shape}{'-' + args.tag if args.tag else ''}-{args.device}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}, {write_plot(result, out)}")
    return result


if __name__ == "__main__":
    main()
