"""The OpenAI wire contract as pydantic models: what clients may send, and what we answer.

Request models take exactly the fields OpenAI's request schemas define, plus our documented extensions: any other
field is a 400 naming it (`extra="forbid"`), so a typo such as `"max_token": 3` is not silently answered with the
default. They are strict about types, so `"max_tokens": "ten"` or `"n": 1.5` is a 400 rather than a guess, and every
number is bounded to what the engine can take, so no value reaches torch only to fail the whole batch there.
Fields whose OpenAI type is a union (`prompt`, `stop`, message `content`) are checked by hand-written
validators: a pydantic union reports one error per member, each with the member's type name in its
location, which would make the `param` of the 400 unreadable.

OpenAI fields fall in three groups: those we implement; those that change nothing on this server (`user`,
`metadata`, `store`, `service_tier`, prompt-cache hints, ...), accepted and ignored; and features we do not
implement (`best_of`, `suffix`, tools, structured output, audio, reasoning controls, non-text content), refused with
a 400 naming the field rather than silently ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from annotated_types import MaxLen, MinLen
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from server.requests import AdapterStatus, FinishReason, SamplingParams

# Error types our validators raise; the error handler turns them into OpenAI's `code`.
UNSUPPORTED_PARAMETER = "unsupported_parameter"
UNSUPPORTED_VALUE = "unsupported_value"
INVALID_TYPE = "invalid_type"
INVALID_VALUE = "invalid_value"
CUSTOM_ERROR_CODES = frozenset({UNSUPPORTED_PARAMETER, UNSUPPORTED_VALUE, INVALID_TYPE, INVALID_VALUE})

MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM-style clients send more
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # OpenAI's bound; each entry costs the engine work at every step of the request
MAX_STOP_TOKEN_IDS = 256  # each generated token is looked up among them
# Above every vocabulary there is, and within the int32 torch indexes with: a larger id or top-k means nothing.
MAX_TOKEN_ID = 2**31 - 1
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions

_REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(text: str) -> str:
    # JSON may escape half of a UTF-16 surrogate pair alone ("\ud800"); Python keeps it in the string, which then
    # fails wherever the text is encoded (the tokenizer, the response body), far from the field that carried it.
    if _LONE_SURROGATE.search(text):
        raise PydanticCustomError(
            "lone_surrogate",
            "the text holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair), which is not "
            "valid Unicode; send valid UTF-8 text",
        )
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]  # every string a request carries


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_prompt(value: object) -> str | list[str] | list[int] | list[list[int]]:
    """OpenAI's four prompt shapes. Emptiness gets its own message, so the client learns which problem
    it has."""
    ok = isinstance(value, str) or (
        isinstance(value, list)
        and (
            all(isinstance(p, str) for p in value)
            or all(_is_token_id(t) for t in value)
            or all(isinstance(p, list) and all(_is_token_id(t) for t in p) for p in value)
        )
    )
    if not ok:
        raise PydanticCustomError(
            INVALID_TYPE,
            "'prompt' must be a string, a list of strings, a list of token ids "
            "or a list of lists of token ids.",
        )
    if not value or (isinstance(value, list) and any(isinstance(p, str | list) and not p for p in value)):
        raise PydanticCustomError(INVALID_VALUE, "'prompt' must not be empty.")
    for text in [value] if isinstance(value, str) else value:
        if isinstance(text, str):
            _valid_unicode(text)
    return value  # type: ignore[return-value]


def _stop_as_list(value: object) -> object:
    if isinstance(value, str):
        return [value]
    if value is not None and not isinstance(value, list):
        raise PydanticCustomError(INVALID_TYPE, "'stop' must be a string or a list of strings.")
    return value


def _content_as_parts(value: object) -> object:
    # A plain string is the common case of a one-part text message; normalizing it here keeps `content` a
    # non-union type, so errors inside a part get a precise location (messages.0.content.1).
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if value is not None and not isinstance(value, list):
        raise PydanticCustomError(
            INVALID_TYPE, "Message 'content' must be a string or a list of content parts."
        )
    return value


# What the validators accept, for the JSON schema: it tells clients (and schema-driven fuzzers) the same rules.
_Text = Annotated[str, MinLen(1)]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], MinLen(1)]
_PromptInput = _Text | Annotated[list[_Text], MinLen(1)] | _TokenIds | Annotated[list[_TokenIds], MinLen(1)]
Prompt = Annotated[
    str | list[str] | list[int] | list[list[int]], PlainValidator(_check_prompt, json_schema_input_type=_PromptInput)
]
StopStrings = Annotated[
    Annotated[list[Text], MaxLen(MAX_STOP_STRINGS)] | None,
    BeforeValidator(
        _stop_as_list, json_schema_input_type=_Text | Annotated[list[_Text], MaxLen(MAX_STOP_STRINGS)] | None
    ),
]
# Token ids written as strings, each with a bias in [-100, 100] (checked by `_canonical_logit_bias`).
LogitBias = Annotated[
    dict[str, float],
    WithJsonSchema({
        "type": "object",
        "maxProperties": MAX_LOGIT_BIAS,
        "propertyNames": {"pattern": "^[0-9]+$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
    }),
]


def _quoted(value: object, limit: int = 24) -> str:
    """Client input for an error message: shortened, and escaped, since a lone surrogate in a message's context
    makes pydantic fail to render the error at all."""
    text = str(value)
    return text[:limit].encode("ascii", "backslashreplace").decode() + ("..." if len(text) > limit else "")


def _logit_bias_token(key: str) -> str:
    """A `logit_bias` key as the token id it writes, without leading zeros; refused unless it is one."""
    shown = _quoted(key)
    if not (key.isascii() and key.isdigit()):
        raise PydanticCustomError(
            INVALID_VALUE, "'logit_bias' keys must be token ids written as strings, got '{key}'.", {"key": shown}
        )
    token = key.lstrip("0") or "0"
    # Length first: int() of a string of thousands of digits is slow, and refused past 4,300 digits.
    if len(token) > len(str(MAX_TOKEN_ID)) or int(token) > MAX_TOKEN_ID:
        raise PydanticCustomError(
            INVALID_VALUE, "'logit_bias' key '{key}' is not a token id of this model.", {"key": shown}
        )
    return token


# --------------------------------------------------------------------------------------------------
# Requests


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG

    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted, changes nothing: our chunks carry no padding


class BaseGenerationRequest(BaseModel):
    """Fields both generation endpoints share. `None` means "the default" for every optional field, because
    OpenAI's schema marks them nullable and clients do send explicit nulls.

    `model` may be left out (OpenAI requires it; vLLM does not): it then means the base model, or the adapter
    `adapter_id` names."""

    model_config = _REQUEST_CONFIG

    model: Text | None = None
    adapter_id: Text | None = None  # extension: pick a LoRA adapter by id, `model` naming the base model
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKEN_ID)  # extension (vLLM): 0 or -1 turns it off
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: StopStrings = None
    stop_token_ids: Annotated[list[int], MaxLen(MAX_STOP_TOKEN_IDS)] | None = None  # extension (vLLM)
    include_stop_str_in_output: bool | None = None  # extension (vLLM)
    ignore_eos: bool | None = None  # extension (vLLM)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = None
    user: Text | None = None  # accepted, changes nothing

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str] | None) -> list[str] | None:
        if stop and any(not s for s in stop):
            raise PydanticCustomError(INVALID_VALUE, "Stop strings must not be empty.")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _canonical_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        """The map keyed by token ids without leading zeros: "07" and "7" are one token, so a client cannot
        multiply the engine's work by spelling one id many ways."""
        if bias is None:
            return None
        if len(bias) > MAX_LOGIT_BIAS:
            raise PydanticCustomError(
                INVALID_VALUE,
                "'logit_bias' holds {count} entries; at most {limit} are allowed.",
                {"count": len(bias), "limit": MAX_LOGIT_BIAS},
            )
        canonical: dict[str, float] = {}
        for key, value in bias.items():
            token = _logit_bias_token(key)
            if token in canonical:
                raise PydanticCustomError(
                    INVALID_VALUE, "'logit_bias' names token {token} more than once.", {"token": token}
                )
            if not -100.0 <= value <= 100.0:
                raise PydanticCustomError(INVALID_VALUE, "'logit_bias' values must lie in [-100, 100].")
            canonical[token] = value
        return canonical

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logprobs_k(self) -> int | None:
        """How many alternatives per token the client wants (None: no logprobs at all)."""
        raise NotImplementedError

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=self.seed,
            stop=tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=tuple(sorted((int(k), v) for k, v in (self.logit_bias or {}).items())),
            logprobs=self.logprobs_k(),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
        )


