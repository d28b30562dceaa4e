"""Parse and validate PEFT prompt-tuning adapters (``peft_type: PROMPT_TUNING``).

A prompt-tuning adapter is a soft prompt: ``num_virtual_tokens`` learned embeddings (``prompt_embeddings``
[num_virtual_tokens, token_dim]) that PEFT puts before the embeddings of a causal LM's input, where they take
the first positions and attend like prompt tokens. Only the causal-LM form is served (one transformer submodule);
anything else is refused naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from adapters_store.peft_format import (
    WEIGHTS_FILE,
    AdapterFormatError,
    BaseModelShape,
    LoraAdapter,
    _as_float32,
    _is_positive_int,
    _load_tensors,
    _parse_safetensors_header,
    check_vector_range,
)

EMBEDDINGS_TENSOR = "prompt_embeddings"
# Other prompt-learning fields whose values would change what is served: each must be absent or as listed.
_CAUSAL_LM_ONLY = {"task_type": (None, "CAUSAL_LM"), "num_transformer_submodules": (None, 1)}


def parse_prompt_tuning(
    raw: Mapping[str, Any], safetensors_bytes: bytes, adapter_id: str, base: BaseModelShape | None,
    max_header_bytes: int, serving_dtype: torch.dtype,
) -> LoraAdapter:
    """The soft prompt of this config (already a JSON object) and weights."""
    num_virtual, token_dim = _parse_config(raw, base)
    header = _parse_safetensors_header(safetensors_bytes, max_header_bytes)
    extra = sorted(name for name in header if name != EMBEDDINGS_TENSOR)
    if extra:
        raise AdapterFormatError(
            f"unexpected tensor {extra[0]}: a prompt-tuning adapter holds only {EMBEDDINGS_TENSOR}", field=extra[0]
        )
    if EMBEDDINGS_TENSOR not in header:
        raise AdapterFormatError(f"{WEIGHTS_FILE} has no {EMBEDDINGS_TENSOR} tensor", field=WEIGHTS_FILE)
    shape = header[EMBEDDINGS_TENSOR]["shape"]
    if len(shape) != 2 or shape[1] != token_dim:
        raise AdapterFormatError(
            f"tensor {EMBEDDINGS_TENSOR} has shape {shape}, expected [{num_virtual}, {token_dim}] "
            "(num_virtual_tokens, token_dim)",
            field=EMBEDDINGS_TENSOR,
        )
    if shape[0] != num_virtual:
        raise AdapterFormatError(
            f"num_virtual_tokens is {num_virtual} but tensor {EMBEDDINGS_TENSOR} holds {shape[0]} embeddings",
            field="num_virtual_tokens",
        )
    embeddings = _as_float32(_load_tensors(safetensors_bytes)[EMBEDDINGS_TENSOR], EMBEDDINGS_TENSOR)
    check_vector_range(embeddings, EMBEDDINGS_TENSOR, serving_dtype)
    return LoraAdapter(
        adapter_id=adapter_id,
        rank=0,
        lora_alpha=0.0,
        target_modules=(),
        weights=MappingProxyType({}),
        config=MappingProxyType(dict(raw)),
        kind="prompt",
        prompt_embeddings=embeddings,
    )


def _parse_config(raw: Mapping[str, Any], base: BaseModelShape | None) -> tuple[int, int]:
    """(num_virtual_tokens, token_dim), checked."""
    for name, allowed in _CAUSAL_LM_ONLY.items():
        if raw.get(name) not in allowed:
            raise AdapterFormatError(
                f"{name}={json.dumps(raw.get(name))[:100]}: only the causal-LM form of prompt tuning is served "
                f"({name} {' or '.join(json.dumps(a) for a in allowed if a is not None)})",
                field=name,
            )
    num_virtual = raw.get("num_virtual_tokens")
    if not _is_positive_int(num_virtual):
        raise AdapterFormatError(
            f"num_virtual_tokens must be a positive integer, got {json.dumps(num_virtual)[:100]}",
            field="num_virtual_tokens",
        )
    if base is not None and base.max_virtual_tokens is not None and num_virtual > base.max_virtual_tokens:
        raise AdapterFormatError(
            f"num_virtual_tokens {num_virtual} is more than this server serves ({base.max_virtual_tokens}: its "
            "context length leaves room for a prompt token and a generated one)",
            field="num_virtual_tokens",
        )
    token_dim = raw.get("token_dim")
    if not _is_positive_int(token_dim):
        raise AdapterFormatError(
            f"token_dim must be a positive integer, got {json.dumps(token_dim)[:100]}", field="token_dim"
        )
    if base is not None and base.hidden_size is not None and token_dim != base.hidden_size:
        raise AdapterFormatError(
            f"token_dim is {token_dim} but the base model's embeddings have {base.hidden_size} dimensions",
            field="token_dim",
        )
    return num_virtual, token_dim
