"""The LoRA math: per-token low-rank deltas for a batch that mixes many adapters (Punica's contract).

`add_lora` is the one entry point the model calls; `LoRABatch` is the per-step token -> slot metadata
it reads; `PageTable` says where each slot's weights sit in the paged buffers; `resolve_backend` picks
Triton or the torch reference once per engine. `paged_attention` is causal attention read straight from the
KV cache's block table (`AttentionBatch` its per-step metadata; `resolve_attention_backend` its choice, checked on
an `AttentionShape`).
Nothing here knows about HTTP, adapter names or tenants: only slots, pages and cache blocks.
Triton is imported lazily, so `import kernels` works without it.
"""

from kernels.attention_metadata import AttentionBatch
from kernels.dispatch import add_lora, paged_attention, resolve_attention_backend, resolve_backend
from kernels.metadata import LoRABatch
from kernels.paging import PageTable
from kernels.self_check import AttentionShape

__all__ = [
    "AttentionBatch",
    "AttentionShape",
    "LoRABatch",
    "PageTable",
    "add_lora",
    "paged_attention",
    "resolve_attention_backend",
    "resolve_backend",
]
