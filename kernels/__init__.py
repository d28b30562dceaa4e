"""The LoRA math: per-token low-rank deltas for a batch that mixes many adapters (Punica's contract).

`add_lora` is the one entry point the model calls; `LoRABatch` is the per-step token -> slot metadata
it reads; `resolve_backend` picks Triton or the torch reference once per engine. Nothing here knows about
HTTP, adapter names or tenants: only slots. Triton is imported lazily, so `import kernels` works without it.
"""

from kernels.dispatch import add_lora, resolve_backend
from kernels.metadata import LoRABatch

__all__ = ["LoRABatch", "add_lora", "resolve_backend"]
