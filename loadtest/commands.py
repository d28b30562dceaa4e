"""What each `lorahive-loadtest` command does, between the parsed flags and the modules that do the work:
find the target's models, provision adapters, run, write the reports, clean up."""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.arrivals import ArrivalProcess
from loadtest.client import ClientConfig, make_http_client
from loadtest.flag_values import SWEEP_KNOBS
from loadtest.metrics import SLO
from loadtest.plots import plot_compare_cdfs, plot_sweep, write_run_plots
from loadtest.progress import Progress
from loadtest.provision import (
    ProvisioningError,
    ProvisionOutcome,
    ServerInfo,
    cleanup,
    discover,
    provision,
    resolve_dims,
)
from loadtest.report import build_report, load_results, markdown_summary, write_json
from loadtest.runner import RunLimits, run_load
from loadtest.synthetic_adapters import DEMO_DIMS, AdapterSpec, adapter_ids, write_adapters
from loadtest.workload import LengthSpec, Popularity, Workload, load_prompts, load_trace

DEFAULT_NUM_REQUESTS = 100
# The same words as the README's, so the two name one way to get the plots.
PLOTS_HINT = "PNG plots need matplotlib: pip install -e '.[loadtest]'"
RESULTS_JSON = "results.json"
SUMMARY_MD = "summary.md"


class UsageError(ValueError):
    """Flags that do not make a run; the CLI prints the message and exits with status 2."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The target: its models, and the adapters the run may use


@dataclass
class Target:
    url: str
    info: ServerInfo
    pool: list[str]  # adapter ids requests may draw from, in order (`--adapters N` takes the first N)
    provisioned: ProvisionOutcome = field(default_factory=ProvisionOutcome)
    headers: dict[str, str] = field(default_factory=dict)


def _headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def adapter_spec(args: argparse.Namespace) -> AdapterSpec:
    """The synthetic adapters' spec; with a mix of `--adapter-kind`s, the first's (`spec_for` gives each its own)."""
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    try:
        return AdapterSpec(rank=args.rank, alpha=args.lora_alpha, targets=targets, dtype=args.adapter_dtype,
                           kind=args.adapter_kind[0])
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _describe_adapters(args: argparse.Namespace) -> str:
    """The synthetic adapters' kinds, for messages, and their rank if any kind has one."""
    kinds = ",".join(dict.fromkeys(args.adapter_kind))
    ranked = {"lora", "dora"} & set(args.adapter_kind)
    return f"{kinds}, rank {args.rank}" if ranked else kinds


def _dims_flags(args: argparse.Namespace) -> dict[str, int | None]:
    names = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
    return {n: getattr(args, n) for n in names}


