"""The engine thread's torch work at main-thread speed, and what HTTP streaming costs the engine's steps.

(a) LoRA ops: one decode step's shrink/expand calls (`kernels.add_lora`, torch backend) on SmolLM2-135M shapes
    (30 layers; fused q|k|v, o, fused gate|up, down; hidden 576, 3 KV heads of 64, intermediate 1536), 4 adapters
    of ranks 8/16/32/64 in a rank-64 pool, mixed over a decode batch of 32 tokens. Timed, each case in a fresh
    process (OpenMP's thread teams live as long as the process):
      main    on the main thread, torch's default thread count (the speed to match)
      before  the old start: the main thread first runs torch with the default count (loading the model), then
              a plain thread, as the engine thread was, runs the ops
      after   lorahive's start (server/torch_threads.py): the main thread at one torch thread before any op,
              the ops on a `TorchThread` with the default count, as the engine thread now starts
    Target: `after` within 1.1x of `main`.
(b) Engine steps: the demo model's engine decoding 64 requests, submitted in process (no HTTP) vs streamed to 64
    HTTP clients (a client process beside the server, SSE); with the model runner on the engine thread and in a
    worker process (`--model-runner-process`). Per full decode step (64 sequences): the forward +
    sampling time the engine's step metric observes, and the interval between consecutive steps (the whole loop:
    detokenizing, pushing tokens to the event loop, and waiting for the GIL).

(c) Python beside the engine: the same in-process decode while other pure-Python work (a stand-in for the event
    loop's HTTP, JSON and SSE work) takes `--beside-share` of a core, in a thread of the engine's process (it
    shares the engine's GIL, as the API server does today) or in another process (as it would beside an engine
    core process of its own). Then the same with the model runner in a worker process (`--model-runner-process`):
    the Python work then shares its GIL with the engine's scheduling only. The engine runs `--engine-threads` torch
    threads: with 1 a core is left for the other work, so what slows the engine is the GIL, not the cores.

    python benchmarks/engine_thread.py                      # all; writes benchmarks/results/engine_thread-cpu.json
    python benchmarks/engine_thread.py --only lora --repeats 3
    python benchmarks/engine_thread.py --only beside --engine-threads 1

No assertions: it prints tables. On a shared machine the numbers move; `--repeats` runs each case that often.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LORA_CASES = ("main", "before", "after")
LAYERS = 30
DIM, KV_DIM, INTERMEDIATE = 576, 192, 1536
MODULES = {  # d_in, output slice widths
    "qkv": (DIM, (DIM, KV_DIM, KV_DIM)),
    "o": (DIM, (DIM,)),
    "gate_up": (DIM, (INTERMEDIATE, INTERMEDIATE)),
    "down": (INTERMEDIATE, (DIM,)),
}
RANKS = (8, 16, 32, 64)
BATCH = 32
CLIENTS = 64


# ---- (a) LoRA ops --------------------------------------------------------------------------------------------


def lora_step() -> Callable[[], None]:
    """One decode step's LoRA calls, inputs built: call it to run them."""
    import torch

    from kernels import LoRABatch, add_lora
    from kernels.paging import pack_dense

    generator = torch.Generator().manual_seed(0)
    max_rank = max(RANKS)
    batch = LoRABatch.from_token_slots([t % len(RANKS) for t in range(BATCH)], fixed_shape=True)
    calls = []
    for _ in range(LAYERS):
        for d_in, widths in MODULES.values():
            a = torch.randn(len(RANKS), len(widths) * max_rank, d_in, generator=generator) * 0.02
            b = torch.randn(len(RANKS), sum(widths), max_rank, generator=generator) * 0.02
            lora_a, lora_b, table = pack_dense(a, b, widths, list(RANKS))
            x = torch.randn(BATCH, d_in, generator=generator)
            y = torch.zeros(BATCH, sum(widths))
            calls.append((y, x, lora_a, lora_b, widths, table))

    def run() -> None:
        for y, x, lora_a, lora_b, widths, table in calls:
            add_lora(y, x, lora_a, lora_b, batch, widths, table, "torch")

    return run


