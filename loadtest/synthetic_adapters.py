"""Synthetic LoRA adapters in PEFT's format: random A/B weights shaped for a Llama-family base model.

They exist to load-test the cost of adapters, not their quality: `adapter_config.json` +
`adapter_model.safetensors` with tensors named as `peft` saves them
(`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, d_in], `...lora_B.weight`
[d_out, r]). numpy + `safetensors.numpy` only: the harness never imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import save as save_safetensors

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
AdapterDtype = Literal["float16", "float32"]
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class BaseDims:
    """The shapes a LoRA adapter must match: a Llama-family decoder's projection sizes."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    # Flag / JSON names -> ours. Hugging Face config.json names are accepted too, so `--model-config`
    # can read a checkpoint's config and a server can publish either spelling.
    _ALIASES = {
        "hidden_size": ("hidden_size", "dim"),
        "intermediate_size": ("intermediate_size",),
        "num_layers": ("num_layers", "num_hidden_layers", "n_layers"),
        "num_heads": ("num_heads", "num_attention_heads", "n_heads"),
        "num_kv_heads": ("num_kv_heads", "num_key_value_heads", "n_kv_heads"),
        "head_dim": ("head_dim",),
    }

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> BaseDims:
        """From a server's `dims` object or a Hugging Face `config.json`; missing `num_kv_heads` means
        no grouped-query attention, missing `head_dim` is hidden_size / num_heads."""
        found: dict[str, Any] = {}
        for ours, names in cls._ALIASES.items():
            found[ours] = next((values[n] for n in names if values.get(n) is not None), None)
        missing = [k for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads") if found[k] is None]
        if missing:
            raise ValueError(f"model dimensions lack {', '.join(missing)}")
        found["num_kv_heads"] = found["num_kv_heads"] or found["num_heads"]
        found["head_dim"] = found["head_dim"] or found["hidden_size"] // found["num_heads"]
        return cls(**found)

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each target projection."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


# lorahive's embedded demo model (`lorahive serve` with no --model), for CPU runs and tests.
DEMO_DIMS = BaseDims(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32)


@dataclass(frozen=True)
class AdapterSpec:
    rank: int = 8
    alpha: float | None = None  # None: 2 * rank, a common choice
    targets: Sequence[str] = TARGET_MODULES
    dtype: AdapterDtype = "float16"
    init_std: float = 0.01  # small: the base model's output moves, but not into NaNs

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"the rank must be positive, got {self.rank}")
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            raise ValueError(f"target modules must be among {', '.join(TARGET_MODULES)}, got {list(self.targets)}")


def adapter_files(dims: BaseDims, spec: AdapterSpec, seed: int, base_model: str | None = None) -> tuple[bytes, bytes]:
    """`(adapter_config.json, adapter_model.safetensors)` bytes of one synthetic adapter."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha if spec.alpha is not None else 2 * spec.rank,
        "target_modules": list(spec.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": base_model,
    }
    rng = np.random.default_rng(seed)
    dtype = np.dtype(spec.dtype)
    tensors: dict[str, np.ndarray] = {}
    module_dims = dims.module_dims()
    for layer in range(dims.num_layers):
        for module in spec.targets:
            d_in, d_out = module_dims[module]
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}"
            # B non-zero (unlike a fresh PEFT init), so no server can skip the adapter as a no-op.
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((spec.rank, d_in)) * spec.init_std).astype(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((d_out, spec.rank)) * spec.init_std).astype(dtype)
    return json.dumps(config, indent=2).encode(), save_safetensors(tensors)


def adapter_seed(seed: int, index: int) -> int:
    """Each adapter its own reproducible weights."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_adapter_dir(
    directory: Path, dims: BaseDims, spec: AdapterSpec, seed: int, base_model: str | None = None
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config, weights = adapter_files(dims, spec, seed, base_model)
    (directory / CONFIG_FILE).write_bytes(config)
    (directory / WEIGHTS_FILE).write_bytes(weights)


def adapter_ids(count: int, prefix: str) -> list[str]:
    width = max(len(str(count - 1)), 1)
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def write_adapters(
    root: Path, count: int, dims: BaseDims, spec: AdapterSpec, prefix: str = "lt-", seed: int = 0,
    base_model: str | None = None,
) -> list[str]:
    """`count` adapters as sub-directories of `root` (the layout `lorahive serve --adapters` reads)."""
    ids = adapter_ids(count, prefix)
    for i, adapter_id in enumerate(ids):
        write_adapter_dir(root / adapter_id, dims, spec, adapter_seed(seed, i), base_model)
    return ids
