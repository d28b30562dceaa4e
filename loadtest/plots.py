"""PNG plots of a run (latency CDFs, throughput and latency over time) and of a sweep.

matplotlib is imported inside the functions with the non-interactive Agg backend, so the harness
runs on a headless machine and `import loadtest` stays light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.client import RequestResult

LATENCY_CDF = "latency_cdf.png"
THROUGHPUT_OVER_TIME = "throughput_over_time.png"
LATENCY_OVER_TIME = "latency_over_time.png"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_run_plots(results: Sequence[RequestResult], directory: Path) -> list[Path]:
    """The three plots of one run; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / LATENCY_CDF, directory / THROUGHPUT_OVER_TIME, directory / LATENCY_OVER_TIME]
    plot_latency_cdfs(results, paths[0])
    plot_throughput_over_time(results, paths[1])
    plot_latency_over_time(results, paths[2])
    return paths


def plot_latency_cdfs(results: Sequence[RequestResult], path: Path) -> None:
    """TTFT, TPOT, ITL and E2EL CDFs of the measured requests: all, and split into base-model and
    adapter requests when the run had both (the cost of LoRA shows as the gap between the curves)."""
    plt = _pyplot()
    ok = [r for r in results if r.success and not r.warmup]
    groups = {"all": ok}
    base = [r for r in ok if r.adapter is None]
    if base and len(base) < len(ok):
        groups |= {"base model": base, "adapters": [r for r in ok if r.adapter is not None]}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, title) in zip(axes.flat, _LATENCIES.items(), strict=True):
        for label, group in groups.items():
            values = np.sort(np.asarray(_samples(group, name), dtype=np.float64) * 1000.0)
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=label)
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("share of samples")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize="small")
    fig.suptitle(f"latency CDFs ({len(ok)} measured requests)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_LATENCIES = {
    "ttft": "time to first token",
    "tpot": "time per output token",
    "itl": "inter-token latency",
    "e2el": "end-to-end latency",
}


def _samples(results: Sequence[RequestResult], name: str) -> list[float]:
    if name == "itl":
        return [x for r in results for x in r.itl]
    if name == "tpot":
        return [t for r in results if (t := r.tpot) is not None]
    return [v for r in results if (v := getattr(r, name)) is not None]


def _bucket_s(results: Sequence[RequestResult]) -> float:
    """About 60 buckets over the run, on a 1-2-5 grid of sizes."""
    span = max((r.finish for r in results), default=1.0)
    raw = max(span / 60.0, 0.05)
    scale = 10 ** math.floor(math.log10(raw))
    return next(m * scale for m in (1, 2, 5, 10) if m * scale >= raw)


def token_times(r: RequestResult) -> tuple[np.ndarray, np.ndarray]:
    """Times (relative to t0) of a request's token chunks, and the tokens each carried: when the server
    counted more tokens than it sent chunks, each chunk stands for its share."""
    if not r.success or r.ttft is None:
        return np.empty(0), np.empty(0)
    times = r.start + r.ttft + np.concatenate(([0.0], np.cumsum(r.itl)))
    weight = r.output_tokens / len(times) if r.output_tokens else 1.0
    return times, np.full(len(times), weight)