def time_calls(run: Callable[[], None], repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


ThreadFactory = Callable[[Callable[[], None]], threading.Thread]


def on_thread(work: Callable[[], list[float]], thread_of: ThreadFactory) -> list[float]:
    result: list[list[float]] = []
    thread = thread_of(lambda: result.append(work()))
    thread.start()
    thread.join()
    return result[0]


def lora_case(case: str, repeats: int) -> dict:
    """Run one case in this (fresh) process."""
    import torch

    from server import torch_threads

    default = torch.get_num_threads()
    if case == "after":
        torch_threads.limit_current_thread()  # as build_engine does, before any op
    run = lora_step()  # building the inputs: the main thread's first ops (as loading a model is)
    work = lambda: time_calls(run, repeats)  # noqa: E731
    if case == "main":
        times = work()
    elif case == "before":
        times = on_thread(work, lambda target: threading.Thread(target=target, name="lorahive-engine", daemon=True))
    else:
        times = on_thread(work, lambda target: torch_threads.TorchThread(target, "lorahive-engine", default))
    return {"case": case, "threads": default, "mean_ms": statistics.mean(times) * 1e3,
            "median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3}


def run_lora_cases(repeats: int, rounds: int) -> list[dict]:
    rows = []
    for round_ in range(rounds):
        for case in LORA_CASES:
            out = subprocess.run([sys.executable, __file__, "--lora-case", case, "--repeats", str(repeats)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.splitlines()[-1]) | {"round": round_})
    return rows


def print_lora(rows: list[dict]) -> None:
    print(f"\n(a) one decode step's LoRA ops: {LAYERS} layers x {len(MODULES)} modules, batch {BATCH}, ranks "
          f"{'/'.join(map(str, RANKS))} mixed, torch backend, {rows[0]['threads']} torch threads")
    print(f"{'case':<8} {'round':>5} {'median ms':>10} {'mean ms':>9} {'min ms':>8} {'vs main':>8}")
    for row in rows:
        main = next(r for r in rows if r["case"] == "main" and r["round"] == row["round"])
        row["vs_main"] = row["median_ms"] / main["median_ms"]
        print(f"{row['case']:<8} {row['round']:>5} {row['median_ms']:>10.2f} {row['mean_ms']:>9.2f} "
              f"{row['min_ms']:>8.2f} {row['vs_main']:>7.2f}x")


# ---- (b) engine steps with and without HTTP -----------------------------------------------------------------


class StepRecorder:
    """Wraps the engine's step metric: each full decode step's duration and when it ended."""

    def __init__(self, engine, batch: int):
        self.full: list[tuple[float, float]] = []  # (end, duration) of steps of `batch` sequences, one token each
        observe = engine.metrics.step

        def step(duration_s: float, num_sequences: int, num_tokens: int) -> None:
            if num_sequences == num_tokens == batch:
                self.full.append((time.perf_counter(), duration_s))
            observe(duration_s, num_sequences, num_tokens)

        engine.metrics.step = step

    def summary(self) -> dict:
        durations = [d for _, d in self.full]
        gaps = [b - a for (a, _), (b, _) in zip(self.full, self.full[1:], strict=False)]
        gaps = [g for g in gaps if g < 1.0]  # across a pause between runs
        return {"steps": len(durations), "step_mean_ms": statistics.mean(durations) * 1e3,
                "step_median_ms": statistics.median(durations) * 1e3,
                "interval_mean_ms": statistics.mean(gaps) * 1e3, "interval_median_ms": statistics.median(gaps) * 1e3}


def demo_engine(engine_threads: int | None, model_runner_process: bool = False, device: str = "cpu"):
    from server.config import Settings
    from server.runtime import build_engine

    settings = Settings(device=device, dtype="float32", max_num_seqs=CLIENTS, engine_threads=engine_threads,
                        model_runner_process=model_runner_process)
    return settings, build_engine(settings)


async def in_process(engine, max_tokens: int) -> None:
    from server.requests import GenerationRequest, SamplingParams

    async def one(i: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for _ in engine.submit(GenerationRequest(tuple(range(65, 75)), params)):
            pass

    await asyncio.gather(*(one(i) for i in range(CLIENTS)))


async def over_http(engine, settings, max_tokens: int) -> None:
    import uvicorn

    from server.api.app import build_app
    from server.draining_server import guarded_protocol

    config = uvicorn.Config(build_app(engine, settings), host="127.0.0.1", port=0, log_level="warning",
                            http=guarded_protocol(settings))
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = await asyncio.create_subprocess_exec(sys.executable, __file__, "--client", f"http://127.0.0.1:{port}",
                                                  "--max-tokens", str(max_tokens))
    await client.wait()
    server.should_exit = True
    await serving


async def http_clients(url: str, max_tokens: int) -> None:
    """`CLIENTS` streaming completions at once, read to their end (the client process of the HTTP case)."""
    import httpx

    body = {"model": "lorahive-demo", "prompt": "ABCDEFGHIJ", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=CLIENTS)) as client:
        async def one() -> None:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for _ in response.aiter_lines():
                    pass

        await asyncio.gather(*(one() for _ in range(CLIENTS)))


def run_steps(engine_threads: int | None, max_tokens: int, rounds: int, model_runner_process: bool = False,
              device: str = "cpu") -> list[dict]:
    settings, engine = demo_engine(engine_threads, model_runner_process, device)
    engine.start()
    runner = runner_label(model_runner_process)
    rows = []
    try:
        asyncio.run(in_process(engine, 8))  # warm-up
        for round_ in range(rounds):
            for mode in ("in-process", "http"):
                recorder = StepRecorder(engine, CLIENTS)
                work = in_process(engine, max_tokens) if mode == "in-process" else over_http(engine, settings,
                                                                                             max_tokens)
                asyncio.run(work)
                rows.append({"runner": runner, "mode": mode, "round": round_,
                             "torch_threads": engine_threads or os.cpu_count()} | recorder.summary())
    finally:
        engine.shutdown()
    return rows


def print_steps(rows: list[dict], max_tokens: int) -> None:
    print_intervals(f"(b) demo model, {CLIENTS} requests x {max_tokens} tokens decoding together; full decode steps "
                    f"of {CLIENTS} sequences; torch at {rows[0]['torch_threads']} threads", rows, "mode", "in-process",
                    "interval_vs_in_process")


def print_intervals(title: str, rows: list[dict], case: str, baseline: str, ratio: str) -> None:
    """A table of runs: each one's `case`, step and interval medians, and its interval over that of the `baseline`
    case with the same runner and round (also kept in the row, under `ratio`)."""
    print(f"\n{title}")
    print(f"{'model runner':<14} {case:<11} {'round':>5} {'steps':>5} {'step median':>12} {'interval median':>16} "
          f"{'vs ' + baseline:>14}")
    for row in rows:
        base = next(r for r in rows if r[case] == baseline and r["round"] == row["round"]
                    and r["runner"] == row["runner"])
        row[ratio] = row["interval_median_ms"] / base["interval_median_ms"]
        print(f"{row['runner']:<14} {row[case]:<11} {row['round']:>5} {row['steps']:>5} "
              f"{row['step_median_ms']:>9.2f} ms {row['interval_median_ms']:>13.2f} ms {row[ratio]:>13.2f}x")


def runner_label(model_runner_process: bool) -> str:
    return "process" if model_runner_process else "engine thread"


# ---- (c) Python beside the engine ----------------------------------------------------------------------------

BESIDE = ("alone", "thread", "process")
BESIDE_PERIOD_S = 0.005  # the other work's duty cycle: busy for share x this, then asleep for the rest


def python_work(share: float, stop) -> None:
    """Pure-Python work (it holds the GIL while it runs) for `share` of each period, until `stop` is set."""
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < BESIDE_PERIOD_S * share:
            sum(i * i for i in range(200))
        time.sleep(BESIDE_PERIOD_S * (1 - share))


def run_beside(engine_threads: int | None, max_tokens: int, rounds: int, share: float,
               model_runner_process: bool = False, device: str = "cpu") -> list[dict]:
    import multiprocessing

    _, engine = demo_engine(engine_threads, model_runner_process, device)
    engine.start()
    threads = engine_threads or os.cpu_count()  # the engine thread's, or with a worker process the worker's
    rows = []
    try:
        asyncio.run(in_process(engine, 8))  # warm-up
        for round_ in range(rounds):
            for mode in BESIDE:
                stop = multiprocessing.get_context("fork").Event() if mode == "process" else threading.Event()
                worker = None
                if mode == "thread":
                    worker = threading.Thread(target=python_work, args=(share, stop))
                elif mode == "process":  # forked before the step: its own interpreter, its own GIL
                    worker = multiprocessing.get_context("fork").Process(target=python_work, args=(share, stop))
                if worker is not None:
                    worker.start()
                recorder = StepRecorder(engine, CLIENTS)
                asyncio.run(in_process(engine, max_tokens))
                stop.set()
                if worker is not None:
                    worker.join()
                rows.append({"runner": runner_label(model_runner_process), "beside": mode,
                             "round": round_, "share": share, "torch_threads": threads} | recorder.summary())
    finally:
        engine.shutdown()
    return rows


def print_beside(rows: list[dict]) -> None:
    print_intervals(f"(c) demo model, {CLIENTS} requests decoding in process, torch at {rows[0]['torch_threads']} "
                    f"threads; pure-Python work taking {rows[0]['share']:.0%} of a core beside the engine", rows,
                    "beside", "alone", "interval_vs_alone")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("lora", "steps", "beside"), default=None)
    parser.add_argument("--beside-share", type=float, default=0.3, help="(c): the other work's share of a core")
    parser.add_argument("--repeats", type=int, default=30, help="timed LoRA steps per case")
    parser.add_argument("--rounds", type=int, default=3, help="times each case runs")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--engine-threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="(b) and (c): the demo model's device")
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_thread-cpu.json")
    parser.add_argument("--lora-case", choices=LORA_CASES, help=argparse.SUPPRESS)  # one case, in a child
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the HTTP clients, in a child
    args = parser.parse_args()
    if args.lora_case:
        print(json.dumps(lora_case(args.lora_case, args.repeats)))
        return
    if args.client:
        asyncio.run(http_clients(args.client, args.max_tokens))
        return
    load = os.getloadavg()[0]
    print(f"load average before: {load:.2f} on {os.cpu_count()} CPUs")
    result: dict = {"cpus": os.cpu_count(), "load_before": load, "config": vars(args) | {"out": str(args.out)}}
    if args.only in (None, "lora"):
        result["lora"] = run_lora_cases(args.repeats, args.rounds)
        print_lora(result["lora"])
    if args.only in (None, "steps"):
        result["steps"] = [row for process in (False, True) for row in run_steps(
            args.engine_threads, args.max_tokens, args.rounds, model_runner_process=process, device=args.device)]
        print_steps(result["steps"], args.max_tokens)
    if args.only in (None, "beside"):
        result["beside"] = [row for process in (False, True) for row in run_beside(
            args.engine_threads, args.max_tokens, args.rounds, args.beside_share, model_runner_process=process,
            device=args.device)]
        print_beside(result["beside"])
    result["load_after"] = os.getloadavg()[0]
    print(f"load average after: {result['load_after']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
