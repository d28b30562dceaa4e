"""Parse and validate PEFT adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Served kinds: LoRA (``peft_type: LORA``), DoRA (a LoRA config with ``use_dora: true``: each module also has a
``lora_magnitude_vector``), IA3 (``peft_type: IA3``, parsed in ``adapters_store.peft_ia3``) and prompt tuning
(``peft_type: PROMPT_TUNING``, parsed in ``adapters_store.peft_prompt``).
Everything a tenant uploads passes through here before the server puts it on a GPU, so the rule is
"refuse loudly": anything we cannot apply exactly as PEFT would (extra trainable modules, bias
terms, embedding LoRA, other PEFT types, ...) is an :class:`AdapterFormatError` naming the offending field or
tensor, never a silently different model. Only safetensors are read; pickle is never unpickled.

This module knows nothing of GPUs or of the server: it returns CPU float32 tensors.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load_safetensors

TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
ADAPTER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
DEFAULT_MAX_HEADER_BYTES = 16 * 2**20
# A real config is a few KB; even a per-layer rank_pattern for an 80-layer model is far below this.
MAX_CONFIG_BYTES = 2**20
# rank_pattern / alpha_pattern keys are regexes matched against every adapted module (each module against
# the keys in order), so their number bounds the work an upload can cause. A per-module pattern (PEFT's EVA
# writes one) of a 126-layer model has 882 keys.
MAX_PATTERN_KEYS = 1024
# Weights are checked against the serving dtype: an adapter must not be able to overflow it for an input of
# unit RMS (what RMSNorm hands the attention and MLP) even when the real input is this many times larger
# (outlier features) and the input is aligned with the weights as badly as possible.
ACTIVATION_HEADROOM = 16.0
# RMSNorm squares the residual stream in float32: values past sqrt(float32 max) turn into inf there,
# whatever the serving dtype.
_FLOAT32_SQUARE_LIMIT = math.sqrt(torch.finfo(torch.float32).max)

# Which Llama block each target module lives in; the tensor name must agree.
_PARENT_OF = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# safetensors dtype -> bytes per element. Only float dtypes: LoRA weights are never integers.
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}

# `<path>.lora_A[.<adapter name>].weight`, the optional `base_model.model.` prefix stripped first; DoRA's magnitude
# is `<path>.lora_magnitude_vector[.<adapter name>]` (PEFT writes it without `.weight`; older versions with it).
# ASCII classes on purpose: Python's \d and \w also match non-ASCII digits and letters.
_LORA_TENSOR = re.compile(
    r"(?:base_model\.model\.)?(?P<path>[A-Za-z0-9_.]+?)\.lora_(?:(?P<kind>[AB])(?:\.(?P<adapter>[A-Za-z0-9_-]+))?\.weight"
    r"|magnitude_vector(?:\.(?!weight$)(?P<m_adapter>[A-Za-z0-9_-]+))?(?:\.weight)?)"
)
_MODULE_PATH = re.compile(
    r"(?:model\.)?layers\.(?P<layer>0|[1-9][0-9]*)\.(?P<parent>self_attn|mlp)\.(?P<module>[A-Za-z0-9_]+)"
)

# Config fields that turn on a LoRA variant or extra trained weights we cannot apply: each must be
# absent, null, false or empty. (bias, use_rslora and target_modules get their own checks.)
_UNSUPPORTED_FEATURES = {
    "modules_to_save": "fully trained extra modules are not supported; only LoRA A/B weights are served",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights) is not supported",
    "use_qalora": "QA-LoRA is not supported",
    "lora_bias": "a bias on lora_B is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "layer_replication": "layer replication is not supported",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "kasa_config": "KaSA is not supported",
    "arrow_config": "Arrow routing is not supported",
}
# Of the above, those PEFT declares as plain booleans: a non-bool value is itself malformed.
_BOOL_FIELDS = ("use_dora", "fan_in_fan_out", "use_qalora", "lora_bias", "use_rslora")


class AdapterFormatError(ValueError):
    """An adapter we refuse to load. ``field`` names the config field, file or tensor at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def validate_adapter_id(adapter_id: str) -> str:
    """Return ``adapter_id`` if it is safe as a URL segment and a single directory name, else refuse.

    ASCII letters, digits, ``.``, ``_``, ``-``; starts with a letter or digit (so no ``.``, ``..``,
    hidden files or leading dashes); 1 to 128 characters; nothing that only looks like ASCII.
    """
    if not isinstance(adapter_id, str):
        raise AdapterFormatError(f"adapter id must be a string, got {type(adapter_id).__name__}", field="id")
    # fullmatch, not match: `$` would also accept a trailing newline.
    if ADAPTER_ID_PATTERN.fullmatch(adapter_id) is None:
        raise AdapterFormatError(
            f"invalid adapter id {adapter_id[:140]!r}: use 1-128 ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field="id",
        )
    return adapter_id


