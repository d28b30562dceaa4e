"""The server's settings: one pydantic object, filled from CLI flags and `LORAHIVE_*` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, Field, SecretStr, field_validator, model_validator


class StartupError(Exception):
    """A setting `lorahive serve` cannot start with; the message names the flag and says what to do."""


class Settings(BaseModel):
    """Every knob of `lorahive serve`. Flag `--max-gpu-adapters` <-> env `LORAHIVE_MAX_GPU_ADAPTERS`.

    Sizes in bytes are `ByteSize`: a plain number of bytes, or one with a unit (`512MiB`, `4GiB`, `1.5GB`).
    """

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
    max_gpu_adapters: int | None = Field(
        None, gt=0, description="cap on the adapters resident on the device at once; none: as many as "
        "--max-gpu-adapter-bytes holds"
    )
    max_lora_rank: int = Field(64, gt=0, description="largest adapter rank served")
    max_gpu_adapter_bytes: ByteSize | None = Field(
        None, gt=0, description="device memory for adapter weights, spent by rank in pages of 16 ranks (on a CPU, "
        "by the adapters' own bytes); default: on a GPU --adapter-memory-share of what the KV cache and adapters "
        "get, or pages for --max-gpu-adapters adapters of --max-lora-rank where that is given; on a CPU "
        "--max-host-adapter-bytes, because adapters there are served from host memory where they already are"
    )
    adapter_memory_share: float = Field(
        0.1, gt=0, lt=1, description="on a GPU, the share of the memory left after the weights, activations and "
        "CUDA graphs that goes to adapter pages rather than the KV cache, when --max-gpu-adapter-bytes is not given"
    )
    store: Path | None = Field(
        None, description="adapter store directory; none keeps uploads in a temporary directory for this run"
    )
    store_revalidate_seconds: float = Field(
        1.0, ge=0, description="how stale this server's view of the store may get: a cached adapter manifest older "
        "than this is read again, so a delete, replace or visibility change made by another server sharing --store "
        "shows here within it; 0 reads it at every lookup"
    )
    max_host_adapter_bytes: ByteSize = Field(
        4 * 2**30, gt=0, description="host-memory budget for adapter weights (least recently used leave first); on a "
        "CPU server it includes the stacks that batches of many adapters are read from, an eighth at most"
    )
    max_adapter_bytes: ByteSize = Field(512 * 2**20, gt=0, description="largest adapter upload accepted")
    pin: list[str] = Field(
        default_factory=list, description="adapter ids kept resident in host memory (comma-separated)"
    )
    kv_cache_tokens: int | None = Field(None, gt=0, description="KV-cache capacity in tokens; default sizes it")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of GPU memory to fill on CUDA")
    block_size: int = Field(16, gt=0, description="tokens per KV-cache block")
    max_num_seqs: int = Field(64, gt=0, description="sequences decoded together at most")
    max_num_batched_tokens: int = Field(2048, gt=0, description="tokens per engine step at most")
    engine_threads: int | None = Field(
        None, gt=0, description="torch intra-op (CPU) threads of the engine thread, the only thread that runs torch "
        "with more than one; none: torch's default, the machine's cores (or OMP_NUM_THREADS)"
    )
    seed: int = Field(0, description="seed of the demo model's weights")
    lora_backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="LoRA kernels: auto is Triton on CUDA and the torch reference elsewhere; triton without "
        "CUDA runs Triton's interpreter (slow, for tests)"
    )
    attention_backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="paged-attention kernels: auto is Triton on CUDA (once they agree with the torch "
        "reference on the device at start) and the torch reference elsewhere; triton without CUDA runs Triton's "
        "interpreter (slow, for tests)"
    )
    model_runner_process: bool = Field(
        True, description="run the model (its forward passes, sampling and device memory) in a process of its own, "
        "so that the server's HTTP work never holds up a step (each torch op of a step otherwise waits for Python's "
        "lock whenever the HTTP side runs: benchmarks/engine_thread.py measures it); false keeps it in the server's "
        "process"
    )
    enforce_eager: bool = Field(
        False, description="run every step eagerly: no CUDA graphs of decode steps (captured at start on CUDA "
        "with the Triton kernels, for batches of 1, 2, 4, 8, 16, 24, ... up to --max-num-seqs, at most 256)"
    )
    metrics_top_adapters: int = Field(
        20, ge=0, description="adapters with the most requests that get their own label in /metrics; the rest "
        "count as adapter=\"other\""
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    # Authentication and tenants (server/api/auth.py)
    api_keys: Path | None = Field(
        None, description='JSON key file {"keys": [{"key" or "sha256", "tenant", "role": "tenant"|"admin"}]}; none '
        "runs the server open, without authentication"
    )
    metrics_api_key: SecretStr | None = Field(
        None, description="Bearer key that GET /metrics accepts besides admin keys (prefer the environment variable)"
    )
    metrics_public: bool = Field(
        False, description="serve GET /metrics to anyone although --api-keys is set (its labels name every tenant's "
        "adapters); without it a server with keys serves it to admin keys and --metrics-api-key only"
    )
    # Limits: each refusal names its flag (server/api/request_limits.py, tenant_quotas.py, tenant_concurrency.py)
    max_request_bytes: ByteSize = Field(32 * 2**20, gt=0, description="largest JSON request body")
    max_prompt_tokens: int | None = Field(
        None, gt=0, description="most prompt tokens in one request (all prompts of a batch together); none: the "
        "context length is the limit"
    )
    max_tokens_limit: int | None = Field(
        None, gt=0, description="largest max_tokens a request may ask for (a request that leaves it out gets at most "
        "this many); none: the context length is the limit"
    )
    max_n: int = Field(16, ge=1, le=128, description="most choices (n) per request; the API's own cap is 128")
    # 16: the API's own cap (MAX_STOP_STRINGS in server/api/protocol.py, which this module must not import)
    max_stop_strings: int = Field(16, ge=0, le=16, description="most stop strings per request; the API's own cap is 16")
    max_adapters_per_tenant: int | None = Field(None, ge=0, description="adapters one tenant may own; none: no limit")
    max_store_bytes_per_tenant: ByteSize | None = Field(
        None, gt=0, description="adapter files one tenant may keep in the store; none: no limit"
    )
    max_concurrent_requests_per_tenant: int | None = Field(
        None, gt=0, description="requests of one tenant in flight at once (a stream counts until it ends); more are "
        "refused with 429; none: no limit"
    )
    max_concurrent_uploads: int = Field(
        4, gt=0, description="adapter uploads (multipart POST /v1/adapters, PUT /v1/adapters/ID) in flight at once, "
        "all tenants together; more are refused with 429 (each holds up to --max-adapter-bytes in memory)"
    )
    max_concurrent_uploads_per_tenant: int = Field(
        2, gt=0, description="adapter uploads of one tenant in flight at once; more are refused with 429"
    )
    # Tokenization (server/api/tokenization_pool.py)
    tokenizer_workers: int = Field(
        4, gt=0, description="threads that tokenize long prompts (over 64 KiB); short prompts have threads of "
        "their own, so they never wait behind long ones"
    )
    max_concurrent_tokenizations_per_tenant: int = Field(
        2, gt=0, description="long prompts of one tenant tokenized at once; its further long prompts wait their "
        "turn, leaving the other --tokenizer-workers to other tenants"
    )
    # Backpressure and lifecycle (server/waiting_quota.py, server/draining_server.py)
    max_waiting_requests: int = Field(
        1024, gt=0, description="prompts waiting for admission at most; past it a tenant holding its fair share of "
        "the queue gets 429 with Retry-After"
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="seconds SIGTERM lets running requests finish (new ones get 503) before cutting them "
        "and exiting 0"
    )
    # Slow and idle clients (server/connection_guard.py, server/api/body_timeout.py)
    header_timeout: float = Field(
        10.0, gt=0, description="seconds a connection has to send a request's headers, from connecting or from the "
        "end of its previous response; past it the connection closes (with a 408 if part of them came)"
    )
    body_timeout: float = Field(
        30.0, gt=0, description="seconds a request's body may take, plus 1 s per --body-min-rate bytes received; "
        "past it 408 and the connection closes"
    )
    body_min_rate: int = Field(
        65536, gt=0, description="bytes per second of a request body that extend --body-timeout by a second"
    )
    max_connections: int = Field(
        2048, gt=0, description="HTTP connections open at once; a new one past it displaces the connection idle the "
        "longest, or gets 503 when every one has a request running"
    )

    @field_validator("pin", mode="before")
    @classmethod
    def _split_ids(cls, value: object) -> object:
        """Flags and environment variables carry a list as "a,b,c"."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _metrics_access_is_one_choice(self) -> Settings:
        if self.metrics_public and self.metrics_api_key is not None:
            raise ValueError("--metrics-public opens GET /metrics to anyone, --metrics-api-key puts it behind a key: "
                             "give one of them")
        return self
