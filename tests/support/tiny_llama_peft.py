"""PEFT LoRA adapters saved by the real `peft` for a tiny random Llama, that model's shape as lorahive reads it,
and edits to the saved files (tensors, config)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_store import BaseModelShape

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 64, 2, 4, 2, 128, 300
HEAD_DIM = HIDDEN // HEADS
BASE = BaseModelShape(
    num_layers=LAYERS,
    module_dims={
        "q_proj": (HIDDEN, HEADS * HEAD_DIM),
        "k_proj": (HIDDEN, KV_HEADS * HEAD_DIM),
        "v_proj": (HIDDEN, KV_HEADS * HEAD_DIM),
        "o_proj": (HEADS * HEAD_DIM, HIDDEN),
        "gate_proj": (HIDDEN, INTERMEDIATE),
        "up_proj": (HIDDEN, INTERMEDIATE),
        "down_proj": (INTERMEDIATE, HIDDEN),
    },
)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q0_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
Q1_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


def make_peft(directory: Path, **lora_kwargs: Any) -> Any:
    """Save a PEFT LoRA adapter for a fresh tiny Llama into `directory`; return the PeftModel."""
    safe = lora_kwargs.pop("_safe", True)
    # init_lora_weights=False: random B too, so a swapped or zero B cannot pass unnoticed.
    lora_kwargs.setdefault("init_lora_weights", False)
    return _save(directory, peft.LoraConfig(**lora_kwargs), safe)


def make_peft_ia3(directory: Path, **ia3_kwargs: Any) -> Any:
    """Save a PEFT IA3 adapter for a fresh tiny Llama into `directory` (random vectors); return the PeftModel."""
    ia3_kwargs.setdefault("init_ia3_weights", False)
    return _save(directory, peft.IA3Config(**ia3_kwargs))


def _save(directory: Path, peft_config: Any, safe: bool = True) -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTERMEDIATE,
        vocab_size=VOCAB,
    )
    peft_model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft_config)
    peft_model.save_pretrained(str(directory), safe_serialization=safe)
    return peft_model


def rewrite_tensors(
    directory: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
) -> None:
    save_file(edit(load_file(str(directory / WEIGHTS))), str(directory / WEIGHTS))


def rewrite_config(directory: Path, **changes: Any) -> None:
    config = json.loads((directory / CONFIG).read_text())
    config.update(changes)
    (directory / CONFIG).write_text(json.dumps(config))
