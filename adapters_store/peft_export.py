"""Write a `LoraAdapter` (LoRA, DoRA, IA3, prompt tuning) back out as PEFT files (`parse_peft_adapter` inverted).

Lets adapters made in code (tests, benchmarks, synthetic load) travel the same path as uploaded ones.
Each module's own rank and scale are kept exactly through `rank_pattern` / `alpha_pattern` entries
keyed by the module's full name.
"""

from __future__ import annotations

import json

from safetensors.torch import save

from adapters_store.peft_format import _PARENT_OF, LoraAdapter


def to_peft_files(adapter: LoraAdapter) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) bytes that parse back to the same adapter."""
    if adapter.kind == "ia3":
        return _ia3_files(adapter)
    if adapter.kind == "prompt":
        return _prompt_files(adapter)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    tensors = {}
    for (layer, module), weight in sorted(adapter.weights.items()):
        path = _module_path(layer, module)
        if weight.rank != adapter.rank:
            rank_pattern[path] = weight.rank
        alpha = weight.scale * weight.rank  # scale = alpha / r (rsLoRA is not used when writing)
        if alpha != adapter.lora_alpha * weight.rank / adapter.rank or path in rank_pattern:
            alpha_pattern[path] = alpha
        tensors[f"base_model.model.{path}.lora_A.weight"] = weight.a.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = weight.b.contiguous()
        if weight.magnitude is not None:
            tensors[f"base_model.model.{path}.lora_magnitude_vector"] = weight.magnitude.contiguous()
    config = {
        "peft_type": "LORA",
        "r": adapter.rank,
        "lora_alpha": adapter.lora_alpha * 1.0,
        "target_modules": list(adapter.target_modules),
        "use_rslora": False,
        "use_dora": adapter.kind == "dora",
        "bias": "none",
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    return json.dumps(config).encode(), save(tensors)


def _ia3_files(adapter: LoraAdapter) -> tuple[bytes, bytes]:
    """IA3's files: a vector per module, [1, d_in] on a feedforward module's input, else [d_out, 1]."""
    tensors = {
        f"base_model.model.{_module_path(layer, module)}.ia3_l":
            (scale.vector[None, :] if scale.on_input else scale.vector[:, None]).contiguous()
        for (layer, module), scale in sorted(adapter.scales.items())
    }
    feedforward = sorted({module for (_, module), scale in adapter.scales.items() if scale.on_input})
    config = {"peft_type": "IA3", "target_modules": list(adapter.target_modules), "feedforward_modules": feedforward}
    return json.dumps(config).encode(), save(tensors)


def _prompt_files(adapter: LoraAdapter) -> tuple[bytes, bytes]:
    """Prompt tuning's files: the soft prompt, [num_virtual_tokens, token_dim]."""
    embeddings = adapter.prompt_embeddings
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": embeddings.shape[0],
              "token_dim": embeddings.shape[1], "num_transformer_submodules": 1}
    return json.dumps(config).encode(), save({"prompt_embeddings": embeddings.contiguous()})


def _module_path(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{_PARENT_OF[module]}.{module}"
