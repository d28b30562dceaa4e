"""benchmarks/engine_thread.py's (c) end to end, one short round: the engine's decode steps measured alone, with
Python work in a thread beside it and in a process beside it."""

from __future__ import annotations

import pytest

from benchmarks import engine_thread


@pytest.mark.parametrize("model_runner_process", [False, True], ids=["engine thread", "worker process"])
def test_python_beside_the_engine_is_measured_in_a_thread_and_in_a_process(model_runner_process: bool) -> None:
    rows = engine_thread.run_beside(engine_threads=1, max_tokens=8, rounds=1, share=0.2,
                                    model_runner_process=model_runner_process)
    assert [row["beside"] for row in rows] == list(engine_thread.BESIDE)
    for row in rows:
        assert row["steps"] >= 2 and row["interval_median_ms"] > 0 and row["torch_threads"] == 1
    engine_thread.print_beside(rows)
    assert rows[0]["interval_vs_alone"] == 1.0