def _model_config(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.model_config is None:
        return None
    try:
        return json.loads(args.model_config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--model-config {args.model_config}: {exc}") from None


async def prepare_target(args: argparse.Namespace, http: httpx.AsyncClient, provision_count: int) -> Target:
    """Discovers the server's models and uploads `provision_count` synthetic adapters if asked."""
    url = args.url.rstrip("/")
    headers = _headers(args)
    try:
        info = await discover(http, url, args.model, headers)
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    pool = [a.strip() for a in args.adapter_ids.split(",") if a.strip()] if args.adapter_ids else list(info.adapters)
    target = Target(url, info, pool, headers=headers)
    if provision_count:
        dims = resolve_dims(_dims_flags(args), info.dims, _model_config(args), info.base_model)
        ids = adapter_ids(provision_count, args.adapter_prefix)
        _say(f"provisioning {len(ids)} synthetic adapters ({_describe_adapters(args)}) on {url} for "
             f"{info.base_model} ...")
        progress = _CountLine(len(ids), "uploaded", enabled=not args.no_progress)
        await provision(http, url, ids, dims, adapter_spec(args), args.seed, info.base_model,
                        args.provision_parallel, headers, progress.update, target.provisioned, args.adapter_kind)
        progress.close()
        if target.provisioned.existing:
            _say(f"{len(target.provisioned.existing)} of them already existed and are reused (not deleted afterwards)")
        target.pool = ids
    return target


class _CountLine:
    def __init__(self, total: int, verb: str, enabled: bool = True) -> None:
        self.total, self.verb, self.enabled = total, verb, enabled and sys.stderr.isatty()

    def update(self, done: int) -> None:
        if self.enabled:
            sys.stderr.write(f"\r{done}/{self.total} {self.verb}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def choose_adapters(target: Target, count: int | None) -> list[str]:
    if count is None:
        return list(target.pool)
    if count > len(target.pool):
        raise UsageError(
            f"--adapters {count}, but only {len(target.pool)} adapter(s) of '{target.info.base_model}' are available "
            f"on {target.url}; upload more with --provision {count}, or serve more from disk"
        )
    return target.pool[:count]


# --------------------------------------------------------------------------------------------------
# One run


def build_workload(args: argparse.Namespace, adapters: list[str]) -> Workload:
    try:
        trace = load_trace(args.trace) if args.trace else None
        prompts = load_prompts(args.prompts) if args.prompts else None
        arrivals = None
        if trace is None and (args.rate is not None or args.concurrency is None):
            arrivals = ArrivalProcess(args.rate if args.rate is not None else float("inf"), args.cv)
        # Chat has no token-id prompts, so it always gets text.
        prompt_mode = "text" if args.endpoint == "chat" else args.prompt_mode
        return Workload(
            adapters=adapters,
            popularity=Popularity.parse(args.popularity),
            base_share=args.base_share,
            input_len=LengthSpec.parse(str(args.input_len)),
            output_len=LengthSpec.parse(str(args.output_len)),
            prompt_mode=prompt_mode,
            prompts=prompts,
            arrivals=arrivals,
            trace=trace,
            trace_speed=args.trace_speed,
            seed=args.seed,
        )
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None


def build_limits(args: argparse.Namespace, workload: Workload) -> RunLimits:
    if args.warmup and workload.arrivals is not None and workload.arrivals.kind == "all-at-once" \
            and args.concurrency is None:
        # Every request is due at t=0, so seconds of warm-up would send without end.
        raise UsageError("--warmup SECONDS needs paced traffic: give --rate or --concurrency "
                         "(or warm up with --warmup-requests N)")
    num = args.num_requests
    if num is None and args.duration is None:
        num = max(len(workload.trace) - args.warmup_requests, 1) if workload.trace else DEFAULT_NUM_REQUESTS
    try:
        return RunLimits(num, args.duration, args.warmup_requests, args.warmup, args.concurrency, args.request_timeout)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def client_config(args: argparse.Namespace, base_model: str) -> ClientConfig:
    return ClientConfig(
        url=args.url.rstrip("/"), base_model=base_model, endpoint=args.endpoint, adapter_field=args.adapter_field,
        ignore_eos=args.ignore_eos, temperature=args.temperature, extra_body=args.extra_body, api_key=args.api_key,
        served_by_header=args.served_by_header,
    )


def slo_of(args: argparse.Namespace) -> SLO:
    return SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2el_ms)


def describe_run(args: argparse.Namespace, target: Target, workload: Workload, limits: RunLimits) -> dict[str, Any]:
    """The run's settings, recorded in results.json (enough to repeat it)."""
    if workload.trace is not None:
        arrivals = f"trace {args.trace} (x{args.trace_speed:g})"
    elif workload.arrivals is None:
        arrivals = f"closed loop, {limits.concurrency} concurrent"
    else:
        arrivals = f"{workload.arrivals.kind} at {workload.arrivals.rate:g} req/s" + (
            f", CV {workload.arrivals.cv:g}" if workload.arrivals.kind == "gamma" else "")
        if limits.concurrency:
            arrivals += f", at most {limits.concurrency} in flight"
    rate = workload.arrivals.rate if workload.arrivals is not None else None
    return {
        "url": target.url,
        "model": target.info.base_model,
        "endpoint": args.endpoint,
        "adapter_field": args.adapter_field,
        "arrivals": arrivals,
        "rate": "inf" if rate == float("inf") else rate,
        "cv": workload.arrivals.cv if workload.arrivals is not None else None,
        "concurrency": limits.concurrency,
        "num_requests": limits.num_requests,
        "duration": limits.duration_s,
        "warmup_s": limits.warmup_s,
        "warmup_requests": limits.warmup_requests,
        "popularity": str(workload.popularity) if workload.adapters else None,
        "adapters": len(workload.adapters),
        "adapter_ids": workload.adapters if len(workload.adapters) <= 64 else workload.adapters[:64] + ["..."],
        "base_share": workload.base_share,
        "input_len": str(workload.input_len) if workload.prompts is None else f"from {args.prompts}",
        "output_len": str(workload.output_len),
        "prompt_mode": workload.prompt_mode,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "seed": args.seed,
        "preset": args.preset,
        "provisioned": len(target.provisioned.created) + len(target.provisioned.existing),
        "rank": args.rank if args.provision else None,
        "adapter_kind": ",".join(args.adapter_kind) if args.provision else None,
    }


async def execute_run(args: argparse.Namespace, http: httpx.AsyncClient, target: Target, out: Path) -> dict[str, Any]:
    """One run against a prepared target; writes results.json, summary.md and the PNGs under `out`."""
    adapters = choose_adapters(target, args.adapters)
    workload = build_workload(args, adapters)
    limits = build_limits(args, workload)
    config = describe_run(args, target, workload, limits)
    progress = Progress(limits.max_sent, limits.deadline_s, enabled=not args.no_progress)
    _say(f"load test of {target.url} ({target.info.base_model}): {config['arrivals']}, "
         f"{len(adapters)} adapter(s)" + (f" {config['popularity']}" if adapters else "")
         + f", base share {workload.base_share:g}")
    outcome = await run_load(workload.requests(), client_config(args, target.info.base_model), limits, progress, http)
    report = build_report(outcome, config, slo_of(args))
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / RESULTS_JSON)
    (out / SUMMARY_MD).write_text(markdown_summary(report), encoding="utf-8")
    written = [out / RESULTS_JSON, out / SUMMARY_MD]
    if not args.no_plots:
        written += draw_plots(lambda: write_run_plots(outcome.results, out))
    _say_written(written)
    return report


def draw_plots(draw: Callable[[], list[Path]]) -> list[Path]:
    """The PNGs `draw` writes; without matplotlib none, and a line that says how to get it."""
    try:
        return draw()
    except ImportError as exc:
        _say(f"no PNGs written ({exc}); {PLOTS_HINT}")
        return []


def _say_written(paths: list[Path]) -> None:
    _say("wrote " + ", ".join(map(str, paths)))


def run_command(args: argparse.Namespace) -> int:
    report = asyncio.run(_run(args))
    print(markdown_summary(report), end="")
    return 0 if report["completed"] or not report["num_prompts"] else 1


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    async with make_http_client(args.request_timeout) as http:
        target = await _prepare_or_fail(args, http, args.provision)
        try:
            return await execute_run(args, http, target, args.out)
        finally:
            await _cleanup(args, http, target)


async def _prepare_or_fail(args: argparse.Namespace, http: httpx.AsyncClient, count: int) -> Target:
    try:
        return await prepare_target(args, http, count)
    except ProvisioningError as exc:
        raise UsageError(str(exc)) from None


async def _cleanup(args: argparse.Namespace, http: httpx.AsyncClient, target: Target) -> None:
    if not args.cleanup or not target.provisioned.created:
        return
    failures = await cleanup(http, target.url, target.provisioned.created, target.headers)
    _say(f"deleted {len(target.provisioned.created) - len(failures)} adapter(s) this run uploaded")
    for failure in failures:
        _say(f"  {failure}")


# --------------------------------------------------------------------------------------------------
# Sweep

SWEEP_COLUMNS = (
    "completed", "failed", "request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms",
    "p50_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p50_e2el_ms", "p99_e2el_ms", "slo_attainment",
)
RATIOS = ("output_throughput", "request_throughput", "p50_ttft_ms", "p50_tpot_ms", "p50_e2el_ms")


def sweep_values(args: argparse.Namespace) -> tuple[str, list[Any]]:
    knob = SWEEP_KNOBS[args.vary]
    dest = knob.dest
    values = []
    for raw in (v.strip() for v in args.values.split(",")):
        if not raw:
            continue
        try:
            value = knob.convert(raw)
            if dest == "popularity":
                Popularity.parse(value)
            elif dest in ("input_len", "output_len"):
                LengthSpec.parse(value)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise UsageError(f"--values: {raw!r} is not a valid {args.vary}: {exc}") from None
        values.append(value)
    if not values:
        raise UsageError("--values lists no values")
    return dest, values


def sweep_row(value: Any, report: dict[str, Any], first: dict[str, Any] | None) -> dict[str, Any]:
    row = {"value": value} | {k: report.get(k) for k in SWEEP_COLUMNS}
    for key in RATIOS:
        ref = (first or row).get(key)
        row[f"{key}_ratio"] = row[key] / ref if row[key] is not None and ref else None
    return row


def sweep_command(args: argparse.Namespace) -> int:
    rows = asyncio.run(_sweep(args))
    markdown = sweep_markdown(args.vary, rows)
    print(markdown, end="")
    return 0 if all(r["completed"] for r in rows) else 1


async def _sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    dest, values = sweep_values(args)
    provision_count = args.provision
    if dest == "adapters" and provision_count:
        provision_count = max(provision_count, max(values))  # enough for the largest point
    rounds: list[list[dict[str, Any]]] = []
    async with make_http_client(args.request_timeout) as http:
        target = await _prepare_or_fail(args, http, provision_count)
        try:
            # Round-robin over the values, `repeats` times: slow drifts of a shared machine then hit every
            # value alike instead of whichever happened to run during them.
            for repeat in range(args.repeats):
                reports = []
                for value in values:
                    point = copy.copy(args)
                    setattr(point, dest, value)
                    out = args.out / f"{args.vary}={value}"
                    if args.repeats > 1:
                        out = out / f"repeat-{repeat}"
                    _say(f"--- {args.vary} = {value}" + (f" (round {repeat + 1}/{args.repeats})" if args.repeats > 1
                                                          else ""))
                    report = await execute_run(point, http, target, out)
                    if report["interrupted"]:
                        raise KeyboardInterrupt  # Ctrl-C ends the sweep, not just this point
                    reports.append(report)
                    await asyncio.sleep(args.cooldown)  # let the server drain before the next point
                rounds.append(reports)
        finally:
            await _cleanup(args, http, target)
    rows: list[dict[str, Any]] = []
    for i, value in enumerate(values):
        rows.append(sweep_row(value, median_report([r[i] for r in rounds]), rows[0] if rows else None))
    args.out.mkdir(parents=True, exist_ok=True)
    per_round = [[sweep_row(v, r, None) for v, r in zip(values, reports, strict=True)] for reports in rounds]
    written = [args.out / "sweep.json", args.out / "sweep.md"]
    write_json({"knob": args.vary, "repeats": args.repeats, "rows": rows, "rounds": per_round}, written[0])
    written[1].write_text(sweep_markdown(args.vary, rows), encoding="utf-8")
    if not args.no_plots:
        written += draw_plots(lambda: [plot_sweep(rows, args.vary, args.out / "sweep.png")])
    _say_written(written)
    return rows


def median_report(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Each sweep column's median over repeated runs of one point (counts are summed)."""
    if len(reports) == 1:
        return reports[0]
    merged: dict[str, Any] = {}
    for key in SWEEP_COLUMNS:
        values = [r.get(key) for r in reports if r.get(key) is not None]
        if key in ("completed", "failed"):
            merged[key] = sum(values)
        else:
            merged[key] = float(statistics.median(values)) if values else None
    return merged


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def sweep_markdown(knob: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"| {knob} | ok | failed | req/s | output tok/s | tok/s vs first | p50 TTFT ms | p99 TTFT ms | "
        "p50 TPOT ms | p50 E2EL ms | p99 E2EL ms | p50 E2EL vs first |",
        "| --- |" + " ---: |" * 11,
    ]
    for r in rows:
        lines.append(
            f"| {r['value']} | {r['completed']} | {r['failed']} | {_cell(r['request_throughput'], 2)} | "
            f"{_cell(r['output_throughput'])} | {_cell(r['output_throughput_ratio'], 2)} | {_cell(r['p50_ttft_ms'])} | "
            f"{_cell(r['p99_ttft_ms'])} | {_cell(r['p50_tpot_ms'])} | {_cell(r['p50_e2el_ms'])} | "
            f"{_cell(r['p99_e2el_ms'])} | {_cell(r['p50_e2el_ms_ratio'], 2)} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Compare, write-adapters


COMPARE_ROWS = (
    ("requests ok / failed", None),
    ("request throughput (req/s)", "request_throughput"),
    ("output throughput (tok/s)", "output_throughput"),
    ("mean TTFT (ms)", "mean_ttft_ms"), ("p50 TTFT (ms)", "median_ttft_ms"), ("p99 TTFT (ms)", "p99_ttft_ms"),
    ("mean TPOT (ms)", "mean_tpot_ms"), ("p50 TPOT (ms)", "median_tpot_ms"), ("p99 TPOT (ms)", "p99_tpot_ms"),
    ("p50 ITL (ms)", "median_itl_ms"), ("p99 ITL (ms)", "p99_itl_ms"),
    ("p50 E2EL (ms)", "median_e2el_ms"), ("p99 E2EL (ms)", "p99_e2el_ms"),
    ("SLO attainment", "slo_attainment"),
)


def compare_command(args: argparse.Namespace) -> int:
    paths = [p / RESULTS_JSON if p.is_dir() else p for p in args.results]
    try:
        reports = [json.loads(p.read_text()) for p in paths]
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(str(exc)) from None
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [p.parent.name or str(p) for p in paths]
    if len(labels) != len(reports):
        raise UsageError(f"--labels names {len(labels)} runs, but {len(reports)} were given")
    lines = ["| metric | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    for title, key in COMPARE_ROWS:
        if key is None:
            cells = [f"{r['completed']} / {r['failed']}" for r in reports]
        else:
            cells = [_cell(r.get(key), 2) for r in reports]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    print(markdown, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.md").write_text(markdown, encoding="utf-8")
        runs = {label: load_results(r) for label, r in zip(labels, reports, strict=True)}
        _say_written([args.out / "compare.md",
                      *draw_plots(lambda: [plot_compare_cdfs(runs, args.out / "compare_cdf.png")])])
    return 0


def write_adapters_command(args: argparse.Namespace) -> int:
    if args.demo:
        dims = DEMO_DIMS
    else:
        try:
            dims = resolve_dims(_dims_flags(args), None, _model_config(args), args.base_model or "the base model")
        except ProvisioningError as exc:
            raise UsageError(str(exc).replace("its model card publishes no 'dims'", "no dimensions given")) from None
    ids = write_adapters(args.directory, args.count, dims, adapter_spec(args), args.adapter_prefix, args.seed,
                         args.base_model, args.adapter_kind)
    print(f"wrote {len(ids)} adapters ({ids[0]} .. {ids[-1]}, {_describe_adapters(args)}) to {args.directory}")
    return 0

