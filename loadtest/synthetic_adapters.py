"""Synthetic PEFT adapters: random weights shaped for a Llama-family base model, of each kind lorahive serves.

They exist to load-test the cost of adapters, not their quality: `adapter_config.json` +
`adapter_model.safetensors` with the config keys, tensor names and shapes `peft` 0.21's `save_pretrained` writes:

- `lora`: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, d_in], `...lora_B.weight` [d_out, r];
- `dora`: LoRA's tensors plus `...lora_magnitude_vector` [d_out], and `use_dora: true`;
- `ia3`: `...ia3_l`, [d_out, 1] (scales the outputs) or, for a `feedforward_modules` one, [1, d_in] (the inputs);
- `prompt` (prompt tuning): one `prompt_embeddings` [num_virtual_tokens, hidden_size].

numpy + `safetensors.numpy` only: the harness never imports torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
from safetensors.numpy import save as save_safetensors

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
AdapterDtype = Literal["float16", "float32"]
AdapterKind = Literal["lora", "dora", "ia3", "prompt"]
ADAPTER_KINDS: tuple[AdapterKind, ...] = get_args(AdapterKind)
# PEFT's own IA3 default for Llama models: the outputs of k_proj and v_proj, the inputs of down_proj.
IA3_DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")
# The only modules whose inputs IA3 may scale: lorahive runs q|k|v and gate|up as fused layers sharing one input,
# which no module of them can scale alone, so the server refuses them as feedforward modules.
IA3_INPUT_SCALED = ("o_proj", "down_proj")
# The std of a Llama checkpoint's token embeddings: a soft prompt much smaller would barely register.
PROMPT_EMBEDDING_STD = 0.02
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class BaseDims:
    """The shapes an adapter must match: a Llama-family decoder's projection sizes."""

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
    rank: int = 8  # LoRA and DoRA only
    alpha: float | None = None  # None: 2 * rank, a common choice
    targets: Sequence[str] = TARGET_MODULES  # IA3 takes all seven as PEFT's default, IA3_DEFAULT_TARGETS; prompt: none
    dtype: AdapterDtype = "float16"
    init_std: float = 0.01  # small: the base model's output moves, but not into NaNs
    kind: AdapterKind = "lora"
    num_virtual_tokens: int = 8  # the soft prompt's length, prompt kind only

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"the adapter kind must be one of {', '.join(ADAPTER_KINDS)}, got {self.kind!r}")
        if self.rank < 1:
            raise ValueError(f"the rank must be positive, got {self.rank}")
        if self.num_virtual_tokens < 1:
            raise ValueError(f"the number of virtual tokens must be positive, got {self.num_virtual_tokens}")
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            raise ValueError(f"target modules must be among {', '.join(TARGET_MODULES)}, got {list(self.targets)}")


def spec_for(spec: AdapterSpec, kinds: Sequence[AdapterKind], index: int) -> AdapterSpec:
    """Adapter `index`'s spec: `kinds` taken in turn over the indices, so a mix is the same on every run; with
    no kinds, `spec`'s own."""
    return replace(spec, kind=kinds[index % len(kinds)]) if kinds else spec


class _Module(NamedTuple):
    """One adapted projection of one layer."""

    prefix: str  # the tensor names' stem, as PEFT writes it
    name: str
    d_in: int
    d_out: int


def _modules(dims: BaseDims, targets: Sequence[str]) -> Iterator[_Module]:
    module_dims = dims.module_dims()
    for layer in range(dims.num_layers):
        for name in targets:
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[name]}.{name}"
            yield _Module(prefix, name, *module_dims[name])


_Files = tuple[dict[str, Any], dict[str, np.ndarray]]  # (adapter_config.json's object, float64 tensors by name)


def _lora_files(dims: BaseDims, spec: AdapterSpec, rng: np.random.Generator) -> _Files:
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha if spec.alpha is not None else 2 * spec.rank,
        "target_modules": list(spec.targets),
        "lora_dropout": 0.0,
        "bias": "none",
    }
    tensors: dict[str, np.ndarray] = {}
    for module in _modules(dims, spec.targets):
        # B non-zero (unlike a fresh PEFT init), so no server can skip the adapter as a no-op.
        tensors[f"{module.prefix}.lora_A.weight"] = rng.standard_normal((spec.rank, module.d_in)) * spec.init_std
        tensors[f"{module.prefix}.lora_B.weight"] = rng.standard_normal((module.d_out, spec.rank)) * spec.init_std
    return config, tensors


