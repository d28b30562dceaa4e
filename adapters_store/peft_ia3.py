"""Parse and validate PEFT IA3 adapters (``peft_type: IA3``).

IA3 learns one vector per target module: PEFT multiplies the module's output (bias included) by it, or, for a
module listed in ``feedforward_modules``, the module's input. Saved as ``<path>.ia3_l`` of shape [d_out, 1], or
[1, d_in] for a feedforward module. The same rule as for LoRA: anything PEFT would apply differently is refused
naming the field or tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from adapters_store.peft_format import (
    _MODULE_PATH,
    _PARENT_OF,
    TARGET_MODULES,
    WEIGHTS_FILE,
    AdapterFormatError,
    BaseModelShape,
    LoraAdapter,
    ScaleVector,
    _as_float32,
    _load_tensors,
    _parse_safetensors_header,
    _parse_target_modules,
    _shape,
    check_one_adapter_name,
    check_vector_range,
)

# `<path>.ia3_l[.<adapter name>]`, the optional `base_model.model.` prefix stripped first.
_IA3_TENSOR = re.compile(r"(?:base_model\.model\.)?(?P<path>[A-Za-z0-9_.]+?)\.ia3_l(?:\.(?P<adapter>[A-Za-z0-9_-]+))?")
# Config fields that change what the vectors mean or add trained weights: each must be absent, null, false or empty.
_UNSUPPORTED_FEATURES = {
    "modules_to_save": "fully trained extra modules are not supported; only IA3 vectors are served",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights) is not supported",
}


def parse_ia3(
    raw: Mapping[str, Any], safetensors_bytes: bytes, adapter_id: str, base: BaseModelShape | None,
    max_header_bytes: int, serving_dtype: torch.dtype,
) -> LoraAdapter:
    """The IA3 adapter of this config (already a JSON object) and weights."""
    targets, feedforward = _parse_config(raw)
    header = _parse_safetensors_header(safetensors_bytes, max_header_bytes)
    located = _locate_tensors(header, targets, feedforward, base)
    tensors = _load_tensors(safetensors_bytes)
    scales: dict[tuple[int, str], ScaleVector] = {}
    for name, (layer, module, on_input) in located.items():
        tensor = tensors[name]
        vector = _as_float32(tensor, name).flatten()
        want = _vector_shape(module, on_input, base, vector.numel())
        if tuple(tensor.shape) != want:
            side = "inputs" if on_input else "outputs"
            raise AdapterFormatError(
                f"tensor {name} has shape {_shape(tensor)}, expected {list(want)} (one value per {side} of "
                f"{module}{', a feedforward module' if on_input else ''})",
                field=name,
            )
        check_vector_range(vector, name, serving_dtype)
        scales[(layer, module)] = ScaleVector(vector, on_input)
    _check_consistent_widths(scales, located)
    present = {module for _, module in scales}
    return LoraAdapter(
        adapter_id=adapter_id,
        rank=0,
        lora_alpha=0.0,
        target_modules=tuple(m for m in TARGET_MODULES if m in present),
        weights=MappingProxyType({}),
        config=MappingProxyType(dict(raw)),
        kind="ia3",
        scales=MappingProxyType(dict(sorted(scales.items(), key=lambda item: (item[0][0],
                                                                              TARGET_MODULES.index(item[0][1]))))),
    )


def _parse_config(raw: Mapping[str, Any]) -> tuple[list[str] | None, list[str]]:
    """(target_modules as a list, or None for "whatever tensors are present"; feedforward_modules as a list)."""
    for name, why in _UNSUPPORTED_FEATURES.items():
        value = raw.get(name)
        if value not in (None, False, [], {}, ""):
            raise AdapterFormatError(f"{name}={json.dumps(value)[:200]}: {why}", field=name)
    targets = _parse_target_modules(raw.get("target_modules"))
    feedforward = raw.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        # PEFT matches a string as a regex over every module name; an uploaded regex could stall the server.
        raise AdapterFormatError(
            "feedforward_modules must be a list of module names; a regex string is not accepted",
            field="feedforward_modules",
        )
    if not isinstance(feedforward, list) or not all(isinstance(m, str) for m in feedforward):
        raise AdapterFormatError(
            f"feedforward_modules must be a list of module names, got {json.dumps(feedforward)[:200]}",
            field="feedforward_modules",
        )
    if targets is not None:
        outside = [m for m in feedforward if not any(_names_module(t, m) or _names_module(m, t) for t in targets)]
        if outside:  # PEFT refuses such a config too
            raise AdapterFormatError(
                f"feedforward_modules {outside} must also be in target_modules {targets}",
                field="feedforward_modules",
            )
    return targets, feedforward


def _names_module(entry: str, path: str) -> bool:
    """PEFT's list matching: an entry names a module when it is the module's path or a dotted suffix of it."""
    return path == entry or path.endswith("." + entry)


def _locate_tensors(
    header: Mapping[str, Any], targets: list[str] | None, feedforward: list[str], base: BaseModelShape | None
) -> dict[str, tuple[int, str, bool]]:
    """tensor name -> (layer, module, whether it scales the module's input), from the header alone."""
    located: dict[str, tuple[int, str, bool]] = {}
    seen: dict[tuple[int, str], str] = {}
    infixes = set()
    for name in header:
        m = _IA3_TENSOR.fullmatch(name)
        if m is None:
            raise AdapterFormatError(
                f"unexpected tensor {name}: an IA3 adapter holds only ia3_l vectors of linear layers", field=name
            )
        path = m["path"]
        module = path.rsplit(".", 1)[-1]
        p = _MODULE_PATH.fullmatch(path)
        if module not in TARGET_MODULES or p is None or p["parent"] != _PARENT_OF[module]:
            raise AdapterFormatError(
                f"tensor {name} scales {path}; only {', '.join(TARGET_MODULES)} of a layer "
                "(model.layers.<i>.self_attn.* / model.layers.<i>.mlp.*) are supported",
                field=name,
            )
        layer = int(p["layer"])
        if targets is not None and not any(_names_module(t, path) for t in targets):
            raise AdapterFormatError(
                f"tensor {name} scales {path}, which target_modules {targets} does not include",
                field="target_modules",
            )
        if base is not None and layer >= base.num_layers:
            raise AdapterFormatError(
                f"tensor {name} is for layer {layer} but the base model has {base.num_layers} layers", field=name
            )
        if (layer, module) in seen:
            raise AdapterFormatError(f"tensor {name} duplicates {seen[layer, module]}", field=name)
        seen[layer, module] = name
        infixes.add(m["adapter"])
        on_input = any(_names_module(f, path) for f in feedforward)
        if on_input and base is not None and module in base.shared_input_modules:
            raise AdapterFormatError(
                f"feedforward_modules scales the input of {module}, which this server's model reads together with "
                "other projections (fused); IA3 input scaling is served on o_proj and down_proj",
                field="feedforward_modules",
            )
        located[name] = (layer, module, on_input)
    check_one_adapter_name(infixes)
    if not located:
        raise AdapterFormatError(f"{WEIGHTS_FILE} contains no IA3 vectors", field=WEIGHTS_FILE)
    return located


def _vector_shape(module: str, on_input: bool, base: BaseModelShape | None, numel: int) -> tuple[int, int]:
    """The shape PEFT saves the module's vector in: [1, d_in] on its input, [d_out, 1] on its output."""
    if base is not None:
        if module not in base.module_dims:
            raise AdapterFormatError(f"IA3 scales {module}, which the base model does not have", field=module)
        d_in, d_out = base.module_dims[module]
        return (1, d_in) if on_input else (d_out, 1)
    return (1, numel) if on_input else (numel, 1)


def _check_consistent_widths(scales: Mapping[tuple[int, str], ScaleVector], located: Mapping[str, Any]) -> None:
    """Without a base model, every layer's vector of one module must at least have the same width."""
    widths: dict[str, int] = {}
    for (_, module), scale in scales.items():
        if widths.setdefault(module, scale.vector.numel()) != scale.vector.numel():
            name = next(n for n, (layer, m, _) in located.items() if m == module and scales[layer, m] is scale)
            raise AdapterFormatError(
                f"tensor {name} has {scale.vector.numel()} values but another layer's {module} has "
                f"{widths[module]}",
                field=name,
            )
