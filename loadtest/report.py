"""The run's files: `results.json` (every request's timings + the summary) and `summary.md`.

`results.json` keeps `vllm bench serve`'s top-level keys (summary metrics, `num_prompts`,
`request_rate`, `burstiness`, `max_concurrency`, `model_id`, and its per-request lists `input_lens`,
`output_lens`, `ttfts`, `itls`, `errors`), and adds ours: `per_adapter`, `errors_by_kind`,
`slo_attainment`, `config`, and `requests` with every request's full record.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.client import RequestResult
from loadtest.metrics import SLO, measured, summarize, summarize_per_adapter
from loadtest.runner import RunOutcome

PER_ADAPTER_ROWS = 20  # Markdown shows the busiest adapters; the JSON has them all


def build_report(outcome: RunOutcome, config: dict[str, Any], slo: SLO | None = None) -> dict[str, Any]:
    """The whole result document. `config` describes the run (see `cli.describe_run`)."""
    results = measured(outcome.results)
    summary = summarize(results, slo)
    rate = config.get("rate")
    cv = config.get("cv") or 1.0
    return {
        "date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "tool": "lorahive-loadtest",
        "backend": "openai-chat" if config.get("endpoint") == "chat" else "openai",
        "base_url": config.get("url"),
        "model_id": config.get("model"),
        "num_prompts": len(results),
        "request_rate": "inf" if rate is None or (isinstance(rate, float) and math.isinf(rate)) else rate,
        "burstiness": 1.0 / (cv * cv),  # vLLM's name for the Gamma shape: CV = 1/sqrt(burstiness)
        "max_concurrency": config.get("concurrency"),
        **summary,
        "warmup_excluded": len(outcome.results) - len(results),
        "wall_time_s": outcome.wall_s,
        "interrupted": outcome.interrupted,
        "per_adapter": summarize_per_adapter(results, slo),
        "config": config,
        # vLLM's per-request lists (measured requests, seconds; 0.0 where a failed request has no value)
        "input_lens": [_input_len(r) for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft or 0.0 for r in results],
        "itls": [r.itl for r in results],
        "errors": [r.error or "" for r in results],
        "requests": [r.to_json() for r in outcome.results],
    }


def _input_len(r: RequestResult) -> int:
    return r.prompt_tokens if r.prompt_tokens is not None else (r.input_len or 0)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def load_results(report: dict[str, Any]) -> list[RequestResult]:
    """The `RequestResult`s back from a results.json (for re-plotting a finished run)."""
    fields = set(RequestResult.__dataclass_fields__)
    return [RequestResult(**{k: v for k, v in r.items() if k in fields}) for r in report["requests"]]


# --------------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_summary(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [f"# Load test: {report.get('base_url')}", ""]
    lines += [f"- {key}: `{value}`" for key, value in _describe(config)]
    lines += [
        "",
        "| result | value |",
        "| --- | --- |",
        f"| requests (measured) | {report['num_prompts']} ({report['completed']} ok, {report['failed']} failed) |",
        f"| warm-up requests excluded | {report['warmup_excluded']} |",
        f"| measured window (s) | {_fmt(report['duration'], 2)} |",
        f"| request throughput (req/s) | {_fmt(report['request_throughput'], 2)} |",
        f"| output token throughput (tok/s) | {_fmt(report['output_throughput'])} |",
        f"| total token throughput (tok/s) | {_fmt(report['total_token_throughput'])} |",
        f"| input / output tokens | {report['total_input_tokens']} / {report['total_output_tokens']} |",
    ]
    if report.get("slo_attainment") is not None:
        targets = ", ".join(f"{k} <= {v:g} ms" for k, v in report["slo_ms"].items())
        lines += [
            f"| SLO ({targets}) attainment | {report['slo_attainment']:.1%} |",
            f"| goodput (req/s) | {_fmt(report['request_goodput'], 2)} |",
        ]
    if report.get("served_by"):
        spread = ", ".join(f"{replica} {count}" for replica, count in sorted(report["served_by"].items()))
        lines.append(f"| requests per replica | {spread} |")
    if report.get("adapter_affinity") is not None:
        lines.append(f"| adapter requests on their adapter's usual replica | {report['adapter_affinity']:.1%} |")
    if report.get("interrupted"):
        lines.append("| interrupted | yes: partial results |")
    lines += ["", "| latency (ms) | mean | p50 | p90 | p99 | max |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    names = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency",
             "e2el": "end-to-end latency"}
    for key, title in names.items():
        cells = [_fmt(report.get(f"{stat}_{key}_ms"), 2) for stat in ("mean", "p50", "p90", "p99", "max")]
        lines.append(f"| {title} ({key.upper()}) | " + " | ".join(cells) + " |")
    if report["errors_by_kind"]:
        lines += ["", "| error | count | example |", "| --- | ---: | --- |"]
        examples = _error_examples(report["requests"])
        for kind, count in sorted(report["errors_by_kind"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {kind} | {count} | {examples.get(kind, '')} |")
    per_adapter = report["per_adapter"]
    if per_adapter:
        shown = list(per_adapter.items())[:PER_ADAPTER_ROWS]
        more = len(per_adapter) - len(shown)
        lines += [
            "",
            f"Per adapter ({len(per_adapter)} in all" + (f"; the {len(shown)} busiest shown" if more else "") + "):",
            "",
            "| adapter | requests | failed | req/s | tok/s | p50 TTFT | p99 TTFT | p50 TPOT | p50 E2EL | p99 E2EL |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, s in shown:
            lines.append(
                f"| {name} | {s['num_requests']} | {s['failed']} | {_fmt(s['request_throughput'], 2)} | "
                f"{_fmt(s['output_throughput'])} | {_fmt(s['p50_ttft_ms'])} | {_fmt(s['p99_ttft_ms'])} | "
                f"{_fmt(s['p50_tpot_ms'])} | {_fmt(s['p50_e2el_ms'])} | {_fmt(s['p99_e2el_ms'])} |"
            )
    return "\n".join(lines) + "\n"


def _describe(config: dict[str, Any]) -> list[tuple[str, Any]]:
    keys = ("model", "endpoint", "arrivals", "concurrency", "popularity", "adapters", "base_share",
            "input_len", "output_len", "prompt_mode", "ignore_eos", "seed", "preset")
    return [(k, config[k]) for k in keys if config.get(k) is not None]


def _error_examples(requests: Sequence[dict[str, Any]]) -> dict[str, str]:
    examples: dict[str, str] = {}
    for r in requests:
        if r.get("error_kind") and r["error_kind"] not in examples:
            examples[r["error_kind"]] = (r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:120]
    return examples