def _dora_files(dims: BaseDims, spec: AdapterSpec, rng: np.random.Generator) -> _Files:
    """LoRA's files (the very tensors of a LoRA adapter with the same seed) plus a magnitude per output."""
    config, tensors = _lora_files(dims, spec, rng)
    for module in _modules(dims, spec.targets):
        # PEFT starts a magnitude at its weight's row norms: about sqrt(d_in) * 0.02 for a Llama checkpoint, whose
        # weights have a std of ~0.02. Spread around that as training would leave them, and positive, as norms are.
        magnitude = rng.uniform(0.5, 1.5, module.d_out) * math.sqrt(module.d_in) * 0.02
        tensors[f"{module.prefix}.lora_magnitude_vector"] = magnitude
    return config | {"use_dora": True}, tensors


def _ia3_modules(targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) of an IA3 adapter asked to adapt `targets`: all seven (the default)
    means PEFT's own Llama choice; a feedforward module is only ever one whose input lorahive can scale."""
    chosen = IA3_DEFAULT_TARGETS if set(targets) == set(TARGET_MODULES) else tuple(targets)
    return list(chosen), [name for name in chosen if name in IA3_INPUT_SCALED]


def _ia3_files(dims: BaseDims, spec: AdapterSpec, rng: np.random.Generator) -> _Files:
    targets, feedforward = _ia3_modules(spec.targets)
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "target_modules": targets,
        "feedforward_modules": feedforward,
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "modules_to_save": None,
    }
    tensors: dict[str, np.ndarray] = {}
    for module in _modules(dims, targets):
        shape = (1, module.d_in) if module.name in feedforward else (module.d_out, 1)
        # Around 1 but not 1 (PEFT's init), so no server can skip the adapter as a no-op.
        tensors[f"{module.prefix}.ia3_l"] = 1 + rng.standard_normal(shape) * spec.init_std
    return config, tensors


def _prompt_files(dims: BaseDims, spec: AdapterSpec, rng: np.random.Generator) -> _Files:
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": spec.num_virtual_tokens,
        "token_dim": dims.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": dims.num_heads,
        "num_layers": dims.num_layers,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "inference_mode": True,
    }
    std = max(spec.init_std, PROMPT_EMBEDDING_STD)
    embeddings = rng.standard_normal((spec.num_virtual_tokens, dims.hidden_size)) * std
    return config, {"prompt_embeddings": embeddings}


_FILES_OF_KIND: dict[AdapterKind, Callable[[BaseDims, AdapterSpec, np.random.Generator], _Files]] = {
    "lora": _lora_files, "dora": _dora_files, "ia3": _ia3_files, "prompt": _prompt_files,
}


def adapter_files(dims: BaseDims, spec: AdapterSpec, seed: int, base_model: str | None = None) -> tuple[bytes, bytes]:
    """`(adapter_config.json, adapter_model.safetensors)` bytes of one synthetic adapter of `spec.kind`."""
    config, tensors = _FILES_OF_KIND[spec.kind](dims, spec, np.random.default_rng(seed))
    config["base_model_name_or_path"] = base_model
    weights = save_safetensors({name: tensor.astype(spec.dtype) for name, tensor in tensors.items()})
    return json.dumps(config, indent=2).encode(), weights


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
    base_model: str | None = None, kinds: Sequence[AdapterKind] = (),
) -> list[str]:
    """`count` adapters as sub-directories of `root` (the layout `lorahive serve --adapters` reads), of `kinds`
    in turn (see `spec_for`)."""
    ids = adapter_ids(count, prefix)
    for i, adapter_id in enumerate(ids):
        write_adapter_dir(root / adapter_id, dims, spec_for(spec, kinds, i), adapter_seed(seed, i), base_model)
    return ids
