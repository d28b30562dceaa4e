"""Assembling an engine from settings: device, dtype, weights, KV-cache size, start-up adapters."""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from adapters_store import AdapterStore, BaseModelShape
from kernels import AttentionShape, resolve_attention_backend, resolve_backend
from kernels.layer_adapters import AdapterStack
from kernels.paging import PAGE_RANK
from kernels.reference import accumulation_dtype
from server.adapter_pool import max_rank_adapter_bytes as pool_max_rank_adapter_bytes
from server.adapter_registry import AdapterRegistry
from server.checkpoint import load_weights, read_config
from server.config import Settings, StartupError
from server.demo import DEMO_DESCRIPTION, DEMO_MODEL_NAME, build_demo_model
from server.engine import Engine, EngineConfig, RunnerFactory
from server.memory_profile import StepLimits, estimate_decode_graph_pool, estimate_largest_step, measure_largest_step
from server.metrics import Metrics
from server.model import SHARED_INPUT_MODULES, ModelArgs, Transformer
from server.model_runner import ModelRunner, adapter_page_bytes, holds_adapters_in_pages, soft_prompt_rows_per_page
from server.runner_process import ProcessRunner, RunnerInfo
from server.startup_import import import_adapters
from server.tokenizer import Tokenizer, build_byte_tokenizer
from server.torch_threads import engine_threads, limit_current_thread, run_on_exiting_thread

log = logging.getLogger("lorahive.runtime")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_CACHE_TOKENS = 32768  # default on CPU: plenty for the demo, a bounded footprint for real models


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


def served_model_name(settings: Settings) -> str:
    """The base model's name in the API: --served-model-name, else the demo's or the checkpoint directory's."""
    if settings.served_model_name:
        return settings.served_model_name
    return DEMO_MODEL_NAME if settings.model is None else Path(settings.model).resolve().name


def load_tokenizer(settings: Settings) -> tuple[Tokenizer, str, str]:
    """The model's tokenizer, its served name and a one-line description (no weights are read)."""
    if settings.model is None:
        return build_byte_tokenizer(), served_model_name(settings), DEMO_DESCRIPTION
    model_dir = Path(settings.model)
    try:
        args = read_config(model_dir)
        tokenizer = Tokenizer.from_dir(model_dir)
    except ValueError as exc:  # what the checkpoint's files get wrong; each message names the file
        raise StartupError(f"--model {model_dir}: {exc}") from None
    # The description reaches every tenant through /v1/models: no server path in it.
    return tokenizer, served_model_name(settings), f"{args.architecture} checkpoint"


