"""Do adapter loads stall the requests already running? Decode step time with and without loads in flight.

A batch of `--batch` greedy requests on `--resident` adapters decodes `--output-len` tokens on a random-weight
checkpoint of SmolLM2-135M's shape (`--shape`). A few steps into the decode, `--loads` requests arrive, each
naming its own adapter (rank `--rank`, every target module) and asking for `--new-tokens` tokens. In the *loads*
run those adapters are on disk only: each is read, checked, packed and copied into the device tier while the
batch keeps decoding. In the *resident* run the same requests name adapters already in the device tier, so
the two runs do the same compute and differ only by the loads.

Step time = the interval between the ends of consecutive engine steps, so it holds everything the engine
thread does between them (scheduling, adapter writes, the forward, sampling): what a running request feels
between two tokens. Of the `--window` steps after the arrival, the decode steps (no arriving request's
prefill in them, whose cost is the same in both runs but spread over more steps in the loads run) give the
median and p90; max is over every step of the window, and "engine ms/load" is the median time the engine
thread spent in the runner's `apply` of a load. Each statistic is the best of `--repeats` (the runs alternate,
and this machine is shared). Target: decode steps with loads within 1.2x of resident.

    python benchmarks/adapter_load_stall.py                          # the model runner in a worker (the default)
    python benchmarks/adapter_load_stall.py --no-model-runner-process --tag in-process
    PYTHONPATH=/tmp/loads-base python benchmarks/adapter_load_stall.py --tag before  # another tree's server

Prints a table and writes JSON to benchmarks/results/adapter_load_stall-<device>[-tag].json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from adapters_store import LoraAdapter
from adapters_store.peft_export import to_peft_files
from benchmarks.engine_throughput import describe_device, synthetic_adapters, write_random_checkpoint
from server.adapter_pool import LoadAdapter
from server.config import Settings
from server.engine import Engine
from server.requests import GenerationRequest, SamplingParams
from server.runtime import build_engine
from server.torch_threads import limit_current_thread

RESULTS = Path(__file__).parent / "results"


class StepClock:
    """When each engine step ended (the runner's `execute` returned), and how long each adapter load took the
    engine thread (the runner's `apply` of a load: the copies in this process, or with the model runner in a
    worker, handing it the adapter and its answer)."""

    def __init__(self, engine: Engine) -> None:
        self.ends: list[float] = []
        self.decode_only: list[bool] = []  # per step: every chunk one token (no prefill of an arriving request)
        self.load_s: list[float] = []
        execute, apply = engine.runner.execute, engine.runner.apply

        def timed_execute(plan, overlap=None):
            output = execute(plan, overlap)
            self.ends.append(time.perf_counter())
            self.decode_only.append(all(chunk.num_tokens == 1 for chunk in plan))
            return output

        def timed_apply(write):
            start = time.perf_counter()
            apply(write)
            if isinstance(write, LoadAdapter):
                self.load_s.append(time.perf_counter() - start)

        engine.runner.execute = timed_execute
        engine.runner.apply = timed_apply

    def intervals_after(self, moment: float, count: int) -> tuple[list[float], list[float]]:
        """Step times (end to end) of the first `count` steps that ended after `moment`: of every one, and of
        those that only decoded."""
        first = next(i for i, end in enumerate(self.ends) if end > moment)
        steps = range(first, min(first + count, len(self.ends)))
        times = [self.ends[i] - self.ends[i - 1] for i in steps]
        return times, [t for i, t in zip(steps, times, strict=True) if self.decode_only[i]]


def store_cold(engine: Engine, adapter: LoraAdapter) -> None:
    """Put `adapter` in the store behind the server's back: on disk only, never in host memory or a slot."""
    config, weights = to_peft_files(adapter)
    parsed = engine.registry.validate(adapter.adapter_id, config, weights)
    engine.registry.store.create(adapter.adapter_id, config, weights, rank=parsed.rank,
                                 lora_alpha=parsed.lora_alpha, target_modules=parsed.target_modules)


def renamed(adapter: LoraAdapter, adapter_id: str) -> LoraAdapter:
    return LoraAdapter(adapter_id, adapter.rank, adapter.lora_alpha, adapter.target_modules, adapter.weights,
                       adapter.config)


async def one_run(engine: Engine, args: argparse.Namespace, clock: StepClock, arriving: list[str]) -> dict:
    """The batch decodes; `args.delay_steps` steps into its decode the requests naming `arriving` come in."""
    vocab = engine.tokenizer.vocab_size

    def request(i: int, adapter_id: str, max_tokens: int) -> GenerationRequest:
        prompt = tuple((7 * i + 3 * j) % (vocab - 8) + 1 for j in range(args.prompt_len))
        return GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                                 adapter_id=adapter_id)

    async def drain(req: GenerationRequest) -> None:
        async for _ in engine.submit(req):
            pass

    batch = [asyncio.ensure_future(drain(request(i, f"resident-{i % args.resident}", args.output_len)))
             for i in range(args.batch)]
    start_step = engine.steps
    while engine.steps < start_step + 1 + args.delay_steps:  # the prefill, then that many decodes
        await asyncio.sleep(0.001)
    arrival = time.perf_counter()
    loads_before = engine.pool.loads
    del clock.load_s[:]
    await asyncio.gather(*(drain(request(100 + i, a, args.new_tokens)) for i, a in enumerate(arriving)))
    served = time.perf_counter()
    await asyncio.gather(*batch)
    steps, decode_steps = clock.intervals_after(arrival, args.window)
    if len(steps) < args.window:
        raise SystemExit(f"only {len(steps)} steps after the arrival: raise --output-len")
    return {"step_s": decode_steps, "any_step_s": steps, "arrivals_served_s": served - arrival,
            "device_loads": engine.pool.loads - loads_before, "engine_thread_load_s": list(clock.load_s)}


