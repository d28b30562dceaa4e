"""Summaries of a run's results: throughput, latency percentiles, errors by kind, SLO attainment.

Key names follow `vllm bench serve`'s result file (`request_throughput`, `output_throughput`,
`mean_ttft_ms`, `median_ttft_ms`, `p99_ttft_ms`, ... for ttft, tpot, itl and e2el), so tooling written
for its JSON reads ours. Latencies are milliseconds, throughputs per second.

The measurement window runs from the first measured request's start to the last measured request's
finish: warm-up is outside it, and per-adapter throughputs share it, so they add up to the total.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.client import RequestResult

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")
BASE_LABEL = "(base)"  # the base model's row in per-adapter tables


@dataclass(frozen=True)
class SLO:
    """Latency targets in ms; a request meets the SLO if it succeeded and meets every target given.
    A one-token response has no TPOT and passes that target."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @property
    def defined(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))

    def met_by(self, r: RequestResult) -> bool:
        if not r.success:
            return False
        checks = ((self.ttft_ms, r.ttft), (self.tpot_ms, r.tpot), (self.e2el_ms, r.e2el))
        return all(target is None or value is None or value * 1000.0 <= target for target, value in checks)

    def to_json(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("e2el", self.e2el_ms))
                if v is not None}


def latency_stats(name: str, seconds: Sequence[float]) -> dict[str, float | None]:
    """`mean_<name>_ms`, `median_`, `std_`, `min_`, `max_`, `p50_`, `p90_`, `p99_` (None when empty)."""
    keys = ["mean", "median", "std", "min", "max", *(f"p{p}" for p in PERCENTILES)]
    if not len(seconds):
        return {f"{k}_{name}_ms": None for k in keys}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    values = [ms.mean(), np.median(ms), ms.std(), ms.min(), ms.max(), *np.percentile(ms, PERCENTILES)]
    return {f"{k}_{name}_ms": float(v) for k, v in zip(keys, values, strict=True)}


def measured(results: Iterable[RequestResult]) -> list[RequestResult]:
    return [r for r in results if not r.warmup]


def window_s(results: Sequence[RequestResult]) -> float:
    if not results:
        return 0.0
    return max(r.finish for r in results) - min(r.start for r in results)


def summarize(
    results: Sequence[RequestResult], slo: SLO | None = None, duration_s: float | None = None
) -> dict[str, Any]:
    """The summary of `results` (warm-up already excluded by the caller). `duration_s` overrides the
    window (per-adapter summaries pass the whole run's)."""
    duration = window_s(results) if duration_s is None else duration_s
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else (r.input_len or 0) for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    summary: dict[str, Any] = {
        "duration": duration,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
    }
    samples = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.e2el for r in ok if r.e2el is not None],
    }
    for name in METRICS:
        summary |= latency_stats(name, samples[name])
    slo = slo or SLO()
    if slo.defined:
        good = sum(slo.met_by(r) for r in results)
        summary["request_goodput"] = per_s(good)
        summary["slo_attainment"] = good / len(results) if results else 0.0
        summary["slo_ms"] = slo.to_json()
    else:
        summary["request_goodput"] = None
        summary["slo_attainment"] = None
    summary["errors_by_kind"] = dict(Counter(r.error_kind for r in results if not r.success))
    summary |= replica_spread(ok)
    return summary


def replica_spread(ok: Sequence[RequestResult]) -> dict[str, Any]:
    """Where a router sent the requests, from each answer's served-by header: `served_by` (requests per replica)
    and `adapter_affinity`, the share of adapter requests that went to their adapter's usual replica (the one that
    served most of that adapter's), 1.0 when every adapter stayed on one replica. None without the header."""
    by_adapter: dict[str, Counter[str]] = defaultdict(Counter)
    for r in ok:
        if r.served_by is not None and r.adapter is not None:
            by_adapter[r.adapter][r.served_by] += 1
    routed = sum(sum(replicas.values()) for replicas in by_adapter.values())
    return {
        "served_by": dict(Counter(r.served_by for r in ok if r.served_by is not None)) or None,
        "adapter_affinity": (sum(max(replicas.values()) for replicas in by_adapter.values()) / routed
                             if routed else None),
    }


def summarize_per_adapter(results: Sequence[RequestResult], slo: SLO | None = None) -> dict[str, dict[str, Any]]:
    """One summary per adapter (the base model as `(base)`), all over the whole run's window."""
    groups: dict[str, list[RequestResult]] = defaultdict(list)
    for r in results:
        groups[r.adapter if r.adapter is not None else BASE_LABEL].append(r)
    duration = window_s(results)
    return {name: summarize(group, slo, duration) for name, group in sorted(groups.items(), key=_by_count)}


def _by_count(item: tuple[str, list[RequestResult]]) -> tuple[int, str]:
    return (-len(item[1]), item[0])
