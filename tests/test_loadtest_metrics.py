"""Summaries and reports of the load-test harness on hand-made results (no server, no clock), and the
synthetic adapters it writes, read back by lorahive's own PEFT parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters_store import TARGET_MODULES, BaseModelShape, load_peft_adapter
from loadtest.client import RequestResult
from loadtest.metrics import BASE_LABEL, SLO, summarize, summarize_per_adapter
from loadtest.plots import write_run_plots
from loadtest.report import build_report, load_results, markdown_summary
from loadtest.runner import RunOutcome
from loadtest.synthetic_adapters import DEMO_DIMS, AdapterSpec, BaseDims, write_adapters
from tests.support.loadtest_harness import ok

VLLM_KEYS = [
    "duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "request_goodput", "output_throughput", "total_token_throughput",
] + [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p99")]


def failed(index: int, start: float, kind: str, adapter: str | None = None) -> RequestResult:
    return RequestResult(index, adapter, 10, 5, start=start, finish=start + 0.01, error_kind=kind, error="boom")


RESULTS = [
    ok(0, 0.0, 0.100, [0.02] * 4, "a"),  # e2el 0.18, tpot 0.02
    ok(1, 0.5, 0.200, [0.04] * 4, "a"),  # e2el 0.36, tpot 0.04
    ok(2, 1.0, 0.300, [0.01] * 9, None),  # e2el 0.39, tpot 0.01
    failed(3, 1.5, "http_404", "b"),
    failed(4, 1.6, "timeout", "b"),
]


def test_summary_values_and_vllm_key_names():
    s = summarize(RESULTS)
    assert set(VLLM_KEYS) <= set(s)
    assert s["duration"] == pytest.approx(1.6 + 0.01)  # first start -> last finish, failures included
    assert (s["completed"], s["failed"]) == (3, 2)
    assert s["total_output_tokens"] == 5 + 5 + 10 and s["total_input_tokens"] == 30
    assert s["request_throughput"] == pytest.approx(3 / 1.61)
    assert s["output_throughput"] == pytest.approx(20 / 1.61)
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 200)  # linear interpolation, as numpy and vLLM do
    assert s["mean_tpot_ms"] == pytest.approx((20 + 40 + 10) / 3)
    assert s["median_itl_ms"] == pytest.approx(10.0)  # 9 samples of 10 ms, 4 of 20, 4 of 40
    assert s["mean_e2el_ms"] == pytest.approx((180 + 360 + 390) / 3)
    assert s["errors_by_kind"] == {"http_404": 1, "timeout": 1}
    assert s["request_goodput"] is None and s["slo_attainment"] is None


def test_goodput_counts_requests_meeting_every_target():
    s = summarize(RESULTS, SLO(ttft_ms=350, tpot_ms=30))
    # 0 meets both; 1 misses TPOT; 2 meets both; the failures never do.
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["request_goodput"] == pytest.approx(2 / 1.61)
    one_token = ok(9, 0.0, 0.05, [])
    assert one_token.tpot is None and SLO(tpot_ms=1).met_by(one_token)


def test_per_adapter_summaries_share_the_run_window_and_add_up():
    per = summarize_per_adapter(RESULTS)
    assert list(per) == ["a", "b", BASE_LABEL]  # busiest first, ties by name
    assert per["a"]["completed"] == 2 and per["b"]["failed"] == 2 and per[BASE_LABEL]["completed"] == 1
    total = sum(p["output_throughput"] for p in per.values())
    assert total == pytest.approx(summarize(RESULTS)["output_throughput"])


def test_empty_and_all_failed_runs_summarize_without_crashing():
    assert summarize([])["completed"] == 0
    s = summarize([failed(0, 0.0, "connection")])
    assert s["mean_ttft_ms"] is None and s["errors_by_kind"] == {"connection": 1}


def test_report_excludes_warmup_round_trips_and_renders(tmp_path: Path):
    warm = ok(5, 0.0, 9.0, [1.0], "a", warmup=True)
    outcome = RunOutcome([*RESULTS, warm], wall_s=3.0, interrupted=False)
    report = build_report(outcome, {"url": "http://x", "model": "m", "rate": 2.0, "cv": 2.0, "concurrency": None})
    assert report["num_prompts"] == 5 and report["warmup_excluded"] == 1
    assert report["max_ttft_ms"] == pytest.approx(300.0)  # the 9 s warm-up request is not in it
    assert report["burstiness"] == pytest.approx(0.25) and report["request_rate"] == 2.0
    assert len(report["requests"]) == 6 and len(report["ttfts"]) == 5
    text = json.dumps(report, allow_nan=False)
    assert [r.index for r in load_results(json.loads(text))] == [0, 1, 2, 3, 4, 5]
    markdown = markdown_summary(report)
    assert "| time to first token (TTFT) | 200.00 |" in markdown
    assert "| http_404 | 1 | boom |" in markdown and f"| {BASE_LABEL} | 1 |" in markdown
    paths = write_run_plots(outcome.results, tmp_path)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_requests_per_replica_and_adapter_affinity_come_from_the_served_by_header():
    """Adapter a: 3 requests on r1, 1 on r2; adapter b: 2 on r2; base requests count per replica but have no
    affinity; a failed request and one without the header count nowhere."""
    routed = [ok(i, 0.1 * i, 0.1, [0.01], adapter, served_by=replica) for i, (adapter, replica) in enumerate(
        [("a", "r1"), ("a", "r1"), ("a", "r2"), ("a", "r1"), ("b", "r2"), ("b", "r2"), (None, "r1"), ("b", None)])]
    failure = failed(9, 1.0, "http_503", "a")
    failure.served_by = "r2"
    s = summarize([*routed, failure])
    assert s["served_by"] == {"r1": 4, "r2": 3}
    assert s["adapter_affinity"] == pytest.approx((3 + 2) / 6)
    markdown = markdown_summary(build_report(RunOutcome(routed, wall_s=1.0, interrupted=False), {
        "url": "http://x", "model": "m", "rate": None, "cv": None, "concurrency": 2}))
    assert "| requests per replica | r1 4, r2 3 |" in markdown
    assert "| adapter requests on their adapter's usual replica | 83.3% |" in markdown
    assert summarize(RESULTS)["served_by"] is None and summarize(RESULTS)["adapter_affinity"] is None


def test_dims_from_hugging_face_config_names():
    dims = BaseDims.from_mapping({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                  "num_attention_heads": 32, "num_key_value_heads": 8})
    assert dims.head_dim == 128 and dims.module_dims()["k_proj"] == (4096, 1024)
    with pytest.raises(ValueError, match="num_layers"):
        BaseDims.from_mapping({"hidden_size": 8, "intermediate_size": 8, "num_heads": 2})


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_synthetic_adapters_load_in_lorahive_parser(tmp_path: Path, dtype: str):
    spec = AdapterSpec(rank=4, targets=("q_proj", "v_proj", "down_proj"), dtype=dtype)  # type: ignore[arg-type]
    ids = write_adapters(tmp_path, 3, DEMO_DIMS, spec, prefix="t-", seed=1)
    assert ids == ["t-0", "t-1", "t-2"]
    shape = BaseModelShape(num_layers=DEMO_DIMS.num_layers, module_dims=DEMO_DIMS.module_dims())
    adapters = [load_peft_adapter(tmp_path / i, i, base=shape, max_rank=8) for i in ids]
    assert all(a.rank == 4 and a.target_modules == ("q_proj", "v_proj", "down_proj") for a in adapters)
    full = write_adapters(tmp_path / "all", 1, DEMO_DIMS, AdapterSpec(rank=8), seed=2)
    everything = load_peft_adapter(tmp_path / "all" / full[0], full[0], base=shape, max_rank=8)
    assert everything.target_modules == TARGET_MODULES
    # Different adapters, different weights; the same seed, the same bytes.
    a, b = ((tmp_path / i / "adapter_model.safetensors").read_bytes() for i in ids[:2])
    assert a != b
    write_adapters(tmp_path / "again", 1, DEMO_DIMS, spec, prefix="t-", seed=1)
    assert (tmp_path / "again" / "t-0" / "adapter_model.safetensors").read_bytes() == a
