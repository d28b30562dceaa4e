"""Assembling an engine from settings: device, dtype, weights, KV-cache size, start-up adapters."""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from adapters_store import AdapterStore, BaseModelShape
from kernels import resolve_backend
from kernels.paging import PAGE_RANK, pages_for_rank
from server.adapter_registry import AdapterRegistry
from server.checkpoint import load_weights, read_config
from server.config import Settings
from server.demo import DEMO_DESCRIPTION, DEMO_MODEL_NAME, build_demo_model
from server.engine import Engine, EngineConfig
from server.metrics import Metrics
from server.model import ModelArgs, Transformer
from server.tokenizer import Tokenizer

log = logging.getLogger("lorahive.runtime")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_CACHE_TOKENS = 32768  # default on CPU: plenty for the demo, a bounded footprint for real models
ACTIVATION_HEADROOM_BYTES = 2 * 2**30  # kept free on CUDA for activations and the sampler


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[setting]


@contextmanager
def _building_on(device: torch.device, dtype: torch.dtype):
    """Create parameters directly on `device` in `dtype` (no fp32 copy of a large model first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def load_model(settings: Settings, device: torch.device, dtype: torch.dtype) -> tuple[Transformer, Tokenizer, str, str]:
    """The model, its tokenizer, its served name and a one-line description."""
    if settings.model is None:
        model, tokenizer = build_demo_model(settings.seed)
        return model.to(device, dtype), tokenizer, settings.served_model_name or DEMO_MODEL_NAME, DEMO_DESCRIPTION
    model_dir = Path(settings.model)
    args = read_config(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    with _building_on(device, dtype):
        model = Transformer(args, max_seq_len=max_model_len(settings, args))
    load_weights(model, model_dir)
    name = settings.served_model_name or model_dir.resolve().name
    return model.eval(), tokenizer, name, f"{args.architecture} checkpoint at {model_dir}"


def max_model_len(settings: Settings, args: ModelArgs) -> int:
    return settings.max_model_len or args.max_position_embeddings


def lora_pool_bytes(settings: Settings, args: ModelArgs, dtype: torch.dtype) -> int:
    """Device bytes of the adapter pages: the budget, or enough for every slot to hold a max-rank adapter."""
    if settings.max_gpu_adapter_bytes is not None:
        return settings.max_gpu_adapter_bytes
    # A rank row of every module in every layer: A's row [d_in] plus B's column [d_out].
    rank_row = sum(d_in + d_out for d_in, d_out in args.lora_module_dims.values()) * args.n_layers
    pages = settings.max_gpu_adapters * pages_for_rank(settings.max_lora_rank)
    return pages * PAGE_RANK * rank_row * torch.finfo(dtype).bits // 8


def kv_cache_blocks(settings: Settings, args: ModelArgs, device: torch.device, dtype: torch.dtype) -> int:
    bytes_per_token = args.n_layers * 2 * args.n_kv_heads * args.head_dim * torch.finfo(dtype).bits // 8
    if settings.kv_cache_tokens is not None:
        tokens = settings.kv_cache_tokens
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        slot_pool = lora_pool_bytes(settings, args, dtype)
        budget = total * settings.gpu_memory_utilization - (total - free) - slot_pool - ACTIVATION_HEADROOM_BYTES
        tokens = int(budget // bytes_per_token)
    else:
        tokens = max(CPU_KV_CACHE_TOKENS, max_model_len(settings, args))
    blocks = tokens // settings.block_size
    if blocks < 1:
        raise ValueError(f"no memory left for the KV cache ({tokens} tokens); lower --max-model-len or the model")
    return blocks


def open_store(settings: Settings) -> AdapterStore:
    if settings.store is not None:
        return AdapterStore(settings.store)
    directory = tempfile.mkdtemp(prefix="lorahive-store-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    log.warning("no --store given: uploaded adapters live in %s and will not survive a restart", directory)
    return AdapterStore(directory)


def build_engine(settings: Settings) -> Engine:
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    model, tokenizer, name, description = load_model(settings, device, dtype)
    model.lora.backend = resolve_backend(settings.lora_backend, device)
    args = model.args
    registry = AdapterRegistry(
        open_store(settings),
        BaseModelShape(num_layers=args.n_layers, module_dims=args.lora_module_dims),
        max_rank=settings.max_lora_rank,
        host_budget_bytes=settings.max_host_adapter_bytes,
        pin_memory=device.type == "cuda",
        pinned_ids=frozenset(settings.pin),
        max_adapter_bytes=settings.max_adapter_bytes,
        serving_dtype=dtype,
        reserved_ids=frozenset({name}),
    )
    if settings.adapters is not None:
        registry.import_directory(settings.adapters)
    config = EngineConfig(
        max_model_len=max_model_len(settings, args),
        num_kv_blocks=kv_cache_blocks(settings, args, device, dtype),
        block_size=settings.block_size,
        max_gpu_adapters=settings.max_gpu_adapters,
        max_lora_rank=settings.max_lora_rank,
        max_gpu_adapter_bytes=settings.max_gpu_adapter_bytes,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_waiting_requests=settings.max_waiting_requests,
    )
    log.info("serving %s on %s (%s), KV cache %d blocks of %d tokens, LoRA backend %s", name, device, dtype,
             config.num_kv_blocks, config.block_size, model.lora.backend)
    metrics = Metrics(top_adapters=settings.metrics_top_adapters)
    return Engine(model, tokenizer, config, registry, name, description, metrics=metrics)
