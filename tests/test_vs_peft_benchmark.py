"""benchmarks/vs_peft.py end to end on the tiny shape: a real `lorahive serve` and transformers + PEFT on one
random checkpoint and the same PEFT adapters, every configuration measured, and lorahive's greedy tokens equal to
PEFT's for every request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from benchmarks import vs_peft  # noqa: E402 - needs peft


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """The script sets this process's torch threads (its --threads); later tests get the count back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_every_configuration_is_measured_and_lorahive_matches_peft(
    tmp_path: Path, torch_threads: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vs_peft.json"
    vs_peft.main(["--shape", "tiny", "--requests", "2", "--tokens", "4", "--rounds", "1", "--threads", "1",
                  "--out", str(out)])
    result = json.loads(out.read_text())

    assert set(result["configurations"]) == set(vs_peft.CONFIGURATIONS)
    for row in result["configurations"].values():
        assert len(row["runs_tok_per_s"]) == 1 and row["best_tok_per_s"] == row["median_tok_per_s"] > 0
    assert {r["ratio"] for r in result["ratios"]} == {f"{a} / {b}" for a, b in vs_peft.RATIO_TARGETS}
    for pair in result["agreement"].values():
        assert pair == {"requests": 2, "requests_identical": 2, "tokens": 8, "tokens_before_first_difference": 8}
    # The adapters do change what the model says, so agreeing on the mixed batch proves they were applied alike.
    assert result["adapters_change_output"] == 2
    table = capsys.readouterr().out
    assert "lorahive mixed / transformers+PEFT mixed" in table and "2/2 requests identical" in table


def test_the_adapters_differ_in_rank_targets_and_scaling() -> None:
    specs = vs_peft.ADAPTERS["smollm2-135m"]
    assert [s.rank for s in specs] == [8, 16, 32, 64]
    assert len({s.targets for s in specs}) == 4 and [s.use_rslora for s in specs] == [False, False, False, True]
    assert len(set(vs_peft.adapter_names("deep-narrow"))) == 8


def test_requests_spread_round_robin_over_the_adapters() -> None:
    names = vs_peft.adapter_names("tiny")
    workload = vs_peft.build_workload(6, 4, 320, names)
    assert workload.adapters("lorahive mixed") == [names[i % 4] for i in range(6)]
    assert workload.adapters("transformers base") == [None] * 6
    assert all(32 <= len(p) <= 64 and 0 not in p for p in workload.prompts)
