"""benchmarks/mixed_step.py end to end, one round: a decode step timed at each adapter count, its LoRA calls
replayed, and the JSON written."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import mixed_step


def test_each_adapter_count_gets_a_step_time_its_ratio_and_its_lora_calls(tmp_path: Path) -> None:
    out = tmp_path / "mixed_step.json"
    result = mixed_step.main(["--adapters", "1,4", "--batch", "4", "--rounds", "1", "--target-modules",
                              "q_proj,v_proj", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert [row["adapters"] for row in result["rows"]] == [1, 4]
    assert result["rows"][0]["step_vs_first"] == 1.0
    for row in result["rows"]:
        assert row["step_ms"] > 0 and row["lora_calls_ms"] > 0
        assert row["lora_calls"] == 4  # q,v adapters: the demo model's four fused q|k|v layers, nothing else
