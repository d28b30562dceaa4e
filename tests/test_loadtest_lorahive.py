"""The load-test harness against the real lorahive server on the CPU (demo model, uvicorn, HTTP).

Adapters come from the harness's own synthetic writer, served from a directory; the provisioning test
uploads them through `POST /v1/adapters` instead, and skips (saying why) while the server has no
such route.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from loadtest.cli import main
from loadtest.synthetic_adapters import DEMO_DIMS, AdapterSpec, BaseDims, write_adapters
from server.config import Settings
from server.demo import DEMO_MODEL_NAME
from tests.support.servers import serving_engine

NUM_ADAPTERS = 6
PNGS = ("latency_cdf.png", "throughput_over_time.png", "latency_over_time.png")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory) -> str:
    adapters = tmp_path_factory.mktemp("lt-adapters")
    write_adapters(adapters, NUM_ADAPTERS, DEMO_DIMS, AdapterSpec(rank=8), prefix="disk-", seed=0)
    settings = Settings(adapters=adapters, device="cpu", dtype="float32", max_gpu_adapters=4, max_lora_rank=8,
                        kv_cache_tokens=4096)
    with serving_engine(settings) as (url, _):
        yield url


def cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["--no-progress", *argv])
    return exit_info.value.code


def assert_clean_run(out: Path, requests: int, output_len: int) -> dict:
    report = json.loads((out / "results.json").read_text())
    assert (report["completed"], report["failed"], report["errors_by_kind"]) == (requests, 0, {})
    # ignore_eos honoured: every request generated exactly max_tokens, as the usage chunk says.
    assert all(r["output_tokens"] == output_len and r["tokens_from_usage"] for r in report["requests"])
    assert report["median_ttft_ms"] > 0 and report["output_throughput"] > 0
    assert "| time to first token (TTFT) |" in (out / "summary.md").read_text()
    for name in PNGS:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    return report


def test_zipf_run_over_served_adapters_has_no_errors_and_writes_every_report(base_url: str, tmp_path: Path):
    code = cli("--url", base_url, "--num-requests", "20", "--warmup-requests", "2", "--concurrency", "4",
               "--popularity", "zipf:1.0", "--base-share", "0.2", "--input-len", "8:24", "--output-len", "8",
               "--out", str(tmp_path))
    assert code == 0
    report = assert_clean_run(tmp_path, 20, 8)
    assert report["model_id"] == DEMO_MODEL_NAME and report["config"]["adapters"] == NUM_ADAPTERS
    assert set(report["per_adapter"]) <= {f"disk-{i}" for i in range(NUM_ADAPTERS)} | {"(base)"}
    # Token-id prompts have exactly the asked length (the demo tokenizer adds nothing to token ids).
    assert all(r["prompt_tokens"] == r["input_len"] for r in report["requests"])


def test_provision_20_adapters_through_the_rest_api(base_url: str, tmp_path: Path):
    # No dimension flags: the harness shapes the adapters from the dims on the server's base model card.
    card = httpx.get(f"{base_url}/v1/models/{DEMO_MODEL_NAME}", timeout=30).json()
    assert BaseDims.from_mapping(card["dims"]) == DEMO_DIMS
    code = cli("--url", base_url, "--provision", "20", "--rank", "8", "--cleanup", "--popularity", "zipf:1.0",
               "--num-requests", "20", "--concurrency", "4", "--input-len", "16", "--output-len", "6",
               "--out", str(tmp_path))
    assert code == 0
    report = assert_clean_run(tmp_path, 20, 6)
    assert report["config"]["provisioned"] == 20
    assert set(report["per_adapter"]) <= {f"lt-{i:02d}" for i in range(20)}
    remaining = [m["id"] for m in httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]]
    assert not any(m.startswith("lt-") for m in remaining)  # --cleanup deleted what it uploaded


def test_provision_a_mix_of_every_kind_and_serve_it(base_url: str, tmp_path: Path):
    """`--adapter-kind` uploads LoRA, DoRA, IA3 and prompt-tuning adapters the real server accepts and serves."""
    code = cli("--url", base_url, "--provision", "8", "--adapter-kind", "lora,dora,ia3,prompt", "--rank", "8",
               "--popularity", "uniform", "--num-requests", "16", "--concurrency", "4", "--input-len", "16",
               "--output-len", "6", "--out", str(tmp_path))
    assert code == 0
    report = assert_clean_run(tmp_path, 16, 6)
    assert set(report["per_adapter"]) <= {f"lt-{i}" for i in range(8)}  # every request served by one of them
    kinds = {a["id"]: a["kind"] for a in httpx.get(f"{base_url}/v1/adapters", timeout=30).json()["data"]}
    assert [kinds[f"lt-{i}"] for i in range(8)] == ["lora", "dora", "ia3", "prompt"] * 2
