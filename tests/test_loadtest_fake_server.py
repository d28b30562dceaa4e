"""The load-test harness against a fake OpenAI-compatible server with injected timings.

The fake (tests/support/fake_openai_server.py) sends the first token `ttft` after a request arrives and one
more every `itl`, on an absolute schedule; the harness, measuring from the client's side, must find
those values. These are the only wall-clock assertions in the suite: medians, with tolerances that
cover HTTP overhead on a busy 2-core machine (a few ms) but not a wrong measurement (tens of ms).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from loadtest.arrivals import ArrivalProcess
from loadtest.metrics import summarize
from loadtest.runner import RunLimits
from loadtest.workload import LengthSpec, Popularity, Workload
from tests.support.loadtest_harness import cli, fake_server, run
from tests.support.servers import free_port

TTFT_S = 0.080
ITL_S = 0.020
TOKENS = 16
# Client-side TTFT includes the HTTP round trip (about 2-5 ms here); the medians must land within this.
TTFT_TOLERANCE_MS = (-2.0, 15.0)
ITL_TOLERANCE_MS = 5.0
VLLM_KEYS = ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
             "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
             "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms")
PNG = b"\x89PNG\r\n\x1a\n"


@contextmanager
def fake_server_process(ttft_s: float, itl_s: float, adapters: int) -> Iterator[str]:
    """The fake in its own process: the accuracy check must not share a GIL with the client it checks."""
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_openai_server", "--port", str(port), "--ttft-ms", str(ttft_s * 1000),
         "--itl-ms", str(itl_s * 1000), "--adapters", str(adapters)],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fake server did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)
        process.stderr.close()


def assert_close_ms(measured_ms: float, injected_s: float, tolerance: tuple[float, float]) -> None:
    low, high = injected_s * 1000 + tolerance[0], injected_s * 1000 + tolerance[1]
    assert low <= measured_ms <= high, f"measured {measured_ms:.2f} ms, injected {injected_s * 1000:.0f} ms"


# ------------------------------------------------------------------------------------------ accuracy


def test_measured_ttft_itl_tpot_and_throughput_match_the_injected_delays():
    adapters = ["a0", "a1", "a2"]
    with fake_server_process(TTFT_S, ITL_S, adapters=3) as url:
        workload = Workload(adapters, Popularity("uniform"), output_len=LengthSpec(TOKENS, TOKENS), seed=3)
        outcome = run(url, workload, RunLimits(num_requests=24, concurrency=4))
    results = outcome.results
    summary = summarize(results)
    assert (summary["completed"], summary["failed"]) == (24, 0)
    assert summary["total_output_tokens"] == 24 * TOKENS  # the known count, from the usage chunks
    assert all(r.output_tokens == TOKENS and r.tokens_from_usage and len(r.itl) == TOKENS - 1 for r in results)
    assert_close_ms(summary["median_ttft_ms"], TTFT_S, TTFT_TOLERANCE_MS)
    assert_close_ms(summary["median_itl_ms"], ITL_S, (-ITL_TOLERANCE_MS, ITL_TOLERANCE_MS))
    assert_close_ms(summary["median_tpot_ms"], ITL_S, (-ITL_TOLERANCE_MS, ITL_TOLERANCE_MS))
    e2el_s = TTFT_S + (TOKENS - 1) * ITL_S
    assert_close_ms(summary["median_e2el_ms"], e2el_s, TTFT_TOLERANCE_MS)
    # Closed loop of 4: each user finishes a request every ~E2EL, so throughput is 4 / E2EL.
    assert summary["request_throughput"] == pytest.approx(4 / e2el_s, rel=0.12)
    assert summary["output_throughput"] == pytest.approx(summary["request_throughput"] * TOKENS)


def test_requests_carry_the_adapter_max_tokens_ignore_eos_and_ask_for_usage():
    adapters = ["a0", "a1", "a2"]
    with fake_server(adapters=adapters, ttft_s=0.002, itl_s=0.001) as (url, _, state):
        run(url, Workload(adapters, Popularity("distinct"), output_len=LengthSpec(5, 5)),
            RunLimits(num_requests=6, concurrency=2))
        run(url, Workload(adapters[:1], output_len=LengthSpec(5, 5)), RunLimits(num_requests=1),
            adapter_field="adapter_id", ignore_eos=False, extra_body={"top_k": 3})
    sent = state.requests
    assert sorted(b["model"] for b in sent[:6]) == sorted(adapters * 2)
    assert all(b["max_tokens"] == 5 and b["ignore_eos"] and b["stream_options"]["include_usage"] for b in sent[:6])
    assert all(len(b["prompt"]) == 32 and all(isinstance(t, int) for t in b["prompt"]) for b in sent[:6])
    last = sent[6]
    assert (last["model"], last["adapter_id"], last["top_k"]) == ("fake-base", "a0", 3) and "ignore_eos" not in last


def test_open_loop_sends_each_request_at_its_arrival_time():
    with fake_server(ttft_s=0.01, itl_s=0.005) as (url, _, _state):
        workload = Workload([], arrivals=ArrivalProcess(rate=25.0, cv=2.0), output_len=LengthSpec(4, 4), seed=5)
        outcome = run(url, workload, RunLimits(num_requests=30))
    arrivals = [s.arrival for s in _take(workload, 30)]
    lateness_ms = sorted((r.start - a) * 1000 for r, a in zip(outcome.results, arrivals, strict=True))
    assert lateness_ms[0] >= -1.0 and lateness_ms[len(lateness_ms) // 2] < 5.0
    assert all(r.success for r in outcome.results)


def _take(workload: Workload, n: int):
    it = workload.requests()
    return [next(it) for _ in range(n)]


def test_chat_endpoint_ignores_the_empty_opening_chunk():
    with fake_server(ttft_s=TTFT_S, itl_s=ITL_S) as (url, _, state):
        workload = Workload([], output_len=LengthSpec(6, 6), prompt_mode="text")
        outcome = run(url, workload, RunLimits(num_requests=4, concurrency=2), endpoint="chat")
    summary = summarize(outcome.results)
    assert summary["completed"] == 4 and summary["total_output_tokens"] == 24
    assert_close_ms(summary["median_ttft_ms"], TTFT_S, TTFT_TOLERANCE_MS)
    assert all(isinstance(b["messages"][0]["content"], str) for b in state.requests)


def test_tokens_come_from_usage_when_chunks_carry_several_and_are_counted_without_it():
    with fake_server(ttft_s=0.01, itl_s=0.01, tokens_per_chunk=2) as (url, _, _state):
        outcome = run(url, Workload([], output_len=LengthSpec(8, 8)), RunLimits(num_requests=3, concurrency=3))
    assert all(r.output_tokens == 8 and r.tokens_from_usage and len(r.itl) == 3 for r in outcome.results)
    with fake_server(ttft_s=0.01, itl_s=0.01, send_usage=False) as (url, _, _state):
        outcome = run(url, Workload([], output_len=LengthSpec(5, 5)), RunLimits(num_requests=3, concurrency=3))
    assert all(r.output_tokens == 5 and not r.tokens_from_usage for r in outcome.results)


# ------------------------------------------------------------------------------------------ errors, warm-up, limits


def test_errors_are_counted_by_kind_and_never_stop_the_run():
    with fake_server(adapters=["good", "broken"], stream_error_adapters={"broken"}, ttft_s=0.01, itl_s=0.002) as (
        url, _, _state
    ):
        workload = Workload(["good", "missing", "broken"], Popularity("distinct"), output_len=LengthSpec(4, 4))
        outcome = run(url, workload, RunLimits(num_requests=9, concurrency=3))
    kinds = Counter(r.error_kind for r in outcome.results)
    assert kinds == {None: 3, "http_404": 3, "stream_error": 3}
    missing = next(r for r in outcome.results if r.adapter == "missing")
    assert missing.status == 404 and "does not exist" in missing.error
    # Nothing listens on this port any more: connection errors, reported, not raised.
    outcome = run(url, Workload([]), RunLimits(num_requests=2, concurrency=1, request_timeout_s=5))
    assert [r.error_kind for r in outcome.results] == ["connection", "connection"]


def test_warmup_requests_are_sent_first_and_excluded():
    with fake_server(ttft_s=0.005, itl_s=0.001) as (url, _, state):
        outcome = run(url, Workload([], output_len=LengthSpec(2, 2)),
                      RunLimits(num_requests=6, warmup_requests=4, concurrency=2))
    assert len(state.requests) == 10
    assert [r.warmup for r in outcome.results] == [True] * 4 + [False] * 6
    assert summarize([r for r in outcome.results if not r.warmup])["completed"] == 6


def test_duration_stops_sending_at_the_deadline():
    with fake_server(ttft_s=0.005, itl_s=0.001) as (url, _, _state):
        workload = Workload([], arrivals=ArrivalProcess(rate=40.0), output_len=LengthSpec(2, 2), seed=1)
        outcome = run(url, workload, RunLimits(duration_s=0.5, warmup_s=0.25))
    arrivals = [s.arrival for s in _take(workload, len(outcome.results) + 1)]
    assert all(a < 0.75 for a in arrivals[:-1]) and arrivals[-1] >= 0.75  # every arrival before it, none after
    assert all((a < 0.25) == r.warmup for a, r in zip(arrivals, outcome.results, strict=False))


# ------------------------------------------------------------------------------------------ provisioning


def test_provisioning_uploads_valid_adapters_uses_them_and_cleans_up(tmp_path: Path):
    with fake_server(adapters=["lt-1"], ttft_s=0.005, itl_s=0.002) as (url, _, state):
        code = cli("--url", url, "--provision", "3", "--rank", "4", "--cleanup", "--num-requests", "12",
                   "--concurrency", "3", "--popularity", "zipf:1.0", "--output-len", "3", "--out", str(tmp_path))
        assert code == 0
        # lt-0 and lt-2 were uploaded (and validated: names, shapes against the card's dims, offsets);
        # lt-1 existed already (409): used, and not deleted afterwards.
        assert state.uploads == 2 and state.deletes == 2 and list(state.adapters) == ["lt-1"]
        assert {b["model"] for b in state.requests} <= {"lt-0", "lt-1", "lt-2"}
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["completed"] == 12 and report["config"]["provisioned"] == 3
    assert set(report["per_adapter"]) <= {"lt-0", "lt-1", "lt-2"}


def test_provisioned_adapters_match_the_server_dims(tmp_path: Path):
    """The fake validates every tensor's shape against its dims: a real model's dims work too."""
    dims = {"hidden_size": 64, "intermediate_size": 96, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
            "head_dim": 16}
    with fake_server(dims=dims, ttft_s=0.005, itl_s=0.002) as (url, _, state):
        assert cli("--url", url, "--provision", "2", "--rank", "2", "--num-requests", "2", "--no-plots",
                   "--out", str(tmp_path)) == 0
        assert [m["num_tensors"] for m in state.adapters.values()] == [2 * 7 * 2] * 2


def test_provisioning_without_dims_asks_for_the_flags_and_works_with_them(tmp_path: Path, capsys):
    with fake_server(dims=None, ttft_s=0.005, itl_s=0.002) as (url, _, state):
        assert cli("--url", url, "--provision", "2", "--num-requests", "2", "--out", str(tmp_path)) == 2
        assert "--hidden-size" in capsys.readouterr().err and state.uploads == 0
        demo = ["--hidden-size", "256", "--intermediate-size", "688", "--num-layers", "4", "--num-heads", "8",
                "--num-kv-heads", "4", "--head-dim", "32"]
        assert cli("--url", url, "--provision", "2", "--num-requests", "2", "--no-plots", "--out", str(tmp_path),
                   *demo) == 0
        assert state.uploads == 2


def test_a_server_without_the_upload_api_gets_a_clear_message(tmp_path: Path, capsys):
    with fake_server(upload_api=False) as (url, _, _state):
        assert cli("--url", url, "--provision", "2", "--num-requests", "2", "--out", str(tmp_path)) == 2
    assert "no adapter upload API" in capsys.readouterr().err


def test_asking_for_more_adapters_than_served_is_a_usage_error(tmp_path: Path, capsys):
    with fake_server(adapters=["a0"]) as (url, _, _state):
        assert cli("--url", url, "--adapters", "5", "--num-requests", "2", "--out", str(tmp_path)) == 2
    assert "--provision 5" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the command line


def test_cli_run_writes_json_markdown_and_pngs(tmp_path: Path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": 100 + i * 0.05, "adapter": f"t{i % 3}"}) for i in range(8)))
    with fake_server(adapters=["a0", "a1"], ttft_s=0.01, itl_s=0.004) as (url, _, _state):
        code = cli("--url", url, "--trace", str(trace), "--output-len", "5", "--base-share", "0.5",
                   "--slo-ttft-ms", "1000", "--out", str(tmp_path / "out"))
    assert code == 0
    out = tmp_path / "out"
    report = json.loads((out / "results.json").read_text())
    assert all(isinstance(report[k], float) for k in VLLM_KEYS)
    assert report["num_prompts"] == 8 and report["completed"] == 8 and report["slo_attainment"] == 1.0
    assert report["config"]["arrivals"].startswith("trace")
    assert len(report["requests"]) == 8 and all(r["tpot"] is not None for r in report["requests"])
    markdown = (out / "summary.md").read_text()
    assert "| request throughput (req/s) |" in markdown and markdown in capsys.readouterr().out
    for name in ("latency_cdf.png", "throughput_over_time.png", "latency_over_time.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_cli_preset_sets_defaults_and_flags_win(tmp_path: Path):
    with fake_server(adapters=[f"a{i}" for i in range(40)], ttft_s=0.005, itl_s=0.001) as (url, _, state):
        code = cli("--url", url, "--preset", "punica-distinct-cpu", "--num-requests", "10", "--warmup-requests", "0",
                   "--output-len", "2", "--no-plots", "--out", str(tmp_path))
    assert code == 0
    config = json.loads((tmp_path / "results.json").read_text())["config"]
    assert (config["popularity"], config["concurrency"], config["adapters"]) == ("distinct", 8, 32)
    assert config["num_requests"] == 10 and config["preset"] == "punica-distinct-cpu"
    assert len({b["model"] for b in state.requests}) == 10  # distinct: every request its own adapter


def test_cli_sweep_over_adapters_draws_the_curve(tmp_path: Path):
    with fake_server(adapters=[f"a{i}" for i in range(4)], ttft_s=0.005, itl_s=0.002) as (url, _, state):
        code = cli("sweep", "--url", url, "--vary", "adapters", "--values", "0,4", "--popularity", "distinct",
                   "--num-requests", "8", "--concurrency", "4", "--output-len", "3", "--cooldown", "0",
                   "--repeats", "2", "--out", str(tmp_path))
    assert code == 0 and len(state.requests) == 2 * 2 * 8
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    # One row per value, the median of its two interleaved rounds (counts summed).
    assert [r["value"] for r in sweep["rows"]] == [0, 4] and all(r["completed"] == 16 for r in sweep["rows"])
    assert sweep["rows"][0]["output_throughput_ratio"] == 1.0 and len(sweep["rounds"]) == 2
    for value in (0, 4):
        run_dir = tmp_path / f"adapters={value}" / "repeat-1"
        per_adapter = json.loads((run_dir / "results.json").read_text())["per_adapter"]
        assert len(per_adapter) == max(value, 1)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG and "| adapters |" in (tmp_path / "sweep.md").read_text()


def test_cli_compare_puts_runs_side_by_side(tmp_path: Path, capsys):
    with fake_server(ttft_s=0.005, itl_s=0.002) as (url, _, _state):
        for name in ("one", "two"):
            assert cli("--url", url, "--num-requests", "3", "--output-len", "2", "--no-plots",
                       "--out", str(tmp_path / name)) == 0
    capsys.readouterr()
    assert cli("compare", str(tmp_path / "one"), str(tmp_path / "two" / "results.json"), "--out",
               str(tmp_path / "cmp")) == 0
    table = capsys.readouterr().out
    assert table.startswith("| metric | one | two |") and "| p99 TTFT (ms) |" in table
    assert (tmp_path / "cmp" / "compare_cdf.png").read_bytes()[:8] == PNG


def test_cli_rejects_bad_flags(tmp_path: Path, capsys):
    for argv in (["--popularity", "zipf:x"], ["--input-len", "9:3"], ["--rate", "0"], ["--base-share", "2"]):
        with fake_server() as (url, _, _state):
            assert cli("--url", url, "--num-requests", "1", "--out", str(tmp_path), *argv) == 2
    capsys.readouterr()