@dataclass(frozen=True)
class BaseModelShape:
    """The dimensions an adapter must fit; built by the server from its model config."""

    num_layers: int
    module_dims: Mapping[str, tuple[int, int]]  # module name -> (d_in, d_out)
    # Modules whose input the server's model reads together with another module's (fused into one base layer,
    # e.g. q|k|v): their inputs cannot be scaled alone, so IA3 may scale only their outputs.
    shared_input_modules: frozenset[str] = frozenset()
    hidden_size: int | None = None  # the width of token embeddings (a soft prompt's token_dim); None: unchecked
    # The most virtual tokens a soft prompt may have: the served context must leave room for a prompt token and a
    # generated one, and the device tier for its embeddings. None: unchecked.
    max_virtual_tokens: int | None = None


# eq=False: the generated __eq__ would compare tensors, which raises; identity equality is what we want.
@dataclass(frozen=True, eq=False)
class LoraWeight:
    a: torch.Tensor  # [r, d_in] float32, contiguous
    b: torch.Tensor  # [d_out, r] float32, contiguous
    scale: float  # lora_alpha / r (or / sqrt(r) with rsLoRA), rank_pattern / alpha_pattern applied
    # DoRA's magnitude m [d_out] float32: the output becomes m / ||W + scale * B A|| (row norms) times the LoRA
    # output without bias, computed where the base weight is (the server, at load). None for plain LoRA.
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def num_bytes(self) -> int:
        return self.a.nbytes + self.b.nbytes + (0 if self.magnitude is None else self.magnitude.nbytes)


@dataclass(frozen=True, eq=False)
class ScaleVector:
    """IA3's learned vector of one module: it multiplies the module's outputs (bias included), or, for a
    feedforward module, its inputs."""

    vector: torch.Tensor  # [d_out], or [d_in] where on_input; float32
    on_input: bool


ADAPTER_KINDS = ("lora", "dora", "ia3", "prompt")


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A parsed adapter of any served kind (`kind`): LoRA and DoRA fill `weights`, IA3 fills `scales`, prompt
    tuning `prompt_embeddings` (IA3 and prompt tuning have rank 0 and lora_alpha 0)."""

    adapter_id: str
    rank: int  # max rank over its modules
    lora_alpha: float
    target_modules: tuple[str, ...]  # modules present, in TARGET_MODULES order
    weights: Mapping[tuple[int, str], LoraWeight]  # (layer index, module name) -> weights
    config: Mapping[str, Any]  # the parsed adapter_config.json
    kind: str = "lora"
    scales: Mapping[tuple[int, str], ScaleVector] = field(default_factory=lambda: MappingProxyType({}))
    prompt_embeddings: torch.Tensor | None = None  # [num_virtual_tokens, hidden] float32

    @property
    def num_bytes(self) -> int:
        vectors = sum(s.vector.nbytes for s in self.scales.values())
        prompt = 0 if self.prompt_embeddings is None else self.prompt_embeddings.nbytes
        return sum(w.num_bytes for w in self.weights.values()) + vectors + prompt

    @property
    def num_virtual_tokens(self) -> int:
        """A soft prompt's length; 0 for the other kinds."""
        return 0 if self.prompt_embeddings is None else self.prompt_embeddings.shape[0]


# --------------------------------------------------------------------------------------------- loading


