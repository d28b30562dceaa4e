"""The engine surface the HTTP layer is written against, and the dependency that hands it to routes.

server/engine.py's `Engine` implements `EngineAPI`; the HTTP tests' stand-in does too. An engine that serves
its adapters from a registry (the real one) also offers `AdapterTiers`: the adapter REST API, adapter
ownership and the engine's own metrics need it, and an engine without it serves public adapters only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Protocol, runtime_checkable

from fastapi import Depends, Request

from server.requests import AdapterStatus, ChoiceDelta, GenerationRequest

if TYPE_CHECKING:
    from server.adapter_pool import AdapterSlotPool
    from server.adapter_registry import AdapterRegistry
    from server.metrics import Metrics


class TokenizerAPI(Protocol):
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_input_bytes_per_token(self) -> int | None: ...  # None: a prompt's size bounds its tokens not at all
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def token_text(self, token_id: int) -> str: ...
    def token_bytes(self, token_id: int) -> list[int]: ...
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str: ...


class RequestStreamAPI(Protocol):
    request_id: str
    prompt_tokens: int
    completion_tokens: int

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]: ...
    def abort(self) -> None: ...


class EngineAPI(Protocol):
    @property
    def model_name(self) -> str: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def tokenizer(self) -> TokenizerAPI: ...
    @property
    def model_description(self) -> str: ...
    @property
    def base_config(self) -> Mapping[str, Any] | None: ...  # the base model's config.json, if it is a model
    @property
    def created(self) -> int: ...
    def adapter_ids(self) -> list[str]: ...
    def has_adapter(self, adapter_id: str) -> bool: ...
    # Whether the adapter serves, and why not; None if there is no such adapter.
    def adapter_status(self, adapter_id: str) -> tuple[AdapterStatus, str | None] | None: ...
    def submit(self, request: GenerationRequest) -> RequestStreamAPI: ...


@runtime_checkable
class AdapterTiers(Protocol):
    """What an engine serving adapters from a registry adds to `EngineAPI`: the registry (ids, versions, owners),
    the device slots, and the metrics it records."""

    registry: AdapterRegistry
    pool: AdapterSlotPool
    metrics: Metrics


def get_engine(request: Request) -> EngineAPI:
    """The engine `build_app` stored on the app (a dependency, so tests and other apps can swap it)."""
    return request.app.state.engine


EngineDep = Annotated[EngineAPI, Depends(get_engine)]
