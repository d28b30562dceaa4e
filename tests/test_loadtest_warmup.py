"""Warm-up comes first and on top of the measured part: `--num-requests N` counts measured requests,
whether the warm-up is given in requests or in seconds."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from loadtest.arrivals import ArrivalProcess
from loadtest.runner import RunLimits
from loadtest.workload import LengthSpec, Workload
from tests.support.loadtest_harness import cli, fake_server, run


def test_seconds_of_warmup_come_before_the_measured_requests_of_an_open_loop():
    workload = Workload([], arrivals=ArrivalProcess(rate=40.0), output_len=LengthSpec(2, 2), seed=1)
    with fake_server(ttft_s=0.005, itl_s=0.001) as (url, _, state):
        outcome = run(url, workload, RunLimits(num_requests=6, warmup_s=0.3))
    arrivals = [spec.arrival for spec in islice(workload.requests(), len(outcome.results))]
    warm = [r for r in outcome.results if r.warmup]
    assert [r.warmup for r in outcome.results] == [a < 0.3 for a in arrivals]  # the schedule's first 0.3 s
    assert len(warm) >= 3 and len(outcome.results) - len(warm) == 6 == len(state.requests) - len(warm)


def test_seconds_of_warmup_come_before_the_measured_requests_of_a_closed_loop():
    with fake_server(ttft_s=0.02, itl_s=0.001) as (url, _, _state):
        outcome = run(url, Workload([], output_len=LengthSpec(2, 2)),
                      RunLimits(num_requests=5, warmup_s=0.2, concurrency=2))
    flags = [r.warmup for r in outcome.results]
    assert flags == sorted(flags, reverse=True)  # warm-up first
    assert flags.count(False) == 5 and flags.count(True) >= 2


def test_requests_and_seconds_of_warmup_together(tmp_path: Path):
    with fake_server(ttft_s=0.005, itl_s=0.001) as (url, _, _state):
        assert cli("--url", url, "--rate", "40", "--num-requests", "4", "--warmup", "0.2", "--warmup-requests",
                   "12", "--output-len", "2", "--no-plots", "--out", str(tmp_path)) == 0

    report = json.loads((tmp_path / "results.json").read_text())
    assert report["num_prompts"] == report["completed"] == 4 and report["warmup_excluded"] >= 12


def test_seconds_of_warmup_need_paced_traffic(tmp_path: Path, capsys):
    with fake_server() as (url, _, state):
        assert cli("--url", url, "--num-requests", "4", "--warmup", "1", "--out", str(tmp_path)) == 2
        assert not state.requests
    assert "--warmup SECONDS needs paced traffic" in capsys.readouterr().err
