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
    figures = {
        LATENCY_CDF: latency_cdf_figure(results),
        THROUGHPUT_OVER_TIME: throughput_figure(results),
        LATENCY_OVER_TIME: latency_over_time_figure(results),
    }
    return [_save(figure, directory / name) for name, figure in figures.items()]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _counted(label: str, count: int) -> str:
    return f"{label} (n={count:,})"


def _cdf(ax: Any, samples_s: Sequence[float], label: str) -> None:
    values = np.sort(np.asarray(samples_s, dtype=np.float64) * 1000.0)
    if len(values):
        ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=_counted(label, len(values)))


def latency_cdf_figure(results: Sequence[RequestResult]) -> Any:
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
            _cdf(ax, _samples(group, name), label)
        _cdf_axes(ax, title)
    fig.suptitle(f"latency CDFs ({len(ok)} measured requests)")
    return fig


def _cdf_axes(ax: Any, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("share of samples")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize="small")


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


# A rate drawn per bucket from one or two requests swings between 0 and twice the truth; buckets are
# made wide enough to hold about this many requests on average.
REQUESTS_PER_BUCKET = 10


def _bucket_s(results: Sequence[RequestResult]) -> float:
    """About 60 buckets over the run, fewer if that leaves too few requests in each, on a 1-2-5 grid."""
    span = max((r.finish for r in results), default=1.0)
    raw = max(span / 60.0, span * REQUESTS_PER_BUCKET / max(len(results), 1), 0.05)
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


def throughput_figure(results: Sequence[RequestResult]) -> Any:
    """Requests sent, completed and failed per second, and output tokens per second, over the run."""
    plt = _pyplot()
    bucket = _bucket_s(results)
    end = max((r.finish for r in results), default=bucket)
    edges = np.arange(0.0, end + bucket, bucket)
    mids = edges[:-1] + bucket / 2
    finished_ok = [r.finish for r in results if r.success]
    finished_failed = [r.finish for r in results if not r.success]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.plot(mids, np.histogram([r.start for r in results], bins=edges)[0] / bucket, alpha=0.6,
             label=_counted("sent", len(results)))
    top.plot(mids, np.histogram(finished_ok, bins=edges)[0] / bucket, label=_counted("completed", len(finished_ok)))
    if finished_failed:
        top.plot(mids, np.histogram(finished_failed, bins=edges)[0] / bucket, color="red",
                 label=_counted("failed", len(finished_failed)))
    top.set_ylabel("requests/s")
    pairs = [token_times(r) for r in results]
    times = np.concatenate([t for t, _ in pairs]) if pairs else np.empty(0)
    weights = np.concatenate([w for _, w in pairs]) if pairs else np.empty(0)
    tokens = np.histogram(times, bins=edges, weights=weights)[0] / bucket
    bottom.plot(mids, tokens, color="tab:green", label=_counted("output tokens", round(weights.sum())))
    bottom.set_ylabel("output tokens/s")
    bottom.set_xlabel(f"seconds since start ({bucket:g} s buckets)")
    for ax in (top, bottom):
        _from_zero(ax)  # a rate's scale starts at zero: a 2 % dip must not look like a cliff
        _shade_warmup(ax, results)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("throughput over time")
    return fig


def _from_zero(ax: Any) -> None:
    """The y axis from zero to a little above the data (its own margin would be of the data's range)."""
    top = ax.dataLim.y1 if ax.has_data() else 0.0
    ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)


# A percentile of a window is drawn only when the window holds this many samples: about five beyond
# it (the p99 of a few requests is just their maximum).
SAMPLES_FOR_PERCENTILE = {50: 10, 90: 50, 99: 500}
WINDOWS = 40  # latency windows per run at most


