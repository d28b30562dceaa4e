"""benchmarks/lora_paths.py end to end, one repeat: every way timed on every shape, the reference's choice named,
and each candidate constant's loss against the fastest way reported."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import lora_paths
from kernels import reference


def test_every_way_is_timed_and_the_choice_and_its_loss_are_reported(tmp_path: Path) -> None:
    out = tmp_path / "lora_paths.json"
    result = lora_paths.main(["--repeats", "1", "--tokens-per-adapter", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {row["shape"] for row in result["rows"]} == set(lora_paths.SHAPES)
    for row in result["rows"]:
        assert set(row["us"]) == set(lora_paths.PATHS) and all(us > 0 for us in row["us"].values())
        assert row["chosen"] in lora_paths.PATHS
    assert result["flops_per_op"] == reference.FLOPS_PER_OP
    assert result["gathered_flops_factor"] == reference.GATHERED_FLOPS_FACTOR
    excess = result["excess_us_by_flops_per_op_and_gathered_factor"]
    assert len(excess) == len(lora_paths.CANDIDATES) * len(lora_paths.GATHERED_CANDIDATES)
    assert all(lost >= 0 for lost in excess.values())
