"""The persistent adapter store: PEFT-format parsing and validation (no GPUs, no server imports)."""

from adapters_store.peft_format import (
    ADAPTER_ID_PATTERN,
    TARGET_MODULES,
    AdapterFormatError,
    BaseModelShape,
    LoraAdapter,
    LoraWeight,
    load_peft_adapter,
    parse_peft_adapter,
    validate_adapter_id,
)

__all__ = [
    "ADAPTER_ID_PATTERN",
    "TARGET_MODULES",
    "AdapterFormatError",
    "BaseModelShape",
    "LoraAdapter",
    "LoraWeight",
    "load_peft_adapter",
    "parse_peft_adapter",
    "validate_adapter_id",
]