def latency_windows(starts: np.ndarray, values: np.ndarray) -> tuple[int, dict[int, tuple[list[float], list[float]]]]:
    """Percentiles of `values` over windows of consecutive requests (by start), each window holding at
    least as many requests as its widest percentile needs. Returns the smallest window's size and, for
    each percentile the windows are large enough for, its (mean start, value) per window."""
    size = max(min(SAMPLES_FOR_PERCENTILE.values()), math.ceil(len(values) / WINDOWS))
    if len(values) < size:
        return len(values), {}
    windows = np.array_split(np.argsort(starts, kind="stable"), len(values) // size)
    size = min(len(w) for w in windows)
    xs = [float(starts[w].mean()) for w in windows]
    return size, {
        q: (xs, [float(np.percentile(values[w], q)) for w in windows])
        for q, needed in SAMPLES_FOR_PERCENTILE.items() if size >= needed
    }


def latency_over_time_figure(results: Sequence[RequestResult]) -> Any:
    """Each request's TTFT and E2EL at its start time, with percentiles over windows of requests drawn
    through them (only those percentiles the windows hold enough requests for)."""
    plt = _pyplot()
    ok = [r for r in results if r.success]
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for ax, name in zip(axes, ("ttft", "e2el"), strict=True):
        points = [(r.start, getattr(r, name) * 1000.0) for r in ok if getattr(r, name) is not None]
        if points:
            starts, values = (np.asarray(x) for x in zip(*points, strict=True))
            ax.scatter(starts, values, s=4, alpha=0.4, label=_counted("requests", len(values)))
            size, lines = latency_windows(starts, values)
            for q, (xs, ys) in lines.items():
                ax.plot(xs, ys, marker=".", label=f"p{q} per window of {size}+ requests")
        ax.set_ylabel(f"{name.upper()} (ms)")
        _from_zero(ax)
        _shade_warmup(ax, results)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("request start, seconds since start")
    fig.suptitle("latency over time")
    return fig


def _shade_warmup(ax: Any, results: Sequence[RequestResult]) -> None:
    warm = [r.start for r in results if r.warmup]
    measured = [r.start for r in results if not r.warmup]
    if warm and measured:
        ax.axvspan(0, min(measured), color="grey", alpha=0.15, label=_counted("warm-up, excluded", len(warm)))


def _per_point(counts: Sequence[int]) -> str:
    low, high = min(counts, default=0), max(counts, default=0)
    return f"n={low:,}" if low == high else f"n={low:,}-{high:,}"


def sweep_figure(rows: Sequence[dict[str, Any]], knob: str) -> Any:
    """Throughput and latency against the swept knob: S-LoRA's and Punica's figure when the knob is the
    number of distinct adapters. Each panel has its own axes: with fixed output lengths the request and
    token curves have the same shape, and on twin axes one would hide the other."""
    plt = _pyplot()
    labels = [str(r["value"]) for r in rows]
    numeric = all(isinstance(r["value"], int | float) for r in rows)
    xs: Sequence[float] = [float(r["value"]) for r in rows] if numeric else list(range(len(rows)))
    per_point = _per_point([r["completed"] or 0 for r in rows])
    fig, (tokens, requests, latency) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    tokens.plot(xs, [r["output_throughput"] for r in rows], marker="o", label=f"output tokens/s ({per_point})")
    tokens.set_ylabel("output tokens/s")
    requests.plot(xs, [r["request_throughput"] for r in rows], marker="s", color="tab:orange",
                  label=f"completed requests/s ({per_point})")
    requests.set_ylabel("requests/s")
    for key, style in (("p50_ttft_ms", "o-"), ("p99_ttft_ms", "o--"), ("p50_e2el_ms", "s-"), ("p99_e2el_ms", "s--")):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            latency.plot(xs, [math.nan if v is None else v for v in values], style,
                         label=f"{key.replace('_ms', '')} ({per_point})")
    latency.set_ylabel("ms")
    # Adapter counts and rates span decades (1 to 1,000): a log axis keeps the small end readable
    # (symlog when the sweep includes 0, the base model alone).
    if numeric and max(xs) / max(min(xs), 1.0) >= 20:
        if min(xs) > 0:
            latency.set_xscale("log")
        else:
            latency.set_xscale("symlog", linthresh=1.0)
    if not numeric:
        latency.set_xticks(xs, labels)
    elif numeric and len(xs) <= 12:
        latency.set_xticks(xs, labels)
        latency.minorticks_off()
    latency.set_xlabel(knob)
    for ax in (tokens, requests, latency):
        _from_zero(ax)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    fig.suptitle(f"sweep over {knob}")
    return fig


def plot_sweep(rows: Sequence[dict[str, Any]], knob: str, path: Path) -> Path:
    return _save(sweep_figure(rows, knob), path)


def ratio_sweeps_figure(sweeps: dict[str, Sequence[dict[str, Any]]], knob: str) -> Any:
    """Output tokens/s and p50 TTFT against the swept knob as ratios to each sweep's first point, a line per sweep
    (e.g. per adapter popularity): S-LoRA's question, what serving more adapters costs, with sweeps whose absolute
    numbers differ (a 2-core machine drifts between them) read on one scale."""
    plt = _pyplot()
    fig, (tokens, ttft) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for label, rows in sweeps.items():
        xs = [float(r["value"]) for r in rows]
        per_point = _per_point([r["completed"] or 0 for r in rows])
        tokens.plot(xs, [r["output_throughput_ratio"] for r in rows], marker="o", label=f"{label} ({per_point})")
        ttft.plot(xs, [r["p50_ttft_ms_ratio"] for r in rows], marker="o", label=f"{label} ({per_point})")
    tokens.set_ylabel("output tokens/s vs first point")
    ttft.set_ylabel("p50 TTFT vs first point")
    values = sorted({float(r["value"]) for rows in sweeps.values() for r in rows})
    if values and min(values) > 0 and values[-1] / values[0] >= 20:  # adapter counts span decades
        ttft.set_xscale("log")
        ttft.set_xticks(values, [f"{v:g}" for v in values])
        ttft.minorticks_off()
    ttft.set_xlabel(knob)
    for ax in (tokens, ttft):
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        _from_zero(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"sweeps over {knob}, relative to their first point")
    return fig


def plot_ratio_sweeps(sweeps: dict[str, Sequence[dict[str, Any]]], knob: str, path: Path) -> Path:
    return _save(ratio_sweeps_figure(sweeps, knob), path)


def compare_cdfs_figure(runs: dict[str, Sequence[RequestResult]]) -> Any:
    """The four latency CDFs with one curve per run: servers (or settings) side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, title) in zip(axes.flat, _LATENCIES.items(), strict=True):
        for label, results in runs.items():
            _cdf(ax, _samples([r for r in results if r.success and not r.warmup], name), label)
        _cdf_axes(ax, title)
    fig.suptitle("latency CDFs, run by run")
    return fig


def plot_compare_cdfs(runs: dict[str, Sequence[RequestResult]], path: Path) -> Path:
    return _save(compare_cdfs_figure(runs), path)
