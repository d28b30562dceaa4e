"""Replicas on Ray Serve: throughput of `lorahive serve-ray` with N replicas against a plain `lorahive serve`, and
how well each adapter's requests stay on one replica.

First a plain `lorahive serve` (no Ray: the baseline), then for each replica count `lorahive serve-ray` on the demo
model (a local Ray, every replica on this machine), all on one store. Each run provisions `--adapters` synthetic
adapters through the endpoint (once: later runs find them stored) and runs the load tester against it: closed
loop, `--concurrency` clients, zipf:1.0 popularity over the adapters. The load tester reads each answer's
`x-lorahive-replica` header: requests per replica, and the share of adapter requests that went to their adapter's
usual replica (affinity).

    PYTHONPATH=. python benchmarks/scale_out.py                     # serve, then 1 and 2 replicas
    PYTHONPATH=. python benchmarks/scale_out.py --replicas 1 2 4 --adapters 200

Prints a table (throughput relative to the plain server) and writes JSON to
benchmarks/results/scale_out-demo-cpu.json. On one machine the replicas share its cores: the ratios say what the
routing and the extra processes cost there, not what N machines would give.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.adapter_scale import REPO, serve, start_until_ready
from benchmarks.engine_throughput import RESULTS
from tests.support.servers import free_port


def serve_ray(replicas: int, store: Path, port: int, log: Path) -> subprocess.Popen:
    return start_until_ready([sys.executable, "-m", "server.cli", "serve-ray", f"--replicas={replicas}",
                              "--replica-cpus=0", f"--port={port}", f"--store={store}", "--device=cpu",
                              "--log-level=warning"], port, log)


def load_test(url: str, args: argparse.Namespace, out: Path) -> dict:
    flags = {"url": url, "provision": args.adapters, "adapters": args.adapters, "popularity": "zipf:1.0",
             "concurrency": args.concurrency, "num-requests": args.requests, "warmup-requests": args.warmup_requests,
             "input-len": args.input_len, "output-len": args.output_len, "rank": 8, "out": out}
    command = [sys.executable, "-m", "loadtest", *(f"--{k}={v}" for k, v in flags.items()), "--no-plots",
               "--no-progress"]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--warmup-requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale_out-demo-cpu.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorahive-scale-out-") as scratch:
        scratch = Path(scratch)
        for replicas in [0, *args.replicas]:  # 0: `lorahive serve` alone
            port = free_port()
            log = scratch / f"server-{replicas}.log"
            server = (serve_ray(replicas, scratch / "store", port, log) if replicas
                      else serve(None, scratch / "store", port, [], log))
            try:
                report = load_test(f"http://127.0.0.1:{port}", args, scratch / f"run-{replicas}")
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(120)
            rows.append({"replicas": replicas, **{key: report[key] for key in (
                "completed", "failed", "output_throughput", "median_ttft_ms", "median_tpot_ms", "served_by",
                "adapter_affinity")}})
    first = rows[0]["output_throughput"]
    result = {
        "benchmark": "scale_out", "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "workload": f"{args.concurrency} concurrent, {args.requests} requests of {args.input_len} + {args.output_len} "
        f"tokens, zipf:1.0 over {args.adapters} rank-8 adapters, demo model",
        "rows": rows,
    }
    print(f"\n{result['workload']}; {result['device']}")
    print("| server | output tok/s | vs serve | p50 TTFT ms | p50 TPOT ms | requests per replica | affinity |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for row in rows:
        spread = ", ".join(str(n) for n in sorted((row["served_by"] or {}).values(), reverse=True))
        affinity = "-" if row["adapter_affinity"] is None else f"{row['adapter_affinity']:.1%}"
        name = f"serve-ray, {row['replicas']} replicas" if row["replicas"] else "serve (no Ray)"
        print(f"| {name} | {row['output_throughput']:,.0f} | {row['output_throughput'] / first:.2f} | "
              f"{row['median_ttft_ms']:.0f} | {row['median_tpot_ms']:.1f} | {spread} | {affinity} |")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
