"""The LoRA math: per-token low-rank deltas for a batch that mixes many adapters (Punica's contract).

`add_lora` is the one entry point the model calls; `LoRABatch` is the per-step token -> slot metadata
it reads. Nothing here knows about HTTP, adapter names or tenants: only slots.
"""

from kernels.dispatch import add_lora
from kernels.metadata import LoRABatch

__all__ = ["LoRABatch", "add_lora"]
