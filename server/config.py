"""The server's settings: one pydantic object, filled from CLI flags and `LORAHIVE_*` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator


class Settings(BaseModel):
    """Every knob of `lorahive serve`. Flag `--max-gpu-adapters` <-> env `LORAHIVE_MAX_GPU_ADAPTERS`."""

    model: Path | None = Field(None, description="Hugging Face checkpoint directory; none serves the demo model")
    adapters: Path | None = Field(None, description="directory of PEFT adapters to serve, one sub-directory each")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weight dtype; auto is bfloat16 on CUDA and float32 on CPU"
    )
    device: str = Field("auto", description="torch device; auto picks cuda when available")
    served_model_name: str | None = Field(None, description="name of the base model in the API")
    max_model_len: int | None = Field(None, gt=0, description="longest prompt + output in tokens")
    max_gpu_adapters: int = Field(8, gt=0, description="adapter slots on the device")
    max_lora_rank: int = Field(64, gt=0, description="largest adapter rank served")
    max_gpu_adapter_bytes: int | None = Field(
        None, gt=0, description="device memory for adapter weights, spent by rank in pages of 16 ranks; default "
        "fits --max-gpu-adapters adapters of --max-lora-rank"
    )
    store: Path | None = Field(
        None, description="adapter store directory; none keeps uploads in a temporary directory for this run"
    )
    max_host_adapter_bytes: int = Field(
        4 * 2**30, gt=0, description="host-memory budget for adapter weights (least recently used leave first)"
    )
    max_adapter_bytes: int = Field(512 * 2**20, gt=0, description="largest adapter upload accepted, in bytes")
    pin: list[str] = Field(
        default_factory=list, description="adapter ids kept resident in host memory (comma-separated)"
    )
    kv_cache_tokens: int | None = Field(None, gt=0, description="KV-cache capacity in tokens; default sizes it")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of GPU memory to fill on CUDA")
    block_size: int = Field(16, gt=0, description="tokens per KV-cache block")
    max_num_seqs: int = Field(64, gt=0, description="sequences decoded together at most")
    max_num_batched_tokens: int = Field(2048, gt=0, description="tokens per engine step at most")
    seed: int = Field(0, description="seed of the demo model's weights")
    lora_backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="LoRA kernels: auto is Triton on CUDA and the torch reference elsewhere; triton without "
        "CUDA runs Triton's interpreter (slow, for tests)"
    )
    metrics_top_adapters: int = Field(
        20, ge=0, description="adapters with the most requests that get their own label in /metrics; the rest "
        "count as adapter=\"other\""
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("pin", mode="before")
    @classmethod
    def _split_ids(cls, value: object) -> object:
        """Flags and environment variables carry a list as "a,b,c"."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value