def load_model(settings: Settings, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The model's weights on `device` in `dtype`."""
    if settings.model is None:
        model, _ = build_demo_model(settings.seed)
        demo_len = model.args.max_position_embeddings  # its rotary table ends there: no position past it exists
        if max_model_len(settings, model.args) > demo_len:
            raise StartupError(f"--max-model-len {settings.max_model_len}: the demo model's positions end at "
                               f"{demo_len}; lower --max-model-len, or serve a checkpoint with --model")
        return model.to(device, dtype)
    model_dir = Path(settings.model)
    try:
        args = read_config(model_dir)
        with _building_on(device, dtype):
            model = Transformer(args, max_seq_len=max_model_len(settings, args))
        load_weights(model, model_dir)
    except ValueError as exc:  # what the checkpoint's files get wrong; each message names the file
        raise StartupError(f"--model {model_dir}: {exc}") from None
    return model.eval()


def load_runner_model(settings: Settings) -> tuple[Transformer, RunnerInfo]:
    """The model runner's half of start-up: the model on its device with its kernels chosen, and the KV-cache
    blocks that fit beside it."""
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    model = load_model(settings, device, dtype)
    model.lora.backend = resolve_backend(settings.lora_backend, device, dtype)
    args = model.args
    model.attention_context.backend = resolve_attention_backend(
        settings.attention_backend, device, dtype,
        AttentionShape(args.n_heads, args.n_kv_heads, args.head_dim, settings.block_size, args.sliding_window),
    )
    description = (f"{device} ({dtype}), LoRA backend {model.lora.backend}, attention backend "
                   f"{model.attention_context.backend}")
    paged = holds_adapters_in_pages(model)
    model.lora.stack_bytes = stack_budget_bytes(settings, args, dtype, paged)
    blocks, adapter_bytes = kv_cache_blocks(settings, model, device, dtype, paged)
    return model, RunnerInfo(args, adapter_page_bytes(model), paged, adapter_bytes, blocks, str(device), dtype,
                             description)


def max_model_len(settings: Settings, args: ModelArgs) -> int:
    return settings.max_model_len or args.max_position_embeddings


def max_soft_prompt_tokens(settings: Settings, info: RunnerInfo) -> int:
    """The longest soft prompt (prompt tuning) this server serves: the context must leave room for a prompt token
    and a generated one, and the device tier must hold its embeddings."""
    by_context = max_model_len(settings, info.args) - 2
    if info.paged:
        by_tier = info.adapter_bytes // info.page_bytes * soft_prompt_rows_per_page(info.args)
    else:
        by_tier = info.adapter_bytes // (info.args.dim * info.dtype.itemsize)
    return max(min(by_context, by_tier), 0)


def lora_pool_bytes(settings: Settings, args: ModelArgs, dtype: torch.dtype, paged: bool = True) -> int | None:
    """Device bytes of the adapter tier that the settings fix: --max-gpu-adapter-bytes; else, held in host buffers
    (`paged` False), --max-host-adapter-bytes, the memory they are in; else pages for --max-gpu-adapters max-rank
    adapters. None: nothing fixes them (on a GPU `kv_cache_blocks` then gives them --adapter-memory-share)."""
    if settings.max_gpu_adapter_bytes is not None:
        return settings.max_gpu_adapter_bytes
    if not paged:  # room for one max-rank adapter at least, however small the host tier (which then re-reads)
        return max(host_tier_bytes(settings, args, dtype, paged), max_rank_adapter_bytes(settings, args, dtype, paged))
    if settings.max_gpu_adapters is None:
        return None
    return settings.max_gpu_adapters * max_rank_adapter_bytes(settings, args, dtype)


# The share of --max-host-adapter-bytes that a CPU model runner's kept stacks may take at most (the copies of a
# batch's adapters that its tokens read together, `kernels.layer_adapters.AdapterStack`); the host tier gets the
# rest, so that adapter weights in host memory stay within the flag. A batch whose stack would not fit goes
# adapter by adapter: slower, as correct.
STACK_SHARE = 1 / 8


def stack_budget_bytes(settings: Settings, args: ModelArgs, dtype: torch.dtype, paged: bool) -> int:
    """Host bytes a model runner without pages may spend on kept stacks: `STACK_SHARE` of --max-host-adapter-bytes,
    or what --max-num-seqs adapters of --max-lora-rank on every module would need where that is less; 0 with
    pages (the kernels read the pages, nothing is stacked)."""
    if paged:
        return 0
    need = (AdapterStack.capacity_for(settings.max_num_seqs) * settings.max_lora_rank * _rank_row(args)
            * accumulation_dtype(dtype).itemsize)
    return min(int(settings.max_host_adapter_bytes * STACK_SHARE), need)


def host_tier_bytes(settings: Settings, args: ModelArgs, dtype: torch.dtype, paged: bool) -> int:
    """The host tier's budget: --max-host-adapter-bytes less what kept stacks may take (`stack_budget_bytes`)."""
    return settings.max_host_adapter_bytes - stack_budget_bytes(settings, args, dtype, paged)


def max_rank_adapter_bytes(settings: Settings, args: ModelArgs, dtype: torch.dtype, paged: bool = True) -> int:
    """What one adapter of --max-lora-rank on every module takes of the device tier: its pages, or its bytes."""
    return pool_max_rank_adapter_bytes(settings.max_lora_rank,
                                       PAGE_RANK * _rank_row(args) * torch.finfo(dtype).bits // 8, paged)


def _rank_row(args: ModelArgs) -> int:
    """Elements of one rank of an adapter on every module of every layer: A's row [d_in] plus B's column [d_out]."""
    return sum(d_in + d_out for d_in, d_out in args.lora_module_dims.values()) * args.n_layers


def check_adapter_tier_holds_one(settings: Settings, info: RunnerInfo) -> None:
    """Refuse a device tier too small for one adapter of --max-lora-rank on every module."""
    one = pool_max_rank_adapter_bytes(settings.max_lora_rank, info.page_bytes, info.paged)
    if info.adapter_bytes < one:
        unit = "in pages of 16 ranks" if info.paged else "as packed weights"
        raise StartupError(
            f"--max-gpu-adapter-bytes {info.adapter_bytes} is less than one adapter of --max-lora-rank "
            f"{settings.max_lora_rank} on every module takes on this model ({one} bytes {unit}); raise "
            "--max-gpu-adapter-bytes or lower --max-lora-rank")


# Pages for this many adapters of --max-lora-rank where nothing sizes a paged tier in host memory (the Triton
# kernels run by the interpreter on a CPU, for tests): every one of those pages is allocated at start.
CPU_PAGED_ADAPTERS = 8


def step_limits(settings: Settings, args: ModelArgs) -> StepLimits:
    """What bounds the largest step the engine these settings describe can build."""
    return StepLimits(
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_num_seqs=settings.max_num_seqs,
        max_model_len=max_model_len(settings, args),
        block_size=settings.block_size,
        max_gpu_adapters=settings.max_gpu_adapters,
        max_lora_rank=settings.max_lora_rank,
    )


def kv_cache_blocks(settings: Settings, model: Transformer, device: torch.device, dtype: torch.dtype,
                    paged: bool = True) -> tuple[int, int]:
    """Blocks of KV cache that fit beside the weights, the adapter tier and the largest step's activations, and the
    adapter tier's bytes (`lora_pool_bytes`; on a GPU without a setting, --adapter-memory-share of what is left).

    StartupError, naming the flags to change, when that memory is not there or holds less than one sequence of
    --max-model-len tokens."""
    args = model.args
    bytes_per_token = args.n_layers * 2 * args.n_kv_heads * args.head_dim * torch.finfo(dtype).bits // 8
    limits = step_limits(settings, args)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        try:
            peak = measure_largest_step(model, limits)
        except torch.cuda.OutOfMemoryError:
            raise StartupError(
                f"the largest step the scheduler can build (--max-num-batched-tokens {limits.max_num_batched_tokens}"
                f", --max-num-seqs {limits.max_num_seqs}, --max-model-len {limits.max_model_len}) does not fit in GPU "
                "memory beside the weights and the adapter pool; lower those flags, or --max-gpu-adapters") from None
        finally:
            torch.cuda.empty_cache()  # the profile's cached blocks go back before the cache claims its memory
        log.info("largest step (%d tokens, %d sequences): peak activations %.2f GiB measured, %.2f GiB bound",
                 limits.max_num_batched_tokens, limits.max_num_seqs, peak / 2**30,
                 estimate_largest_step(args, limits, dtype) / 2**30)
        # The decode graphs are captured after the cache is allocated (as vLLM does): their pool is set aside now.
        graph_pool = 0 if settings.enforce_eager else estimate_decode_graph_pool(args, limits, dtype)
        budget = GpuBudget(total, total - free, 0, peak, graph_pool)
        adapter_bytes = lora_pool_bytes(settings, args, dtype, paged)
        if adapter_bytes is None:  # a share of what the KV cache and the adapters divide, one max-rank adapter at least
            adapter_bytes = max(int(settings.adapter_memory_share * max(budget.for_kv_cache(
                settings.gpu_memory_utilization), 0)), max_rank_adapter_bytes(settings, args, dtype))
        budget = replace(budget, adapter_pool=adapter_bytes)
        tokens = cuda_kv_tokens(settings, budget, bytes_per_token)
    else:
        adapter_bytes = lora_pool_bytes(settings, args, dtype, paged)
        if adapter_bytes is None:
            adapter_bytes = CPU_PAGED_ADAPTERS * max_rank_adapter_bytes(settings, args, dtype)
        tokens = settings.kv_cache_tokens or max(CPU_KV_CACHE_TOKENS, limits.max_model_len)
        check_host_headroom(settings, tokens, tokens * bytes_per_token, estimate_largest_step(args, limits, dtype))
    check_holds_one_sequence(settings, tokens, limits.max_model_len)
    if tokens < settings.block_size:  # only an explicit --kv-cache-tokens gets here: sizing never leaves this little
        raise StartupError(f"--kv-cache-tokens {tokens} is less than one block (--block-size {settings.block_size})")
    return tokens // settings.block_size, adapter_bytes


@dataclass(frozen=True)
class GpuBudget:
    """Device bytes at start-up, before the KV cache: what there is and what is spoken for."""

    total: int
    in_use: int  # weights, the CUDA context, other processes
    adapter_pool: int
    activation_peak: int  # of the largest step the scheduler can build
    graph_pool: int = 0  # bound on the decode CUDA graphs' memory pool (none with --enforce-eager)

    def for_kv_cache(self, utilization: float) -> int:
        return (int(self.total * utilization) - self.in_use - self.adapter_pool - self.activation_peak
                - self.graph_pool)


def cuda_kv_tokens(settings: Settings, budget: GpuBudget, bytes_per_token: int) -> int:
    """KV-cache tokens on CUDA: --kv-cache-tokens if it fits, else all the budget leaves; StartupError if neither."""
    left = budget.for_kv_cache(settings.gpu_memory_utilization)
    log.info("GPU memory: %s x --gpu-memory-utilization %s, %s in use (weights), %s adapter pool, %s largest "
             "step, %s decode graphs: %s left for the KV cache (%d tokens of %d bytes)", _gib(budget.total),
             settings.gpu_memory_utilization, _gib(budget.in_use), _gib(budget.adapter_pool),
             _gib(budget.activation_peak), _gib(budget.graph_pool), _gib(max(left, 0)),
             max(left, 0) // bytes_per_token, bytes_per_token)
    if settings.kv_cache_tokens is None:
        return max(left, 0) // bytes_per_token
    wanted = settings.kv_cache_tokens * bytes_per_token
    if wanted > left:
        raise StartupError(
            f"--kv-cache-tokens {settings.kv_cache_tokens} needs {_gib(wanted)}, but only {_gib(max(left, 0))} of "
            f"--gpu-memory-utilization {settings.gpu_memory_utilization} x {_gib(budget.total)} are left after "
            f"{_gib(budget.in_use)} in use, the {_gib(budget.adapter_pool)} adapter pool and the "
            f"{_gib(budget.activation_peak)} peak of the largest step; lower --kv-cache-tokens (at most "
            f"{max(left, 0) // bytes_per_token}), or raise --gpu-memory-utilization, or lower "
            "--max-num-batched-tokens, --max-num-seqs or --max-gpu-adapters")
    return settings.kv_cache_tokens


def check_host_headroom(settings: Settings, kv_tokens: int, kv_bytes: int, activation_peak: int) -> None:
    """On the CPU, refuse a KV cache that with the largest step's activations exceeds the memory available now."""
    available = _host_available_bytes()
    if available is None or kv_bytes + activation_peak <= available:
        return
    cache = f"--kv-cache-tokens {kv_tokens}" if settings.kv_cache_tokens else f"The default {kv_tokens}-token KV cache"
    raise StartupError(
        f"{cache} takes {_gib(kv_bytes)} and the largest step (--max-num-batched-tokens "
        f"{settings.max_num_batched_tokens}, --max-num-seqs {settings.max_num_seqs}) up to {_gib(activation_peak)}, "
        f"but this machine has {_gib(available)} available; lower --kv-cache-tokens, --max-num-batched-tokens or "
        "--max-num-seqs")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _host_available_bytes() -> int | None:
    """MemAvailable of Linux's /proc/meminfo (free memory plus what the kernel can reclaim); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_holds_one_sequence(settings: Settings, kv_tokens: int, model_len: int) -> None:
    """Refuse a --max-model-len one sequence of which the KV cache cannot hold.

    An explicit --kv-cache-tokens below the model's default context length is the operator's choice, kept as
    before: requests longer than the cache are refused one by one."""
    if kv_tokens >= model_len:
        return
    if settings.max_model_len is None and settings.kv_cache_tokens is not None:
        log.warning("the KV cache holds %d tokens, fewer than the model's context length %d: longer requests are "
                    "refused; set --max-model-len %d to say so up front", kv_tokens, model_len, kv_tokens)
        return
    length = f"--max-model-len {model_len}" if settings.max_model_len else (
        f"--max-model-len (default: the model's {model_len})")
    if settings.kv_cache_tokens is not None:
        fix = f"raise --kv-cache-tokens to at least {model_len} or lower --max-model-len to at most {kv_tokens}"
    else:
        fix = (f"lower --max-model-len (to at most {kv_tokens}), or raise --gpu-memory-utilization (now "
               f"{settings.gpu_memory_utilization}), or lower --max-num-batched-tokens, --max-num-seqs or "
               "--max-gpu-adapters, which reserve activation and adapter memory")
    raise StartupError(f"{length}: the KV cache holds {kv_tokens} tokens, fewer than one sequence of {model_len}; "
                       f"{fix}")


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
    """The engine `settings` describe; StartupError names the flag of a setting it cannot start with.

    The calling thread runs torch with one thread from here on. In process, the building (weights, backends'
    self-checks, the memory profile, the KV cache) gets the engine's threads, on a thread that exits when it is done
    (server/torch_threads.py); with --model-runner-process the worker process does it (server/runner_process.py)."""
    limit_current_thread()
    check_paths(settings)
    if settings.model_runner_process:
        worker = ProcessRunner.start(settings)
        try:
            return _engine(settings, worker.info, worker.attach)
        except BaseException:
            worker.close()
            raise
    return run_on_exiting_thread(lambda: _engine_in_process(settings), "lorahive-build",
                                 engine_threads(settings.engine_threads))


def _engine_in_process(settings: Settings) -> Engine:
    model, info = load_runner_model(settings)
    return _engine(settings, info, functools.partial(ModelRunner, model))


def _engine(settings: Settings, info: RunnerInfo, make_runner: RunnerFactory) -> Engine:
    """The engine around the model runner `make_runner` builds, whose model `info` describes: the adapter registry
    (and the start-up import), the engine's settings, its metrics."""
    tokenizer, name, description = load_tokenizer(settings)
    args = info.args
    check_adapter_tier_holds_one(settings, info)
    registry = AdapterRegistry(
        open_store(settings),
        BaseModelShape(num_layers=args.n_layers, module_dims=args.lora_module_dims,
                       shared_input_modules=SHARED_INPUT_MODULES, hidden_size=args.dim,
                       max_virtual_tokens=max_soft_prompt_tokens(settings, info)),
        max_rank=settings.max_lora_rank,
        host_budget_bytes=host_tier_bytes(settings, args, info.dtype, info.paged),
        # Pinned host copies speed up copies to a GPU in this process; a worker gets them through shared memory, and
        # pinning here would open a CUDA context in this process too.
        pin_memory=torch.device(info.device).type == "cuda" and not settings.model_runner_process,
        share_memory=settings.model_runner_process,  # the worker then receives them without a copy
        pinned_ids=frozenset(settings.pin),
        max_adapter_bytes=settings.max_adapter_bytes,
        revalidate_s=settings.store_revalidate_seconds,
        serving_dtype=info.dtype,
        reserved_ids=frozenset({name}),
    )
    if settings.adapters is not None:
        import_adapters(registry, settings.adapters)
    config = EngineConfig(
        max_model_len=max_model_len(settings, args),
        num_kv_blocks=info.num_kv_blocks,
        block_size=settings.block_size,
        max_gpu_adapters=settings.max_gpu_adapters,
        max_lora_rank=settings.max_lora_rank,
        max_gpu_adapter_bytes=info.adapter_bytes,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_waiting_requests=settings.max_waiting_requests,
        enforce_eager=settings.enforce_eager,
        # With the model runner in its own process the engine thread runs no torch work worth a thread team.
        engine_threads=1 if settings.model_runner_process else settings.engine_threads,
    )
    stacks = stack_budget_bytes(settings, args, info.dtype, info.paged)
    log.info("serving %s on %s, KV cache %d blocks of %d tokens, adapters on the device: %s %s%s", name,
             info.description, config.num_kv_blocks, config.block_size, _gib(info.adapter_bytes),
             "in pages" if info.paged else
             f"read from host memory where they are (and stacks of a batch's adapters: {_gib(stacks)} at most)",
             ", model runner in its own process" if settings.model_runner_process else "")
    metrics = Metrics(top_adapters=settings.metrics_top_adapters)
    return Engine(args, info.page_bytes, make_runner, tokenizer, config, registry, name, description,
                  metrics=metrics, paged=info.paged)
