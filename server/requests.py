"""What a request asks of the engine and what the engine streams back.

These types are the whole contract between the HTTP layer and the engine thread: the routes build a
`GenerationRequest`, `Engine.submit` returns a `RequestStream`, and the routes iterate its
`ChoiceDelta`s. Nothing here knows about HTTP or about torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]
# Temperatures below this decode greedily, as in vLLM: dividing float32 logits by a tinier one can overflow to inf,
# which turns the softmax into NaNs and the draw into an arbitrary token.
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding controls, already validated by the API layer."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below MIN_SAMPLING_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token plus the k most likely
    include_stop_str_in_output: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, `n` independent choices, optionally through one LoRA adapter."""

    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    n: int = 1
    adapter_id: str | None = None  # None: the base model alone
    request_id: str = ""
    tenant: str | None = None  # who sent it (None when the server runs without keys): the fair-share key
    # Deltas as tokens come; False: each choice's whole output in one delta when it finishes. A non-streaming
    # response needs nothing sooner, and its event loop then wakes once per choice rather than once per token,
    # time it would take from the engine thread (they share the GIL).
    incremental: bool = True


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass
class ChoiceDelta:
    """New output of one choice since its previous delta.

    `text` is safe to show: it never ends inside a multi-byte character and never holds the start of
    a stop string that may still complete. The last delta of a choice carries `finish_reason`.
    """

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None


class RequestError(Exception):
    """A request the engine refuses as given (maps to HTTP 400 `invalid_request_error`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class AdapterNotFoundError(RequestError):
    """The named adapter is not served (maps to HTTP 404 `model_not_found`)."""

    def __init__(self, adapter_id: str, param: str = "adapter_id"):
        super().__init__(f"The adapter '{adapter_id}' does not exist.", param=param, code="model_not_found")
        self.adapter_id = adapter_id


class AdapterBrokenError(RequestError):
    """The adapter's stored files failed at load (maps to HTTP 503 `adapter_broken`); a replace cures it."""

    def __init__(self, adapter_id: str, reason: str):
        super().__init__(
            f"The adapter '{adapter_id}' is broken and cannot be served ({reason}); upload its files again with "
            f"PUT /v1/adapters/{adapter_id}.",
            code="adapter_broken",
        )
        self.adapter_id = adapter_id
        self.reason = reason


class AdapterChangedError(RequestError):
    """The adapter version the request was bound to was replaced or deleted (by another server sharing the store)
    before its weights loaded (maps to HTTP 503 `adapter_changed` with `Retry-After`): a retry binds to what the
    store holds now."""

    retry_after_s = 1

    def __init__(self, adapter_id: str):
        super().__init__(
            f"The adapter '{adapter_id}' was replaced or deleted while this request waited for its weights; retry "
            "the request to use its current version.",
            param="adapter_id",
            code="adapter_changed",
        )
        self.adapter_id = adapter_id


# ready: served; broken: its stored files failed at load; unservable: this server's settings cannot serve it.
AdapterStatus = Literal["ready", "broken", "unservable"]


class AdapterUnservableError(RequestError):
    """The adapter's files are fine but this server's settings cannot serve it (maps to HTTP 400
    `adapter_not_servable`); `reason` names the setting and the cure."""

    def __init__(self, adapter_id: str, reason: str, param: str = "adapter_id"):
        super().__init__(f"The adapter '{adapter_id}' cannot be served by this server: {reason}.", param=param,
                         code="adapter_not_servable")
        self.adapter_id = adapter_id
        self.reason = reason


class QueueFullError(RequestError):
    """Too many requests wait already and the tenant holds its share of them (maps to HTTP 429
    `rate_limit_exceeded` with `Retry-After: retry_after_s`). Nothing was queued."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, code="rate_limit_exceeded")
        self.retry_after_s = retry_after_s


class ServerDrainingError(RequestError):
    """The server is shutting down: it takes no new request, or it cut this one at the end of its drain
    (maps to HTTP 503 `server_draining`)."""

    def __init__(self, message: str):
        super().__init__(message, code="server_draining")


class EngineStepError(RuntimeError):
    """The engine failed on this request (a forward pass, or its adapter could not be loaded); the request
    ends with this error and the engine goes on. `error_id` names the server log line holding the cause."""

    def __init__(self, message: str, error_id: str):
        super().__init__(f"{message} (error id {error_id})")
        self.error_id = error_id