def summary(runs: list[dict]) -> dict:
    """Per statistic, the best (lowest) over the repeats: the machine's other jobs only ever add time."""
    def best(stat) -> float:
        return min(stat(run["step_s"]) for run in runs)
    return {
        "median_ms": 1e3 * best(statistics.median),
        "p90_ms": 1e3 * best(lambda s: statistics.quantiles(s, n=10)[-1]),
        "max_ms": 1e3 * min(max(run["any_step_s"]) for run in runs),
        "arrivals_served_s": min(run["arrivals_served_s"] for run in runs),
        "device_loads": [run["device_loads"] for run in runs],
        "engine_thread_ms_per_load": 1e3 * min(
            (statistics.median(run["engine_thread_load_s"]) for run in runs if run["engine_thread_load_s"]),
            default=0.0),
    }


def main() -> None:
    # As `lorahive serve` does: this thread never owns an OpenMP team beside the engine's (server/torch_threads.py).
    limit_current_thread()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resident", type=int, default=2, help="adapters of the running batch")
    parser.add_argument("--loads", type=int, default=8, help="adapters loaded while the batch decodes")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=72)
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens each arriving request asks for")
    parser.add_argument("--delay-steps", type=int, default=4, help="decode steps before the arrival")
    parser.add_argument("--window", type=int, default=48, help="steps after the arrival that are measured")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="", help="suffix of the JSON file (e.g. before)")
    parser.add_argument("--model-runner-process", action=argparse.BooleanOptionalAction, default=True,
                        help="the model runner in a worker process, as `lorahive serve` runs it (default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lorahive-stall-") as scratch:
        checkpoint = write_random_checkpoint(args.shape, Path(scratch) / "model")
        engine = build_engine(Settings(
            model=checkpoint, store=Path(scratch) / "store", max_gpu_adapters=args.resident + args.loads,
            max_lora_rank=args.rank, max_num_seqs=args.batch + args.loads,
            max_model_len=args.prompt_len + args.output_len, model_runner_process=args.model_runner_process))
        (weights,) = synthetic_adapters(engine, 1, args.rank)  # one set of weights under every id
        for i in range(args.resident):
            engine.registry.add(renamed(weights, f"resident-{i}"))
        for i in range(args.loads):
            engine.registry.add(renamed(weights, f"hot-{i}"))
        for repeat in range(args.repeats):
            for i in range(args.loads):
                store_cold(engine, renamed(weights, f"cold-{repeat}-{i}"))
        clock = StepClock(engine)
        engine.start()
        try:
            runs: dict[str, list[dict]] = {"resident": [], "loads": []}
            for repeat in range(args.repeats):
                hot = [f"hot-{i}" for i in range(args.loads)]
                cold = [f"cold-{repeat}-{i}" for i in range(args.loads)]
                warm = [*(f"resident-{i}" for i in range(args.resident)), *hot]  # into the device tier
                asyncio.run(_one_token_each(engine, warm))
                runs["resident"].append(asyncio.run(one_run(engine, args, clock, hot)))
                runs["loads"].append(asyncio.run(one_run(engine, args, clock, cold)))
        finally:
            engine.shutdown()

    rows = {name: summary(r) for name, r in runs.items()}
    device = describe_device(engine)
    print(f"device: {device}; model: {args.shape}; batch {args.batch} on {args.resident} adapters; {args.loads} "
          f"adapters of rank {args.rank} loaded meanwhile; {args.window} steps, best of {args.repeats}")
    print(f"{'run':<9} {'median ms':>10} {'p90 ms':>8} {'max ms':>8} {'arrivals served s':>18} "
          f"{'engine ms/load':>15}")
    for name, row in rows.items():
        print(f"{name:<9} {row['median_ms']:>10.1f} {row['p90_ms']:>8.1f} {row['max_ms']:>8.1f} "
              f"{row['arrivals_served_s']:>18.2f} {row['engine_thread_ms_per_load']:>15.1f}")
    ratios = {f"{stat}_ratio": rows["loads"][stat] / rows["resident"][stat] for stat in ("median_ms", "p90_ms")}
    print("loads / resident: " + ", ".join(f"{k.removesuffix('_ratio')} {v:.2f}x" for k, v in ratios.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if engine.device.type == "cuda" else "cpu"
    out = RESULTS / f"adapter_load_stall-{tag}{'-' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({"device": device, "config": vars(args), "summary": rows, **ratios, "runs": runs},
                              indent=2))
    print(f"wrote {out}")


async def _one_token_each(engine: Engine, adapter_ids: list[str]) -> None:
    """One short request per adapter: each is in the device tier after."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    async def one(adapter_id: str) -> None:
        async for _ in engine.submit(GenerationRequest((1, 2, 3), params, adapter_id=adapter_id)):
            pass

    await asyncio.gather(*(one(a) for a in adapter_ids))


if __name__ == "__main__":
    main()