def load_peft_adapter(
    path: str | Path,
    adapter_id: str,
    base: BaseModelShape | None = None,
    max_rank: int | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    serving_dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """Load the PEFT adapter saved in directory ``path`` (as written by ``save_pretrained``).

    ``serving_dtype``: the dtype its weights will be served in; weights and scales that would overflow it
    (see ``ACTIVATION_HEADROOM``) are refused."""
    validate_adapter_id(adapter_id)
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterFormatError(f"adapter path {str(directory)!r} is not a directory", field="path")
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise _missing_weights(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFormatError(f"{CONFIG_FILE} is missing", field=CONFIG_FILE)

    with config_path.open("rb") as f:
        config_bytes = f.read(MAX_CONFIG_BYTES + 1)  # one more than allowed, so parse can refuse it
    return parse_peft_adapter(
        config_bytes,
        _read_safetensors_file(weights_path, max_header_bytes),
        adapter_id,
        base=base,
        max_rank=max_rank,
        max_header_bytes=max_header_bytes,
        serving_dtype=serving_dtype,
    )


def read_peft_directory(directory: Path) -> tuple[bytes, bytes]:
    """The config and weights bytes of a PEFT directory, unparsed; AdapterFormatError names a missing file."""
    if not (directory / CONFIG_FILE).is_file():
        raise AdapterFormatError(f"no {CONFIG_FILE}: not a PEFT adapter directory", field=CONFIG_FILE)
    if not (directory / WEIGHTS_FILE).is_file():
        raise _missing_weights(directory)
    return (directory / CONFIG_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes()


def _missing_weights(directory: Path) -> AdapterFormatError:
    if (directory / PICKLE_FILE).exists():
        return AdapterFormatError(
            f"found only {PICKLE_FILE}: pickle .bin files are not supported; "
            "save with safe_serialization=True to get adapter_model.safetensors",
            field=PICKLE_FILE,
        )
    return AdapterFormatError(f"{WEIGHTS_FILE} is missing", field=WEIGHTS_FILE)


def parse_peft_adapter(
    config_bytes: bytes,
    safetensors_bytes: bytes,
    adapter_id: str,
    base: BaseModelShape | None = None,
    max_rank: int | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    serving_dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """Same as :func:`load_peft_adapter`, from the two files' contents held in memory."""
    validate_adapter_id(adapter_id)
    raw = _parse_config_object(config_bytes)
    # The other kinds' parsers build on this module's helpers, hence imported here.
    if raw.get("peft_type") == "IA3":
        from adapters_store.peft_ia3 import parse_ia3

        return parse_ia3(raw, safetensors_bytes, adapter_id, base, max_header_bytes, serving_dtype)
    if raw.get("peft_type") == "PROMPT_TUNING":
        from adapters_store.peft_prompt import parse_prompt_tuning

        return parse_prompt_tuning(raw, safetensors_bytes, adapter_id, base, max_header_bytes, serving_dtype)
    config = _parse_lora_config(raw)
    header = _parse_safetensors_header(safetensors_bytes, max_header_bytes)
    # Names are checked from the header alone, so a bad file is refused before its data is touched.
    names = _parse_tensor_names(header)
    pairs = _pair_tensors(names, config)
    if base is not None:  # first: it bounds the modules the patterns below are matched against
        _check_layers(base, pairs)
    # Resolved once per module: each resolution matches every pattern key.
    settings = {path: _module_rank_alpha(config, path) for path, *_ in pairs.values()}
    if max_rank is not None:
        _check_max_rank(settings, max_rank)
    tensors = _load_tensors(safetensors_bytes)

    weights: dict[tuple[int, str], LoraWeight] = {}
    seen_dims: dict[str, tuple[int, int, str]] = {}  # module -> (d_in, d_out, first tensor) across layers
    for (layer, module), (path, a_name, b_name, m_name) in sorted(pairs.items(), key=_layer_module_order):
        a = _as_float32(tensors[a_name], a_name)
        b = _as_float32(tensors[b_name], b_name)
        if a.dim() != 2 or b.dim() != 2:
            bad = a_name if a.dim() != 2 else b_name
            raise AdapterFormatError(f"tensor {bad} must be 2-D, got shape {_shape(tensors[bad])}", field=bad)
        r, d_in = a.shape
        d_out, r_b = b.shape
        if r_b != r:
            raise AdapterFormatError(
                f"tensor {b_name} has shape {_shape(b)} but {a_name} has rank {r}: expected [d_out, {r}]",
                field=b_name,
            )

        rank, alpha, rank_field, alpha_field = settings[path]
        if r != rank:
            raise AdapterFormatError(
                f"tensor {a_name} has rank {r} but adapter_config.json gives this module rank {rank} ({rank_field})",
                field=a_name,
            )
        if base is not None:
            _check_against_base(base, module, a_name, b_name, r, d_in, d_out)
        else:
            # Without a base model we can still insist every layer agrees with the first one.
            first = seen_dims.setdefault(module, (d_in, d_out, a_name))
            if first[:2] != (d_in, d_out):
                raise AdapterFormatError(
                    f"tensors {a_name}/{b_name} give {module} (d_in, d_out) = ({d_in}, {d_out}) but "
                    f"{first[2]} gives {first[:2]}",
                    field=a_name,
                )

        scale = alpha / math.sqrt(rank) if config["use_rslora"] else alpha / rank
        _check_magnitudes(path, a_name, a, b_name, b, float(scale), alpha_field, serving_dtype)
        magnitude = None if m_name is None else _dora_magnitude(tensors[m_name], m_name, d_out, serving_dtype)
        weights[(layer, module)] = LoraWeight(a=a, b=b, scale=float(scale), magnitude=magnitude)

    max_module_rank = max(w.rank for w in weights.values())
    present = {module for _, module in weights}
    return LoraAdapter(
        adapter_id=adapter_id,
        rank=max_module_rank,
        lora_alpha=float(config["lora_alpha"]),
        target_modules=tuple(m for m in TARGET_MODULES if m in present),
        weights=MappingProxyType(weights),
        config=MappingProxyType(config["raw"]),
        kind="dora" if config["use_dora"] else "lora",
    )


def _dora_magnitude(tensor: torch.Tensor, name: str, d_out: int, dtype: torch.dtype) -> torch.Tensor:
    """DoRA's magnitude vector [d_out], checked: one value per output of its module, none that overflows `dtype`
    (the output is scaled by it over the combined weight's row norm)."""
    if tuple(tensor.shape) != (d_out,):
        raise AdapterFormatError(
            f"tensor {name} has shape {_shape(tensor)}, expected [{d_out}] (one magnitude per output of its module)",
            field=name,
        )
    magnitude = _as_float32(tensor, name)
    check_vector_range(magnitude, name, dtype)
    return magnitude


def check_vector_range(vector: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    """Refuse a learned scale vector (DoRA's magnitude, IA3's vector) with values past what `dtype` serving
    allows (ACTIVATION_HEADROOM's bound)."""
    limit = min(torch.finfo(dtype).max, _FLOAT32_SQUARE_LIMIT) / ACTIVATION_HEADROOM
    if _peak(vector) > limit:
        raise AdapterFormatError(
            f"tensor {name} has values up to {_peak(vector):.3g}, beyond the {limit:.3g} "
            f"{str(dtype).removeprefix('torch.')} serving allows",
            field=name,
        )


def _check_max_rank(settings: Mapping[str, tuple[int, float, str, str]], max_rank: int) -> None:
    """Refuse before loading any data: the configured ranks are checked against the tensors later.
    `settings`: module path -> what `_module_rank_alpha` resolved for it."""
    for path, (rank, _, rank_field, _) in settings.items():
        if rank > max_rank:
            raise AdapterFormatError(
                f"{rank_field} gives {path} rank {rank}, above this server's maximum LoRA rank {max_rank} "
                f"(--max-lora-rank): train the adapter with a rank of {max_rank} or less, or raise the server's limit",
                field=rank_field,
            )


def _check_layers(base: BaseModelShape, pairs: Mapping[tuple[int, str], tuple[str, str, str, str | None]]) -> None:
    for (layer, _), (_, a_name, *_) in pairs.items():
        if layer >= base.num_layers:
            raise AdapterFormatError(
                f"tensor {a_name} is for layer {layer} but the base model has {base.num_layers} layers",
                field=a_name,
            )


def _check_magnitudes(
    path: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, scale: float, alpha_field: str,
    dtype: torch.dtype,
) -> None:
    """Refuse weights that would overflow `dtype` once served: the scale is folded into B at load, and the delta
    x·Aᵀ·(scale·B)ᵀ, for an input x of unit RMS aligned as badly as possible, must stay within the dtype's range
    divided by ACTIVATION_HEADROOM (and within what RMSNorm can square in float32)."""
    limit = min(torch.finfo(dtype).max, _FLOAT32_SQUARE_LIMIT) / ACTIVATION_HEADROOM
    served = f"{str(dtype).removeprefix('torch.')} serving allows"
    if scale > limit:
        raise AdapterFormatError(
            f"{alpha_field} gives {path} the scale {scale:.3g}, beyond the {limit:.3g} "
            f"{served}: lower it",
            field=alpha_field,
        )
    largest_b = _peak(b) * scale
    if largest_b > limit:
        raise AdapterFormatError(
            f"tensor {b_name} times its scale {scale:.3g} has values up to {largest_b:.3g}, beyond the {limit:.3g} "
            f"{served}",
            field=b_name,
        )
    # |x·Aᵀ| for ||x|| = sqrt(d_in) (unit RMS) is at most sqrt(d_in)·σ(A), σ the largest singular value;
    # |x·Aᵀ·Bᵀ| is then at most that times the largest row norm of B.
    d_in = a.shape[1]
    shrunk = math.sqrt(d_in) * _largest_singular_value(a)
    if shrunk > limit:
        raise AdapterFormatError(
            f"tensor {a_name} can map an input of unit RMS to values up to {shrunk:.3g}, beyond the {limit:.3g} "
            f"{served}",
            field=a_name,
        )
    delta = shrunk * scale * _largest_row_norm(b)
    if delta > limit:
        raise AdapterFormatError(
            f"tensors {a_name} and {b_name} (scale {scale:.3g}) can add up to {delta:.3g} to an output for an "
            f"input of unit RMS, beyond the {limit:.3g} {served}: lower {alpha_field} or the weights",
            field=b_name,
        )


def _largest_singular_value(a: torch.Tensor) -> float:
    """σ_max of A [r, d_in] from the small Gram matrix A·Aᵀ [r, r] (cheap for r << d_in), normalized first so
    that squaring cannot overflow float32."""
    peak = _peak(a)
    if peak == 0:
        return 0.0
    unit = a / peak
    return peak * math.sqrt(max(torch.linalg.eigvalsh((unit @ unit.T).double()).max().item(), 0.0))


def _largest_row_norm(b: torch.Tensor) -> float:
    peak = _peak(b)
    if peak == 0:
        return 0.0
    return peak * torch.linalg.vector_norm(b / peak, dim=1).max().item()


def _peak(t: torch.Tensor) -> float:
    """max |t|, 0 for an empty tensor."""
    return t.abs().max().item() if t.numel() else 0.0


def _layer_module_order(item: tuple[tuple[int, str], Any]) -> tuple[int, int]:
    layer, module = item[0]
    return layer, TARGET_MODULES.index(module)


# ---------------------------------------------------------------------------------------------- config


def _parse_config_object(config_bytes: bytes) -> dict[str, Any]:
    """adapter_config.json as a JSON object, its size checked first."""
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes", field=CONFIG_FILE)
    raw = _loads_json(config_bytes, CONFIG_FILE, CONFIG_FILE)
    if not isinstance(raw, dict):
        got = type(raw).__name__
        raise AdapterFormatError(f"{CONFIG_FILE} must be a JSON object, got a JSON {got}", field=CONFIG_FILE)
    return raw


def _parse_lora_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a LoRA (or DoRA) adapter_config.json; return the settings we use plus the parsed dict under "raw"."""
    peft_type = raw.get("peft_type")
    if peft_type is not None and peft_type != "LORA":
        raise AdapterFormatError(
            f"peft_type {json.dumps(peft_type)[:100]} is not served: lorahive serves 'LORA' (DoRA with use_dora: "
            "true), 'IA3' and 'PROMPT_TUNING'",
            field="peft_type",
        )

    for name in _BOOL_FIELDS:
        if name in raw and raw[name] is not None and not isinstance(raw[name], bool):
            raise AdapterFormatError(f"{name} must be true or false, got {raw[name]!r}", field=name)
    for name, why in _UNSUPPORTED_FEATURES.items():
        value = raw.get(name)
        if value not in (None, False, [], {}, ""):
            raise AdapterFormatError(f"{name}={json.dumps(value)[:200]}: {why}", field=name)
    bias = raw.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterFormatError(
            f"bias={bias!r}: only bias='none' is supported (trained base-layer biases are not served)",
            field="bias",
        )

    r = raw.get("r")
    if not _is_int(r) or r <= 0:
        raise AdapterFormatError(f"r must be a positive integer, got {r!r}", field="r")
    alpha = raw.get("lora_alpha")
    if not _is_positive_number(alpha):
        raise AdapterFormatError(f"lora_alpha must be a finite number above 0, got {alpha!r}", field="lora_alpha")

    return {
        "raw": raw,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": bool(raw.get("use_rslora")),
        "use_dora": bool(raw.get("use_dora")),
        "rank_pattern": _parse_pattern(raw, "rank_pattern", _is_positive_int, "a positive integer"),
        "alpha_pattern": _parse_pattern(raw, "alpha_pattern", _is_positive_number, "a finite number above 0"),
        "target_modules": _parse_target_modules(raw.get("target_modules")),
        "layers_to_transform": _parse_layers_to_transform(raw.get("layers_to_transform")),
    }


_PATTERN_KEY = re.compile(r"[A-Za-z0-9_.|\\-]{1,256}")


def _parse_pattern(
    raw: dict[str, Any], name: str, valid: Callable[[Any], bool], what: str
) -> dict[str, tuple[re.Pattern[str], Any]]:
    """key -> (the key compiled as PEFT matches it, its value), in the config's order."""
    pattern = raw.get(name)
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise AdapterFormatError(f"{name} must be an object of module pattern -> value", field=name)
    if len(pattern) > MAX_PATTERN_KEYS:
        raise AdapterFormatError(
            f"{name} has {len(pattern)} keys; at most {MAX_PATTERN_KEYS} are accepted (use one pattern for many "
            "modules, e.g. 'q_proj' or 'layers\\.1\\.mlp\\.up_proj')",
            field=name,
        )
    compiled = {}
    for key, value in pattern.items():
        if not valid(value):
            raise AdapterFormatError(f"{name}[{key!r}] must be {what}, got {value!r}", field=name)
        # PEFT treats keys as regexes. Keys from an uploaded file must not be able to stall the server with
        # catastrophic backtracking, so only what PEFT itself writes is accepted: dotted module names,
        # escaped or not, optionally alternated with "|" (no quantifiers, groups or classes).
        if not _PATTERN_KEY.fullmatch(key):
            raise AdapterFormatError(
                f"{name} key {key!r} must be a dotted module name (letters, digits, '_', '-', '.', '\\', '|')",
                field=name,
            )
        compiled[key] = (_compile_pattern_key(name, key), value)
    return compiled


def _compile_pattern_key(name: str, key: str) -> re.Pattern[str]:
    """The key as PEFT's `get_pattern_key` (peft/utils/other.py) matches it: a regex suffix of the module's full
    name. Compiled once here, so a key that is no regex (a stray backslash, say) is refused naming the field."""
    try:
        return re.compile(rf"(.*\.)?({key})$")
    except re.error as exc:
        raise AdapterFormatError(f"{name} key {key!r} is not a valid regular expression: {exc}", field=name) from None


def _parse_target_modules(value: Any) -> list[str] | None:
    """A list is checked name by name; None or a regex string means "whatever tensors are present"."""
    if value is None or isinstance(value, str):
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterFormatError(
            f"target_modules must be a list of module names or a regex string, got {value!r}",
            field="target_modules",
        )
    for name in value:
        # PEFT matches list entries as name suffixes ("self_attn.q_proj" is fine); the last part decides.
        if name.rsplit(".", 1)[-1] not in TARGET_MODULES:
            raise AdapterFormatError(
                f"target_modules lists {name!r}; only {', '.join(TARGET_MODULES)} are supported",
                field="target_modules",
            )
    return value


def _parse_layers_to_transform(value: Any) -> set[int] | None:
    if value is None:
        return None
    layers = [value] if _is_int(value) else value
    if not isinstance(layers, list) or not all(_is_int(v) and v >= 0 for v in layers):
        raise AdapterFormatError(
            f"layers_to_transform must be a layer index or a list of them, got {value!r}",
            field="layers_to_transform",
        )
    return set(layers)


def _module_rank_alpha(config: Mapping[str, Any], module_path: str) -> tuple[int, float, str, str]:
    """(rank, alpha, the config field that gave the rank, the one that gave alpha) for a module, resolved exactly
    as PEFT does."""
    rank = _pattern_value(config["rank_pattern"], module_path)
    alpha = _pattern_value(config["alpha_pattern"], module_path)
    return (
        rank or config["r"],
        alpha or config["lora_alpha"],
        "r" if rank is None else "rank_pattern",
        "lora_alpha" if alpha is None else "alpha_pattern",
    )


def _pattern_value(patterns: Mapping[str, tuple[re.Pattern[str], Any]], module_path: str) -> Any | None:
    """PEFT's `get_pattern_key`: the value of the first key, in the config's order, that matches the module's
    full name as a regex suffix. `module_path` is the name PEFT saw, e.g. `model.layers.0.self_attn.q_proj`
    (the tensor name minus `base_model.model.` and `.lora_A...`). Values are never 0, so None is "no key"."""
    for compiled, value in patterns.values():
        if compiled.match(module_path):
            return value
    return None


# ------------------------------------------------------------------------------------------ safetensors


def _read_safetensors_file(path: Path, max_header_bytes: int) -> bytes:
    """Read the file, checking the header length against the limit and the file size before the rest."""
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        prefix = f.read(8)
        _check_header_length(prefix, size, max_header_bytes)
        return prefix + f.read()


def _check_header_length(prefix: bytes, total_size: int, max_header_bytes: int) -> int:
    if len(prefix) < 8:
        raise AdapterFormatError(
            f"{WEIGHTS_FILE} is truncated: {total_size} bytes, too short for a safetensors header",
            field=WEIGHTS_FILE,
        )
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > max_header_bytes or header_len > total_size - 8:
        _refuse_if_pickle(prefix)
    if header_len > max_header_bytes:
        raise AdapterFormatError(
            f"{WEIGHTS_FILE} header claims {header_len} bytes, more than the {max_header_bytes} allowed "
            "(not a safetensors file, or a hostile one)",
            field=WEIGHTS_FILE,
        )
    if header_len > total_size - 8:
        raise AdapterFormatError(
            f"{WEIGHTS_FILE} is truncated: header claims {header_len} bytes but only {total_size - 8} follow",
            field=WEIGHTS_FILE,
        )
    return header_len


def _refuse_if_pickle(prefix: bytes) -> None:
    """Give a pickle under a .safetensors name a clear message. Only called once the bytes have already
    failed as safetensors: a valid header length can start with the same bytes (0x80 0x03 is 896)."""
    if prefix.startswith(b"PK\x03\x04") or (prefix[0] == 0x80 and 2 <= prefix[1] <= 5):
        raise AdapterFormatError(
            f"{WEIGHTS_FILE} is not a safetensors file: it looks like a PyTorch pickle checkpoint "
            "(pickle is not supported; save with safe_serialization=True)",
            field=WEIGHTS_FILE,
        )


def _parse_safetensors_header(buf: bytes, max_header_bytes: int) -> dict[str, dict[str, Any]]:
    """Validate the JSON header (names, float dtypes, shapes, offsets inside the buffer); return it."""
    header_len = _check_header_length(buf[:8], len(buf), max_header_bytes)
    try:
        header = _loads_json(buf[8 : 8 + header_len], f"{WEIGHTS_FILE} header", WEIGHTS_FILE)
    except AdapterFormatError:
        _refuse_if_pickle(buf[:8])
        raise
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{WEIGHTS_FILE} header must be a JSON object", field=WEIGHTS_FILE)
    header.pop("__metadata__", None)  # free-form string metadata; PEFT writes {"format": "pt"}
    data_len = len(buf) - 8 - header_len
    for name, info in header.items():
        if not isinstance(info, dict):
            raise AdapterFormatError(f"tensor {name}: header entry is not an object", field=name)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _FLOAT_DTYPES:
            raise AdapterFormatError(
                f"tensor {name} has dtype {dtype!r}; expected one of {', '.join(_FLOAT_DTYPES)}", field=name
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise AdapterFormatError(f"tensor {name} has an invalid shape {shape!r}", field=name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise AdapterFormatError(
                f"tensor {name} has data_offsets {offsets!r} outside the {data_len}-byte data section "
                "(truncated or corrupt file)",
                field=name,
            )
        if offsets[1] - offsets[0] != math.prod(shape) * _FLOAT_DTYPES[dtype]:
            raise AdapterFormatError(
                f"tensor {name}: data_offsets span {offsets[1] - offsets[0]} bytes but shape {shape} of "
                f"{dtype} needs {math.prod(shape) * _FLOAT_DTYPES[dtype]}",
                field=name,
            )
    return header


def _load_tensors(buf: bytes) -> dict[str, torch.Tensor]:
    try:
        return _load_safetensors(bytes(buf))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{WEIGHTS_FILE} could not be read: {exc}", field=WEIGHTS_FILE) from None


def _as_float32(tensor: torch.Tensor, name: str) -> torch.Tensor:
    out = tensor.to(torch.float32).contiguous()
    # Checked after the cast: an F64 value too large for float32 becomes inf here.
    if not torch.isfinite(out).all():
        raise AdapterFormatError(f"tensor {name} contains NaN or Inf values", field=name)
    return out


# -------------------------------------------------------------------------------------- tensor names


def _parse_tensor_names(header: Mapping[str, Any]) -> dict[str, tuple[str, int, str, str, str | None]]:
    """tensor name -> (module path, layer, module, "A"/"B"/"M" (DoRA's magnitude), adapter-name infix); refuse
    anything else."""
    parsed = {}
    for name in header:
        m = _LORA_TENSOR.fullmatch(name)
        if m is None:
            raise AdapterFormatError(
                f"unexpected tensor {name}: only lora_A / lora_B weights of linear layers are supported"
                f"{_hint_for(name)}",
                field=name,
            )
        path = m["path"]
        module = path.rsplit(".", 1)[-1]
        if module not in TARGET_MODULES:
            raise AdapterFormatError(
                f"tensor {name} adapts module {module!r}; only {', '.join(TARGET_MODULES)} are supported",
                field=name,
            )
        p = _MODULE_PATH.fullmatch(path)
        if p is None or p["parent"] != _PARENT_OF[module]:
            raise AdapterFormatError(
                f"tensor {name}: expected a path like model.layers.<i>.{_PARENT_OF[module]}.{module}",
                field=name,
            )
        kind, infix = (m["kind"], m["adapter"]) if m["kind"] else ("M", m["m_adapter"])
        parsed[name] = (path, int(p["layer"]), module, kind, infix)

    check_one_adapter_name({info[4] for info in parsed.values()})
    if not parsed:
        raise AdapterFormatError(f"{WEIGHTS_FILE} contains no LoRA tensors", field=WEIGHTS_FILE)
    return parsed


def check_one_adapter_name(infixes: set[str | None]) -> None:
    """Refuse a file whose tensor names carry several adapter names (`.lora_A.<name>.weight`): its adapters would
    otherwise be merged silently."""
    if len(infixes) > 1:
        shown = sorted(str(i) if i is not None else "(none)" for i in infixes)
        raise AdapterFormatError(
            f"{WEIGHTS_FILE} mixes tensors of several adapter names: {', '.join(shown)}", field=WEIGHTS_FILE
        )


def _hint_for(name: str) -> str:
    if "lora_embedding" in name:
        return " (embedding LoRA is not supported)"
    if ".base_layer." in name:
        return " (full base-model weights are not part of a LoRA adapter)"
    if name.endswith(".bias"):
        return " (bias terms are not supported)"
    return ""


_TENSOR_KIND = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector"}


def _pair_tensors(
    names: Mapping[str, tuple[str, int, str, str, str | None]], config: Mapping[str, Any]
) -> dict[tuple[int, str], tuple[str, str, str, str | None]]:
    """(layer, module) -> (module path, A tensor name, B tensor name, DoRA magnitude tensor name or None), checked
    against the config: a DoRA adapter (use_dora) has a magnitude for every module, a LoRA adapter none."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    paths: dict[tuple[int, str], str] = {}
    for name, (path, layer, module, kind, _) in names.items():
        key = (layer, module)
        if paths.setdefault(key, path) != path or kind in found.get(key, {}):
            raise AdapterFormatError(
                f"tensor {name} duplicates another {_TENSOR_KIND[kind]} for layer {layer} {module}", field=name
            )
        found.setdefault(key, {})[kind] = name

        targets = config["target_modules"]
        if targets is not None and not any(path == t or path.endswith("." + t) for t in targets):
            raise AdapterFormatError(
                f"tensor {name} adapts {path}, which target_modules {targets} does not include",
                field="target_modules",
            )
        layers = config["layers_to_transform"]
        if layers is not None and layer not in layers:
            raise AdapterFormatError(
                f"tensor {name} is in layer {layer}, which layers_to_transform {sorted(layers)} excludes",
                field="layers_to_transform",
            )

    pairs = {}
    for key, kinds in found.items():
        if "M" in kinds and not config["use_dora"]:
            raise AdapterFormatError(
                f"tensor {kinds['M']} is a DoRA magnitude, but adapter_config.json does not set use_dora: true",
                field=kinds["M"],
            )
        wanted = ("A", "B", "M") if config["use_dora"] else ("A", "B")
        missing = [kind for kind in wanted if kind not in kinds]
        if missing:
            have = next(kinds[kind] for kind in wanted if kind in kinds)
            why = " (use_dora is true)" if missing == ["M"] else ""
            raise AdapterFormatError(
                f"tensor {have} has no matching {_TENSOR_KIND[missing[0]]} (layer {key[0]} {key[1]}){why}",
                field=have,
            )
        pairs[key] = (paths[key], kinds["A"], kinds["B"], kinds.get("M"))
    return pairs


def _check_against_base(
    base: BaseModelShape, module: str, a_name: str, b_name: str, r: int, d_in: int, d_out: int
) -> None:
    if module not in base.module_dims:
        raise AdapterFormatError(f"tensor {a_name}: the base model has no {module} module", field=a_name)
    want_in, want_out = base.module_dims[module]
    if d_in != want_in:
        raise AdapterFormatError(
            f"tensor {a_name} has shape [{r}, {d_in}], expected [{r}, {want_in}] (base model's {module})",
            field=a_name,
        )
    if d_out != want_out:
        raise AdapterFormatError(
            f"tensor {b_name} has shape [{d_out}, {r}], expected [{want_out}, {r}] (base model's {module})",
            field=b_name,
        )


# -------------------------------------------------------------------------------------------- helpers


def _reject_constant(token: str) -> None:
    # json.loads accepts NaN / Infinity by default; they are not JSON.
    raise ValueError(f"{token} is not valid JSON")


def _loads_json(data: bytes, what: str, field: str) -> Any:
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterFormatError(f"{what} is not valid UTF-8 JSON: {exc}", field=field) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_positive_number(value: Any) -> bool:
    """A JSON number above 0 that a float holds (JSON integers may be arbitrarily large)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 < value <= sys.float_info.max


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)
