"""The PEFT-kinds benchmark, as the GPU check runs it on a Llama-3.2-1B shape, end to end on the CPU with a tiny
random-weight shape: every workload measured, with its ratios to LoRA and to the base model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import peft_kinds


def test_every_workload_is_measured_against_lora_and_the_base_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kinds.json"
    monkeypatch.setattr(sys, "argv", ["peft_kinds.py", "--shape", "tiny", "--adapters", "1", "--requests", "5",
                                      "--prompt-len", "8", "--output-len", "4", "--repeats", "2", "--steps", "3",
                                      "--out", str(out)])
    peft_kinds.main()
    measured = json.loads(out.read_text())["rows"]
    assert list(measured) == ["steps", "engine"]
    for rows in measured.values():
        assert list(rows) == list(peft_kinds.WORKLOADS)
        for workload, row in rows.items():
            assert len(row["runs"]) == 2 and row["decode_tokens_per_s"] > 0, workload
            assert row["vs_lora"] == pytest.approx(row["decode_tokens_per_s"] / rows["lora"]["decode_tokens_per_s"])
            assert row["vs_base"] == pytest.approx(row["decode_tokens_per_s"] / rows["base"]["decode_tokens_per_s"])
    printed = capsys.readouterr().out
    assert "decode steps on the model runner" in printed and "through the engine" in printed
    assert all(f"{workload:>9}" in printed for workload in peft_kinds.WORKLOADS)


def test_the_mixed_workload_holds_every_kind_and_the_base_model() -> None:
    ids = {kind: [f"{kind}-0", f"{kind}-1"] for kind in peft_kinds.KINDS}
    mixed = peft_kinds.workload_adapters("mixed", ids, 9)
    assert mixed[0] is None and {a.split("-")[0] for a in mixed[1:]} == set(peft_kinds.KINDS)
    assert peft_kinds.workload_adapters("dora", ids, 3) == ["dora-0", "dora-1", "dora-0"]
