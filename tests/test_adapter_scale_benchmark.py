"""benchmarks/adapter_scale.py end to end, tiny: a real server, adapters provisioned over REST, one sweep per
popularity, each adapter count compared with one adapter."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import adapter_scale


def test_each_popularity_sweeps_the_adapter_counts_against_one_adapter(tmp_path: Path) -> None:
    out = tmp_path / "adapter_scale.json"
    result = adapter_scale.main(["--values", "1,3", "--provision", "3", "--popularity", "zipf:1.0", "uniform",
                                 "--concurrency", "2", "--requests", "4", "--warmup-requests", "0", "--input-len", "4",
                                 "--output-len", "2", "--rank", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["sweeps"]) == {"zipf:1.0", "uniform"}
    for rows in result["sweeps"].values():
        assert [row["value"] for row in rows] == [1, 3]
        assert all(row["completed"] == 4 and row["failed"] == 0 and row["output_throughput"] > 0 for row in rows)
        assert rows[0]["output_throughput_ratio"] == 1.0 and rows[0]["p50_ttft_ms_ratio"] == 1.0
    plot = out.with_suffix(".png")
    assert plot.read_bytes().startswith(b"\x89PNG")  # the ratios drawn beside the JSON
    plot.unlink()
    assert adapter_scale.main(["--plot", str(out)]) == result and plot.read_bytes().startswith(b"\x89PNG")