class CompletionRequest(BaseGenerationRequest):
    """`POST /v1/completions` (OpenAI's CreateCompletionRequest)."""

    model_config = _REQUEST_CONFIG | ConfigDict(json_schema_extra={
        "anyOf": [  # `_not_with_echo`, for the schema
            {"properties": {"logprobs": {"type": "null"}}},
            {"properties": {"echo": {"enum": [False, None]}}},
        ],
        "examples": [  # a short max_tokens: within the low --max-tokens-limit a test server may set
            {"prompt": "Once upon a time", "max_tokens": 2},
            {"prompt": "Once upon a time", "max_tokens": 2, "logprobs": 2, "stream": True,
             "stream_options": {"include_usage": True}},
        ],
    })

    prompt: Prompt
    max_tokens: int | None = Field(None, ge=1)  # None: DEFAULT_COMPLETION_MAX_TOKENS
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=20)
    suffix: Text | None = Field(None, json_schema_extra={"maxLength": 0})  # insertion is not supported

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        # best_of == n is plain sampling; anything else needs server-side ranking, which we do not do.
        n = info.data.get("n") or 1
        if best_of is not None and best_of != n:
            raise PydanticCustomError(UNSUPPORTED_PARAMETER, "'best_of' other than n is not supported.")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise PydanticCustomError(UNSUPPORTED_PARAMETER, "'suffix' (insertion) is not supported.")
        return suffix

    @field_validator("logprobs")
    @classmethod
    def _not_with_echo(cls, logprobs: int | None, info: ValidationInfo) -> int | None:
        # OpenAI returns the prompt tokens' logprobs with echo; the engine does not compute them, and
        # leaving them out would silently misalign `tokens` with `text`.
        if logprobs is not None and info.data.get("echo"):
            raise PydanticCustomError(UNSUPPORTED_VALUE, "'logprobs' together with 'echo' is not supported.")
        return logprobs

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def resolved_max_tokens(self) -> int:
        return DEFAULT_COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens


def _text_part_schema(schema: dict[str, Any]) -> None:
    # The validator below refuses other types with its own message; the schema says what it accepts.
    schema["properties"]["type"] = {"const": "text"}
    schema["properties"]["text"] = {"type": "string"}
    schema["required"] = ["type", "text"]


class TextContentPart(BaseModel):
    model_config = _REQUEST_CONFIG | ConfigDict(json_schema_extra=_text_part_schema)

    type: str
    text: Text | None = None
    prompt_cache_breakpoint: dict[str, Any] | None = None  # accepted, changes nothing: a caching hint

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        # Before the fields: an image or audio part is refused for its type, not for its fields a text part lacks.
        if isinstance(data, dict) and "type" in data and data["type"] != "text":
            raise PydanticCustomError(
                UNSUPPORTED_VALUE,
                "Content parts of type '{type}' are not supported; only 'text' parts are.",
                {"type": _quoted(data["type"])},
            )
        return data

    @model_validator(mode="after")
    def _text_present(self) -> TextContentPart:
        if self.text is None:
            raise PydanticCustomError(INVALID_VALUE, "A 'text' content part needs a 'text' string.")
        return self


# Only an assistant message may leave out its content (`_content_required`).
_CONTENT_RULE = {"anyOf": [{"properties": {"role": {"const": "assistant"}}},
                           {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}]}


