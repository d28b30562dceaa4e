"""The persistent adapter store: PEFT parsing and validation, atomic on-disk storage, archive unpacking.

No GPUs, no HTTP, no server imports.
"""

from adapters_store.archive import unpack_adapter_archive
from adapters_store.peft_format import (
    ADAPTER_ID_PATTERN,
    ADAPTER_KINDS,
    TARGET_MODULES,
    AdapterFormatError,
    BaseModelShape,
    LoraAdapter,
    LoraWeight,
    ScaleVector,
    load_peft_adapter,
    parse_peft_adapter,
    read_peft_directory,
    validate_adapter_id,
)
from adapters_store.store import (
    AdapterExistsError,
    AdapterMissingError,
    AdapterStore,
    Manifest,
    StoreCorruptionError,
    StoredFile,
    StoreError,
    StoreFullError,
)

__all__ = [
    "ADAPTER_ID_PATTERN",
    "ADAPTER_KINDS",
    "TARGET_MODULES",
    "AdapterExistsError",
    "AdapterFormatError",
    "AdapterMissingError",
    "AdapterStore",
    "BaseModelShape",
    "LoraAdapter",
    "LoraWeight",
    "ScaleVector",
    "Manifest",
    "StoreCorruptionError",
    "StoreError",
    "StoreFullError",
    "StoredFile",
    "load_peft_adapter",
    "parse_peft_adapter",
    "read_peft_directory",
    "unpack_adapter_archive",
    "validate_adapter_id",
]
