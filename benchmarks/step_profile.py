"""Host cost of one decode step: aten ops, milliseconds and device-to-host syncs per step, on the CPU.

Serves `--requests` concurrent greedy requests spread over `--adapters` synthetic adapters on a random-weight
checkpoint of `--shape` (engine_throughput's helpers), and profiles every decode step (every chunk one token)
of the model runner's `execute` with the torch profiler. Counted per step:
  ops    aten ops the profiler records (top-level and nested);
  ms     wall time of `execute` under the profiler (its overhead included, so compare before/after only);
  syncs  what waits for the device on a GPU: calls of `Tensor.item()` and `Tensor.tolist()`, `aten::_local_scalar_dense`
         events not already counted as an `.item()`, and `torch.tensor(...)` built from Python lists or tuples
         (a blocking host-to-device copy when its `device` is a GPU).
To compare with another tree, run this file with PYTHONPATH pointing at that tree (`--label` names the run); the
rows of every label go to benchmarks/results/step_profile-cpu.json.

    PYTHONPATH=$PWD python benchmarks/step_profile.py --label after
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from engine_throughput import RESULTS, run_workload, synthetic_adapters, write_random_checkpoint

from server.config import Settings
from server.runtime import build_engine
from server.torch_threads import limit_current_thread


class SyncCounter:
    """Counts, while installed, the Python calls that make the host wait for the device."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._originals: dict[tuple[object, str], object] = {}

    def _wrap(self, owner: object, name: str, counts_call) -> None:
        original = getattr(owner, name)
        self._originals[(owner, name)] = original

        def counted(*args, **kwargs):
            if counts_call(args):
                self.counts[name] += 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    def __enter__(self) -> SyncCounter:
        self._wrap(torch.Tensor, "item", lambda args: True)
        self._wrap(torch.Tensor, "tolist", lambda args: True)
        self._wrap(torch, "tensor", lambda args: bool(args) and isinstance(args[0], list | tuple))
        return self

    def __exit__(self, *exc: object) -> None:
        for (owner, name), original in self._originals.items():
            setattr(owner, name, original)


def profile_decode_steps(engine, requests: int, adapters: int, output_len: int) -> dict:
    runner = engine.runner
    execute = runner.execute
    steps: list[dict] = []

    def profiled(plan, overlap=None):
        if not all(chunk.num_tokens == 1 for chunk in plan) or len(plan) != requests:
            return execute(plan, overlap)
        with SyncCounter() as syncs, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            output = execute(plan, overlap)
            seconds = time.perf_counter() - start
        names = Counter(event.name for event in prof.events() if event.name.startswith("aten::"))
        scalar = max(0, names["aten::_local_scalar_dense"] - syncs.counts["item"])
        steps.append({"ops": sum(names.values()), "ms": 1000 * seconds,
                      "syncs": sum(syncs.counts.values()) + scalar, "sync_kinds": dict(syncs.counts)})
        return output

    runner.execute = profiled
    try:
        ids = [f"bench-{i % adapters}" for i in range(requests)]
        asyncio.run(run_workload(engine, ids, 16, output_len))
    finally:
        runner.execute = execute
    steps = steps[1:]  # the first full decode step allocates what the next ones reuse

    def mean(key: str) -> float:
        return sum(step[key] for step in steps) / len(steps)
    kinds = Counter()
    for step in steps:
        kinds.update(step["sync_kinds"])
    return {"decode_steps": len(steps), "ops_per_step": mean("ops"), "ms_per_step": mean("ms"),
            "syncs_per_step": mean("syncs"), "sync_kinds_per_step": {k: v / len(steps) for k, v in kinds.items()}}


def main() -> None:
    # As `lorahive serve` does: this thread never owns an OpenMP team beside the engine's (server/torch_threads.py).
    limit_current_thread()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="names this run in the JSON (e.g. before / after)")
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=12)
    parser.add_argument("--out", type=Path, default=RESULTS / "step_profile-cpu.json")
    args = parser.parse_args()

    settings = dict(device="cpu", max_gpu_adapters=args.adapters, max_lora_rank=args.rank,
                    max_num_seqs=args.requests, max_model_len=16 + args.output_len + 8,
                    model_runner_process=False)  # profiles the runner's own calls: it must be in this process
    with tempfile.TemporaryDirectory(prefix="lorahive-bench-") as scratch:
        engine = build_engine(Settings(model=write_random_checkpoint(args.shape, Path(scratch)), **settings))
    for adapter in synthetic_adapters(engine, args.adapters, args.rank):
        engine.registry.add(adapter)
    engine.start()
    try:
        row = profile_decode_steps(engine, args.requests, args.adapters, args.output_len)
    finally:
        engine.shutdown()
    row = {"label": args.label, "shape": args.shape, "requests": args.requests, "adapters": args.adapters,
           "rank": args.rank, **row}
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    rows = [r for r in rows if r["label"] != args.label] + [row]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"{'label':<10}{'ops/step':>10}{'ms/step':>10}{'syncs/step':>12}")
    for r in rows:
        print(f"{r['label']:<10}{r['ops_per_step']:>10.0f}{r['ms_per_step']:>10.1f}{r['syncs_per_step']:>12.1f}")


if __name__ == "__main__":
    main()