class ChatMessage(BaseModel):
    model_config = _REQUEST_CONFIG | ConfigDict(json_schema_extra=_CONTENT_RULE)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[
        list[TextContentPart] | None,
        BeforeValidator(_content_as_parts, json_schema_input_type=str | list[TextContentPart] | None),
    ] = None
    name: Text | None = None
    refusal: Text | None = None  # an assistant's earlier refusal: its text when it has no content
    tool_call_id: Text | None = None  # accepted, changes nothing: the chat template sees no tool calls
    # Tool calls and audio are not supported: an empty list, or no function call or audio, is all a message may carry.
    tool_calls: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    function_call: Any = Field(None, json_schema_extra={"type": "null"})
    audio: Any = Field(None, json_schema_extra={"type": "null"})

    @field_validator("tool_calls", "function_call", "audio")
    @classmethod
    def _no_tool_calls(cls, value: Any, info: ValidationInfo) -> Any:
        if value if info.field_name == "tool_calls" else value is not None:
            raise PydanticCustomError(
                UNSUPPORTED_PARAMETER,
                "Messages with '{field}' are not supported.",
                {"field": info.field_name},
            )
        return value

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise PydanticCustomError(
                INVALID_VALUE, "A '{role}' message needs 'content'.", {"role": self.role}
            )
        return self

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(BaseGenerationRequest):
    """`POST /v1/chat/completions` (OpenAI's CreateChatCompletionRequest)."""

    model_config = _REQUEST_CONFIG | ConfigDict(json_schema_extra={
        "anyOf": [  # `_top_needs_logprobs`, for the schema
            {"properties": {"top_logprobs": {"type": "null"}}},
            {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
        ],
        "examples": [
            {"messages": [{"role": "user", "content": "Hello"}], "max_completion_tokens": 2},
            {"messages": [{"role": "user", "content": "Hello"}], "max_completion_tokens": 2, "logprobs": True,
             "top_logprobs": 2, "stream": True, "stream_options": {"include_usage": True}},
        ],
    })

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Only text output and no tool calling: the schema says which values the validators below let through.
    response_format: dict[str, Any] | None = Field(
        None, json_schema_extra={"properties": {"type": {"const": "text"}}, "required": ["type"]}
    )
    tools: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    tool_choice: Any = Field(None, json_schema_extra={"enum": ["none", None]})
    functions: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    function_call: Any = Field(None, json_schema_extra={"enum": ["none", None]})
    modalities: list[Text] | None = Field(None, json_schema_extra={"items": {"const": "text"}})
    # Features of OpenAI's models this server does not have: refused when set.
    audio: Any = Field(None, json_schema_extra={"type": "null"})
    moderation: Any = Field(None, json_schema_extra={"type": "null"})
    web_search_options: Any = Field(None, json_schema_extra={"type": "null"})
    reasoning_effort: Any = Field(None, json_schema_extra={"type": "null"})
    verbosity: Any = Field(None, json_schema_extra={"type": "null"})
    # Accepted, and change nothing here: storage, billing, tracking and caching on OpenAI's platform, and hints.
    metadata: Annotated[dict[Annotated[Text, MaxLen(64)], Annotated[Text, MaxLen(512)]], MaxLen(16)] | None = None
    store: bool | None = None
    service_tier: Text | None = None
    safety_identifier: Annotated[Text, MaxLen(64)] | None = None
    prompt_cache_key: Text | None = None
    prompt_cache_retention: Text | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None  # a latency hint: the output is the same without it
    parallel_tool_calls: bool | None = None  # no tools, so nothing to run in parallel

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise PydanticCustomError(INVALID_VALUE, "'top_logprobs' requires 'logprobs' to be true.")
        return top

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        if value:
            raise PydanticCustomError(
                UNSUPPORTED_PARAMETER,
                "'{field}' (tool calling) is not supported yet.",
                {"field": info.field_name},
            )
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value != "none":
            raise PydanticCustomError(
                UNSUPPORTED_PARAMETER,
                "'{field}' (tool calling) is not supported yet.",
                {"field": info.field_name},
            )
        return value

    @field_validator("audio", "moderation", "web_search_options", "reasoning_effort", "verbosity")
    @classmethod
    def _unsupported_when_set(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise PydanticCustomError(
                UNSUPPORTED_PARAMETER,
                "'{field}' is not supported by this server's models; leave it out.",
                {"field": info.field_name},
            )
        return value

    @field_validator("modalities")
    @classmethod
    def _text_output_only(cls, value: list[str] | None) -> list[str] | None:
        if value and any(modality != "text" for modality in value):
            raise PydanticCustomError(UNSUPPORTED_VALUE, "Only the 'text' output modality is supported.")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_format_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise PydanticCustomError(
                UNSUPPORTED_VALUE, "Only response_format type 'text' is supported (no structured output)."
            )
        return value

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_tokens_field(self) -> str:
        """The field the client used to cap the output, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --------------------------------------------------------------------------------------------------
# Responses (shapes from OpenAI's published schemas; `tests/support/openai_schema.py` holds us to them)


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None  # None only in streamed chunks before the last


class CompletionResponse(BaseModel):
    """A completion, and also each streamed chunk of one (OpenAI uses the same shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present_fields_only(self) -> dict[str, str]:
        # OpenAI sends {"role": "assistant", "content": ""}, then {"content": ...}, then {} with the finish.
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelDims(BaseModel):
    """The base model's shape, in its Hugging Face `config.json` names: what an adapter built for it must match
    (the load-test harness shapes its synthetic adapters from it)."""

    model_config = ConfigDict(extra="ignore")

    architectures: list[str]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


class ModelCard(BaseModel):
    """OpenAI's Model object plus vLLM-style `root`/`parent`/`max_model_len`; the base model's card also carries
    a `description` and its `dims`, an adapter's its `status` (with the `error` that keeps it from serving)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lorahive"
    root: str
    parent: str | None = None
    max_model_len: int | None = None
    description: str | None = None
    dims: ModelDims | None = None
    status: AdapterStatus | None = None
    error: str | None = None

    @model_serializer(mode="wrap")
    def _omit_missing_extensions(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for name in ("max_model_len", "description", "dims", "status", "error"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
