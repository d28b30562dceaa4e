"""The LoRA math: per-token low-rank deltas for a batch that mixes many adapters (Punica's contract).

`add_lora` is the one entry point the model calls; `LoRABatch` is the per-step token -> slot metadata
it reads; `PageTable` says where each slot's weights sit in the paged buffers; `resolve_backend` picks
Triton or the torch reference once per engine. Nothing here knows about HTTP, adapter names or tenants:
only slots and pages. Triton is imported lazily, so `import kernels` works without it.
"""

from kernels.dispatch import add_lora, resolve_backend
from kernels.metadata import LoRABatch
from kernels.paging import PageTable

__all__ = ["LoRABatch", "PageTable", "add_lora", "resolve_backend"]
