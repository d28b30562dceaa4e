"""The functions the model calls for the LoRA delta of a mixed batch and for paged attention, and the choice
of backend for each.

`resolve_backend` (`resolve_attention_backend`) turns the `--lora-backend` (`--attention-backend`) setting into
"torch" or "triton" once, when the engine is built; `add_lora` (`paged_attention`) then takes that name on
every call. "auto" means Triton for CUDA tensors when triton
imports, the torch reference otherwise (CPU, or CUDA without triton). "triton" forced without CUDA runs the
same kernels through Triton's interpreter, which is how the CPU tests exercise them.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Literal

import torch

from kernels import attention_reference, reference, self_check
from kernels.attention_metadata import AttentionBatch
from kernels.layer_adapters import AdapterSlices
from kernels.metadata import LoRABatch
from kernels.paging import PageTable

BackendSetting = Literal["auto", "torch", "triton"]
Backend = Literal["torch", "triton"]
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what "auto" sends to Triton on CUDA

log = logging.getLogger("lorahive.kernels")


def _import_triton_module(name: str) -> ModuleType | None:
    """kernels.<name>, imported on first use; None when triton is not installed.

    Triton decides at decoration time whether kernels are compiled or interpreted, so without CUDA the
    interpreter is switched on before the first import (an explicit TRITON_INTERPRET wins).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        return importlib.import_module(f"kernels.{name}")
    except ImportError:
        return None


@functools.cache
def triton_ops() -> ModuleType | None:
    """kernels.triton_ops (the LoRA kernels), or None without triton."""
    return _import_triton_module("triton_ops")


@functools.cache
def attention_ops() -> ModuleType | None:
    """kernels.attention_triton (the paged attention kernels), or None without triton."""
    return _import_triton_module("attention_triton")


def _resolve(setting: BackendSetting, device: torch.device | str, ops: Callable[[], ModuleType | None],
             flag: str) -> Backend:
    device = torch.device(device)
    if setting == "torch":
        return "torch"
    if setting == "triton":
        module = ops()
        if module is None:
            raise RuntimeError(f"{flag} triton needs the triton package, which is not installed")
        if device.type != "cuda" and not module.INTERPRETED:
            raise RuntimeError(
                f"{flag} triton on a CPU device needs Triton's interpreter, but the kernels were already "
                "compiled for the GPU; set TRITON_INTERPRET=1 before starting"
            )
        return "triton"
    if setting != "auto":
        raise ValueError(f"unknown {flag} {setting!r}; expected auto, torch or triton")
    return "triton" if device.type == "cuda" and ops() is not None else "torch"


def resolve_backend(
    setting: BackendSetting, device: torch.device | str, dtype: torch.dtype | None = None
) -> Backend:
    """The LoRA backend a model on `device` (weights in `dtype`) uses for the whole run.

    Triton is chosen only once its kernels, run on `device` in `dtype` on a small batch, agree with the torch
    reference (`kernels.self_check`); otherwise the reference serves, and a warning says why.
    """
    device = torch.device(device)
    chosen = _resolve(setting, device, triton_ops, "--lora-backend")
    if chosen == "triton":
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        problem = self_check.disagreement(triton_ops(), device, dtype)
        if problem is not None:
            log.warning("LoRA backend: using the torch reference instead of Triton on %s (%s): %s", device, dtype,
                        problem)
            return "torch"
    return chosen


def resolve_attention_backend(
    setting: BackendSetting,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    shape: self_check.AttentionShape = self_check.AttentionShape(),  # noqa: B008 - frozen, never mutated
) -> Backend:
    """The attention backend a model on `device` (cache in `dtype`, heads and window as `shape`) uses for the run.

    As for LoRA, Triton is chosen only once its kernels, run on `device` on a decode and a prefill/extend step of
    `shape`, agree with the torch reference (`kernels.self_check`); otherwise the reference serves, with a warning.
    """
    device = torch.device(device)
    chosen = _resolve(setting, device, attention_ops, "--attention-backend")
    if chosen == "triton":
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        problem = self_check.attention_disagreement(attention_ops(), device, dtype, shape)
        if problem is not None:
            log.warning("attention backend: using the torch reference instead of Triton on %s (%s): %s", device,
                        dtype, problem)
            return "torch"
    return chosen


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    batch: LoRABatch,
    slice_widths: tuple[int, ...],
    table: PageTable,
    backend: BackendSetting = "auto",
    targets: Mapping[int, AdapterSlices] | None = None,
) -> None:
    """y += per-token LoRA delta (shrink then multi-slice expand), in place.

    `lora_a`/`lora_b` are paged buffers and `table` each slot's pages and rank (`kernels.paging`); None where the
    torch reference reads every adapter's weights from `targets` (a CPU model runner's). A step
    whose tokens all use slot -1, or adapters without LoRA weights (IA3, prompt tuning), returns at once: it
    launches no LoRA kernel. Both backends do
    rank-r work for a rank-r adapter; the reference also skips the slices an adapter does not target, as
    `targets` (`reference.add_lora`) tells. "auto" resolves per call from the tensors (for direct callers; the
    engine passes an already resolved backend).
    """
    if not batch.has_lora or x.shape[0] == 0 or not _weighted_slots(batch, table):
        return
    if backend == "auto":
        use_triton = x.is_cuda and x.dtype in TRITON_DTYPES and triton_ops() is not None
    else:
        use_triton = backend == "triton"
    if use_triton:
        ops = triton_ops()
        if ops is None:
            raise RuntimeError("the Triton LoRA backend was requested but triton is not installed")
        ops.add_lora(y, x, lora_a, lora_b, batch, slice_widths, table)
        return
    reference.add_lora(y, x, lora_a, lora_b, batch, slice_widths, table, targets)


def _weighted_slots(batch: LoRABatch, table: PageTable) -> tuple[int, ...]:
    """The step's slots whose adapters have LoRA weights (a rank); worked out once per step."""
    if batch.weighted_slots is not None:
        return batch.weighted_slots
    return batch.active_marked(table.host_ranks, "weighted slots")


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    window: int | None = None,
    backend: BackendSetting = "auto",
) -> torch.Tensor:
    """Causal attention of a step's queries over their sequences' paged KV cache (`kernels.attention_reference`
    states the contract). Triton runs the split-KV decode kernel for a decode-only step and the varlen
    prefill/extend kernel for any other; "auto" resolves per call from the tensors."""
    if backend == "auto":
        use_triton = q.is_cuda and q.dtype in TRITON_DTYPES and attention_ops() is not None
    else:
        use_triton = backend == "triton"
    if not use_triton:
        return attention_reference.paged_attention(q, k_cache, v_cache, batch, window)
    ops = attention_ops()
    if ops is None:
        raise RuntimeError("the Triton attention backend was requested but triton is not installed")
    return ops.paged_attention(q, k_cache, v_cache, batch, window)