def plot_throughput_over_time(results: Sequence[RequestResult], path: Path) -> None:
    plt = _pyplot()
    bucket = _bucket_s(results)
    end = max((r.finish for r in results), default=bucket)
    edges = np.arange(0.0, end + bucket, bucket)
    done = np.histogram([r.finish for r in results if r.success], bins=edges)[0] / bucket
    failed = np.histogram([r.finish for r in results if not r.success], bins=edges)[0] / bucket
    sent = np.histogram([r.start for r in results], bins=edges)[0] / bucket
    pairs = [token_times(r) for r in results]
    times = np.concatenate([t for t, _ in pairs]) if pairs else np.empty(0)
    weights = np.concatenate([w for _, w in pairs]) if pairs else np.empty(0)
    tokens = np.histogram(times, bins=edges, weights=weights)[0] / bucket
    mids = edges[:-1] + bucket / 2
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.plot(mids, sent, label="sent", alpha=0.6)
    top.plot(mids, done, label="completed")
    if failed.any():
        top.plot(mids, failed, label="failed", color="red")
    top.set_ylabel("requests/s")
    top.legend(fontsize="small")
    bottom.plot(mids, tokens, color="tab:green")
    bottom.set_ylabel("output tokens/s")
    bottom.set_xlabel(f"seconds since start ({bucket:g} s buckets)")
    for ax in (top, bottom):
        _shade_warmup(ax, results)
        ax.grid(alpha=0.3)
    fig.suptitle("throughput over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_latency_over_time(results: Sequence[RequestResult], path: Path) -> None:
    """Each request's TTFT and E2EL at its start time, with the p50/p99 per bucket drawn through them."""
    plt = _pyplot()
    ok = [r for r in results if r.success]
    bucket = _bucket_s(results)
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for ax, name in zip(axes, ("ttft", "e2el"), strict=True):
        points = [(r.start, getattr(r, name) * 1000.0) for r in ok if getattr(r, name) is not None]
        if points:
            starts, values = (np.asarray(x) for x in zip(*points, strict=True))
            ax.scatter(starts, values, s=4, alpha=0.4, label="requests")
            keys = np.floor(starts / bucket).astype(int)
            mids, p50, p99 = [], [], []
            for key in np.unique(keys):
                chosen = values[keys == key]
                mids.append((key + 0.5) * bucket)
                p50.append(np.percentile(chosen, 50))
                p99.append(np.percentile(chosen, 99))
            ax.plot(mids, p50, label="p50")
            ax.plot(mids, p99, label="p99")
            ax.legend(fontsize="small")
        ax.set_ylabel(f"{name.upper()} (ms)")
        _shade_warmup(ax, results)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("request start, seconds since start")
    fig.suptitle("latency over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _shade_warmup(ax: Any, results: Sequence[RequestResult]) -> None:
    warm = [r.start for r in results if r.warmup]
    measured = [r.start for r in results if not r.warmup]
    if warm and measured:
        ax.axvspan(0, min(measured), color="grey", alpha=0.15, label="_warm-up")


def plot_sweep(rows: Sequence[dict[str, Any]], knob: str, path: Path) -> None:
    """Throughput and latency against the swept knob: S-LoRA's and Punica's figure when the knob is the
    number of distinct adapters."""
    plt = _pyplot()
    labels = [str(r["value"]) for r in rows]
    numeric = all(isinstance(r["value"], int | float) for r in rows)
    xs: Sequence[float] = [float(r["value"]) for r in rows] if numeric else list(range(len(rows)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.plot(xs, [r["output_throughput"] for r in rows], marker="o", label="output tokens/s")
    top.set_ylabel("output tokens/s")
    right = top.twinx()
    # Dashed: with fixed output lengths the two curves coincide, and a solid one would hide the other.
    right.plot(xs, [r["request_throughput"] for r in rows], "s--", color="tab:orange", label="requests/s")
    right.set_ylabel("requests/s")
    top.legend(loc="upper left", fontsize="small")
    right.legend(loc="upper right", fontsize="small")
    for key, style in (("p50_ttft_ms", "o-"), ("p99_ttft_ms", "o--"), ("p50_e2el_ms", "s-"), ("p99_e2el_ms", "s--")):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            bottom.plot(xs, [math.nan if v is None else v for v in values], style, label=key.replace("_ms", ""))
    bottom.set_ylabel("ms")
    bottom.legend(fontsize="small")
    # Adapter counts and rates span decades (1 to 1,000): a log axis keeps the small end readable
    # (symlog when the sweep includes 0, the base model alone).
    if numeric and max(xs) / max(min(xs), 1.0) >= 20:
        if min(xs) > 0:
            bottom.set_xscale("log")
        else:
            bottom.set_xscale("symlog", linthresh=1.0)
    if not numeric:
        bottom.set_xticks(xs, labels)
    elif numeric and len(xs) <= 12:
        bottom.set_xticks(xs, labels)
        bottom.minorticks_off()
    bottom.set_xlabel(knob)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep over {knob}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compare_cdfs(runs: dict[str, Sequence[RequestResult]], path: Path) -> None:
    """The four latency CDFs with one curve per run: servers (or settings) side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, title) in zip(axes.flat, _LATENCIES.items(), strict=True):
        for label, results in runs.items():
            ok = [r for r in results if r.success and not r.warmup]
            values = np.sort(np.asarray(_samples(ok, name), dtype=np.float64) * 1000.0)
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=label)
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("latency CDFs, run by run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
