"""The engine benchmark's matrix (adapters x batch x context), as the GPU check runs it on Llama-3.1-8B
shapes, end to end on the CPU with a tiny random-weight shape: every cell measured or listed as skipped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import engine_throughput


def run_benchmark(argv: list[str], out: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setattr(sys, "argv", ["engine_throughput.py", "--shape", "tiny", "--output-len", "4",
                                      "--repeats", "1", "--out", str(out), *argv])
    engine_throughput.main()
    return json.loads(out.read_text())


def test_every_cell_of_the_matrix_is_measured_against_its_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    result = run_benchmark(["--adapters", "0", "1", "3", "--requests", "1", "3", "--prompt-len", "16", "40"],
                           tmp_path / "matrix.json", monkeypatch)
    rows = result["rows"]
    cells = {(r["distinct_adapters"], r["batch"], r["prompt_len"]) for r in rows}
    assert cells == {(a, b, p) for a in (0, 1, 3) for b in (1, 3) for p in (16, 40)} and len(rows) == 12
    for row in rows:
        assert "skipped" not in row
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["ttft_s"] > 0
        if row["distinct_adapters"] == 0:
            assert row["decode_vs_base"] == row["prefill_vs_base"] == 1.0
        base = next(r for r in rows if r["distinct_adapters"] == 0
                    and (r["batch"], r["prompt_len"]) == (row["batch"], row["prompt_len"]))
        assert row["decode_vs_base"] == pytest.approx(row["decode_tokens_per_s"] / base["decode_tokens_per_s"])
    table = capsys.readouterr().out
    assert "decode tok/s" in table and "prefill tok/s" in table and "skipped" not in table


def test_cells_past_the_budget_are_skipped_and_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    result = run_benchmark(["--adapters", "0", "2", "--requests", "1", "2", "--prompt-len", "16", "--budget-s", "0"],
                           tmp_path / "budget.json", monkeypatch)
    rows = result["rows"]
    # The cheapest cell always runs; every later one would end past a zero budget.
    assert [("skipped" in r) for r in rows] == [False, True, True, True]
    assert (rows[0]["distinct_adapters"], rows[0]["batch"]) == (0, 1)
    assert {r["skipped"] for r in rows[1:]} == {"over --budget-s 0"}
    assert "skipped 3 of 4 cells, the costliest: over --budget-s 0" in capsys.readouterr().out


def test_cells_run_cheapest_first_with_the_base_model_first_in_each() -> None:
    cells = engine_throughput.ordered_cells([8, 0], [64, 1], [8192, 1024], output_len=32)
    assert [(c.batch, c.prompt_len, c.adapters) for c in cells] == [
        (1, 1024, 0), (1, 1024, 8), (1, 8192, 0), (1, 8192, 8),
        (64, 1024, 0), (64, 1024, 8), (64, 8192, 0), (64, 8192, 8),
    ]
