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
from kernels import AttentionShape, resolve_attention_backend, resolve_backend
from kernels.paging import PAGE_RANK, pages_for_rank
from server.adapter_registry import AdapterRegistry
from server.checkpoint import load_weights, read_config
from server.config import Settings, StartupError
from server.demo import DEMO_DESCRIPTION, DEMO_MODEL_NAME, build_demo_model
from server.engine import Engine, EngineConfig
from server.metrics import Metrics
from server.model import ModelArgs, Transformer
from server.startup_import import import_adapters
from server.tokenizer import Tokenizer

log = logging.getLogger("lorahive.runtime")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_CACHE_TOKENS = 32768  # default on CPU: plenty for the demo, a bounded footprint for real models
ACTIVATION_HEADROOM_BYTES = 2 * 2**30  # kept free on CUDA for activations and the sampler


def pick_device(setting: str) -> torch.device:
    """The torch device `--device` names, checked usable; StartupError otherwise."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise StartupError(f"--device {setting}: not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StartupError(f"--device {setting}: this torch ({torch.__version__}) cannot use CUDA (a build without "
                           "it, or no GPU visible); use --device cpu, or install torch with CUDA")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch asserts for backends it was built without
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StartupError(f"--device {setting}: torch cannot use it ({reason}); use auto, cpu or cuda") from None
    return device


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
    try:
        args = read_config(model_dir)
        tokenizer = Tokenizer.from_dir(model_dir)
        with _building_on(device, dtype):
            model = Transformer(args, max_seq_len=max_model_len(settings, args))
        load_weights(model, model_dir)
    except ValueError as exc:  # what the checkpoint's files get wrong; each message names the file
        raise StartupError(f"--model {model_dir}: {exc}") from None
    name = settings.served_model_name or model_dir.resolve().name
    # The description reaches every tenant through /v1/models: no server path in it.
    return model.eval(), tokenizer, name, f"{args.architecture} checkpoint"


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


def check_paths(settings: Settings) -> None:
    """Refuse a --model, --adapters or --store that cannot be what it must, before anything loads."""
    if settings.model is not None:
        _check_directory("--model", settings.model, "a local Hugging Face checkpoint directory (config.json, "
                         "*.safetensors, tokenizer.json); hub ids are not downloaded: fetch the checkpoint first "
                         "(huggingface-cli download ORG/NAME --local-dir DIR) and pass DIR")
    if settings.adapters is not None:
        _check_directory("--adapters", settings.adapters, "a directory of PEFT adapter directories, or one "
                         "adapter's directory")
    if settings.store is not None and settings.store.exists() and not settings.store.is_dir():
        raise StartupError(f"--store {settings.store} is a file; --store takes a directory (created if missing) "
                           "for the adapter store")


def _check_directory(flag: str, path: Path, wanted: str) -> None:
    if not path.exists():
        raise StartupError(f"{flag} {path}: no such directory; {flag} takes {wanted}")
    if not path.is_dir():
        raise StartupError(f"{flag} {path} is a file, not a directory (its directory is {path.parent}); {flag} "
                           f"takes {wanted}")


def open_store(settings: Settings) -> AdapterStore:
    if settings.store is not None:
        try:
            return AdapterStore(settings.store)
        except OSError as exc:
            raise StartupError(f"--store {settings.store}: cannot use it for the adapter store ({exc})") from None
    directory = tempfile.mkdtemp(prefix="lorahive-store-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    log.warning("no --store given: uploaded adapters live in %s and will not survive a restart", directory)
    return AdapterStore(directory)


def build_engine(settings: Settings) -> Engine:
    """The engine `settings` describe; StartupError names the flag of a setting it cannot start with."""
    check_paths(settings)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    model, tokenizer, name, description = load_model(settings, device, dtype)
    model.lora.backend = resolve_backend(settings.lora_backend, device, dtype)
    args = model.args
    model.attention_context.backend = resolve_attention_backend(
        settings.attention_backend, device, dtype,
        AttentionShape(args.n_heads, args.n_kv_heads, args.head_dim, settings.block_size, args.sliding_window),
    )
    registry = AdapterRegistry(
        open_store(settings),
        BaseModelShape(num_layers=args.n_layers, module_dims=args.lora_module_dims),
        max_rank=settings.max_lora_rank,
        host_budget_bytes=settings.max_host_adapter_bytes,
        pin_memory=device.type == "cuda",
        pinned_ids=frozenset(settings.pin),
        max_adapter_bytes=settings.max_adapter_bytes,
        revalidate_s=settings.store_revalidate_seconds,
        serving_dtype=dtype,
        reserved_ids=frozenset({name}),
    )
    if settings.adapters is not None:
        import_adapters(registry, settings.adapters)
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
    log.info("serving %s on %s (%s), KV cache %d blocks of %d tokens, LoRA backend %s, attention backend %s", name,
             device, dtype, config.num_kv_blocks, config.block_size, model.lora.backend,
             model.attention_context.backend)
    metrics = Metrics(top_adapters=settings.metrics_top_adapters)
    return Engine(model, tokenizer, config, registry, name, description, metrics=metrics)
