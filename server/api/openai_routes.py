"""OpenAI-compatible routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

The two generation routes differ only in how they turn a request into prompt tokens and in the JSON
shapes of their answers. Everything else is shared: adapter resolution, the context-length check,
submission (one engine request per prompt, each with the same `n`), merging the engine streams, SSE
framing, and aborting engine work when the client goes away. The per-endpoint shapes live in the two
small `_Renderer` subclasses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Protocol, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from server.api.adapter_access import AccessDep, AdapterAccess
from server.api.errors import engine_error_response, error_responses, internal_error_body, request_error_response
from server.api.protocol import (
    BaseGenerationRequest,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelDims,
    ModelList,
    UsageInfo,
)
from server.api.request_limits import RequestLimitsDep, utf8_size
from server.api.tokenization_pool import TokenizationPoolDep
from server.sequence import (
    AdapterNotFoundError,
    AdapterStatus,
    ChoiceDelta,
    EngineStepError,
    FinishReason,
    GenerationRequest,
    RequestError,
    SamplingParams,
    TokenLogprob,
)
from server.tokenizer import ChatTemplateError

log = logging.getLogger("lorahive.api")
T = TypeVar("T")

# OpenAI's stand-in for "too unlikely to report" (JSON has no -Infinity).
_MIN_LOGPROB = -9999.0


# --------------------------------------------------------------------------------------------------
# The engine surface the routes are written against (server/engine.py implements it)


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


def get_engine(request: Request) -> EngineAPI:
    """The engine `build_app` stored on the app (a dependency, so tests and other apps can swap it)."""
    return request.app.state.engine


EngineDep = Annotated[EngineAPI, Depends(get_engine)]
router = APIRouter()
_NOT_FOUND = "No model or adapter of that id that the caller may see."
# Answers of both generation routes beyond the ones the middleware adds (server/api/openapi.py).
_GENERATION_ERRORS = error_responses({
    400: "The request is invalid, over one of this server's limits, or does not fit the context length; or its "
         "adapter is one this server's settings cannot serve (code adapter_not_servable).",
    404: _NOT_FOUND,
    429: "The waiting queue is full and this tenant holds its fair share of it (--max-waiting-requests).",
    500: "The engine step running this request failed; the message carries the error id of its log entry.",
    503: "The adapter's stored files are broken (code adapter_broken), another server sharing the store replaced or "
         "deleted it while the request waited (code adapter_changed: retry), or the server is draining.",
})
# What `stream: true` sends, one chunk per server-sent event (the OpenAPI document describes it).
EVENT_STREAMS: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionResponse,
    "/v1/chat/completions": ChatCompletionChunk,
}


# --------------------------------------------------------------------------------------------------
# Routes


@router.get("/v1/models", response_model=ModelList)
async def list_models(engine: EngineDep, access: AccessDep) -> ModelList:
    return ModelList(data=_model_cards(engine, access))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=error_responses({404: _NOT_FOUND}))
async def retrieve_model(model_id: str, engine: EngineDep, access: AccessDep) -> ModelCard:
    for card in _model_cards(engine, access):
        if card.id == model_id:
            return card
    raise _model_not_found(engine, model_id, "model")


@router.post("/v1/completions", response_model=CompletionResponse, responses=_GENERATION_ERRORS)
async def create_completion(
    body: CompletionRequest, request: Request, engine: EngineDep, access: AccessDep, limits: RequestLimitsDep,
    tokenization: TokenizationPoolDep,
) -> Response:
    limits.check_shape(body)
    limits.check_max_tokens(body.max_tokens, "max_tokens")
    adapter = _resolve_adapter(engine, access, body)
    batch = _prompt_batch(body)
    text_sizes = [utf8_size(item) for item in batch if isinstance(item, str)]
    limits.check_prompt_bytes(text_sizes, "prompt")
    size = sum(text_sizes) + sum(len(item) for item in batch if not isinstance(item, str))
    prompts = await tokenization.run(access.principal.tenant, size, _completion_prompts, engine.tokenizer, body)
    limits.check_prompt_tokens(sum(len(p.token_ids) for p in prompts), "prompt")
    max_tokens = _fit_context(
        engine.max_model_len, prompts, limits.cap_max_tokens(body.resolved_max_tokens()), "prompt", "max_tokens"
    )
    params = body.sampling_params(max_tokens)
    return await _generate(request, engine, access, body, adapter, prompts, params, _CompletionRenderer)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_GENERATION_ERRORS)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, access: AccessDep, limits: RequestLimitsDep,
    tokenization: TokenizationPoolDep,
) -> Response:
    limits.check_shape(body)
    limit = body.requested_max_tokens()  # None: whatever room the context leaves, within the server's limit
    limits.check_max_tokens(limit, body.max_tokens_field)
    adapter = _resolve_adapter(engine, access, body)
    # The chat template writes every message's text into the prompt, so their sizes together bound its size.
    size = sum(utf8_size(m.text()) + utf8_size(m.name or "") for m in body.messages)
    limits.check_prompt_bytes([size], "messages")
    prompts = [await tokenization.run(access.principal.tenant, size, _chat_prompt, engine.tokenizer, body)]
    limits.check_prompt_tokens(len(prompts[0].token_ids), "messages")
    max_tokens = _fit_context(engine.max_model_len, prompts, limit, "messages", body.max_tokens_field)
    params = body.sampling_params(limits.cap_max_tokens(max_tokens))
    return await _generate(request, engine, access, body, adapter, prompts, params, _ChatRenderer)


def _model_cards(engine: EngineAPI, access: AdapterAccess) -> list[ModelCard]:
    """The base model and the adapters the caller may see."""
    base = engine.model_name
    dims = None if engine.base_config is None else ModelDims.model_validate(engine.base_config)
    cards = [ModelCard(id=base, created=engine.created, root=base, max_model_len=engine.max_model_len,
                       description=engine.model_description, dims=dims)]
    for adapter_id in engine.adapter_ids():
        # An adapter stored under the base model's name is not listed here: that id names the base model.
        state = engine.adapter_status(adapter_id) if adapter_id != base and access.visible(adapter_id) else None
        if state is not None:
            cards.append(ModelCard(id=adapter_id, created=engine.created, root=base, parent=base,
                                   max_model_len=engine.max_model_len, status=state[0], error=state[1]))
    return cards


# --------------------------------------------------------------------------------------------------
# From request to prompt tokens (run on the tokenization pool: tokenizing a long prompt must not stall the loop)


@dataclass(frozen=True)
class _Prompt:
    token_ids: list[int]
    echo: str = ""  # text shown ahead of the completion when the client asked for `echo`


def _prompt_batch(body: CompletionRequest) -> list[str] | list[list[int]]:
    raw = body.prompt
    # One prompt (a string or one token list) or a batch of them; the validator has checked the shapes.
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw[0], int):
        return [raw]  # type: ignore[list-item]
    return raw  # type: ignore[return-value]


def _completion_prompts(tokenizer: TokenizerAPI, body: CompletionRequest) -> list[_Prompt]:
    prompts = []
    for item in _prompt_batch(body):
        if isinstance(item, str):
            prompts.append(_Prompt(tokenizer.encode(item), item if body.echo else ""))
        else:
            _check_token_ids(item, tokenizer.vocab_size, "prompt")
            prompts.append(_Prompt(list(item), tokenizer.decode(item) if body.echo else ""))
    return prompts


def _chat_prompt(tokenizer: TokenizerAPI, body: ChatCompletionRequest) -> _Prompt:
    # OpenAI's "developer" role is its newer name for "system"; open models' templates only know the latter.
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        | ({"name": m.name} if m.name else {})
        for m in body.messages
    ]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise RequestError(str(exc), param="messages") from exc
    # The template writes BOS itself where the model wants one.
    return _Prompt(tokenizer.encode(text, add_special_tokens=False))


def _check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(
            f"Token id {bad} in '{param}' is outside the vocabulary [0, {vocab_size}).", param=param,
            code="invalid_value",
        )


def _fit_context(
    max_model_len: int,
    prompts: list[_Prompt],
    max_tokens: int | None,
    prompt_param: str,
    max_tokens_param: str,
) -> int:
    """Checks every prompt leaves room for `max_tokens`; `None` means "all the room there is"."""
    longest = max(len(p.token_ids) for p in prompts)
    if longest >= max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens, and the prompt alone is "
            f"{longest} tokens; shorten it to leave room for the completion.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return max_model_len - longest
    if longest + max_tokens > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens, but {longest + max_tokens} were "
            f"requested ({longest} in the prompt, {max_tokens} for the completion). "
            f"Reduce the prompt or '{max_tokens_param}'.",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    return max_tokens


def _model_not_found(engine: EngineAPI, name: str, param: str) -> AdapterNotFoundError:
    error = AdapterNotFoundError(name, param=param)
    if param == "model":  # the client may not know about adapters at all: say what is served
        error.message = (
            f"The model '{name}' does not exist; this server serves '{engine.model_name}' and its adapters "
            "(see GET /v1/models)."
        )
    return error


@dataclass(frozen=True)
class _Adapter:
    id: str | None  # None: the base model alone
    param: str  # the request field that chose it, named in errors


def _resolve_adapter(engine: EngineAPI, access: AdapterAccess, body: BaseGenerationRequest) -> _Adapter:
    """The adapter the request names, in `model` or `adapter_id` (with `model` naming the base model, or naming
    the same adapter). One the caller may not see is "not found", like one that is not there."""
    named_by_model = _adapter_named_by_model(engine, access, body.model)
    if body.adapter_id is None:
        return _Adapter(named_by_model, "model")
    if not access.visible(body.adapter_id):
        raise _model_not_found(engine, body.adapter_id, "adapter_id")
    if named_by_model is not None and named_by_model != body.adapter_id:
        raise RequestError(
            f"'model' names the adapter '{named_by_model}' and 'adapter_id' the adapter '{body.adapter_id}'; "
            f"name one adapter, or set 'model' to the base model '{engine.model_name}'.",
            param="adapter_id",
            code="conflicting_parameters",
        )
    return _Adapter(body.adapter_id, "adapter_id")


def _adapter_named_by_model(engine: EngineAPI, access: AdapterAccess, model: str | None) -> str | None:
    # The base model's name wins over an adapter of the same name: the base must always be reachable.
    if model is None or model == engine.model_name:
        return None
    if access.visible(model):
        return model
    raise _model_not_found(engine, model, "model")


# --------------------------------------------------------------------------------------------------
# Submission and the streams' output


@dataclass
class _ChoiceState:
    index: int  # OpenAI's choice index: prompt_index * n + choice_index
    prefix: str  # echoed prompt, sent before the first generated text
    started: bool = False
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # streaming: tokens not yet reported
    text_offset: int = 0  # completions logprobs: where the next token starts in this choice's text
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        self.text_offset = len(self.prefix)

    def take_unsent_logprobs(self) -> list[TokenLogprob]:
        taken, self.unsent_logprobs = self.unsent_logprobs, []
        return taken


@dataclass
class _Job:
    """One HTTP request's engine work: an engine stream per prompt, each with the same `n` choices."""

    id: str
    model: str  # what serves the request: the adapter's id, or the base model's name
    n: int
    streams: list[RequestStreamAPI]
    choices: list[_ChoiceState]
    include_usage: bool
    want_logprobs: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def choice(self, stream_index: int, delta: ChoiceDelta) -> _ChoiceState:
        return self.choices[stream_index * self.n + delta.index]

    def usage(self) -> UsageInfo:
        prompt = sum(s.prompt_tokens for s in self.streams)
        completion = sum(s.completion_tokens for s in self.streams)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _submit(
    engine: EngineAPI,
    tenant: str | None,
    body: BaseGenerationRequest,
    adapter: _Adapter,
    prompts: list[_Prompt],
    params: SamplingParams,
    id_prefix: str,
) -> _Job:
    vocab_size = engine.tokenizer.vocab_size
    _check_token_ids(body.stop_token_ids or (), vocab_size, "stop_token_ids")
    _check_token_ids([token for token, _ in params.logit_bias], vocab_size, "logit_bias")
    job_id = f"{id_prefix}-{uuid.uuid4().hex}"
    n = body.num_choices
    streams: list[RequestStreamAPI] = []
    try:
        for i, prompt in enumerate(prompts):
            request = GenerationRequest(
                tuple(prompt.token_ids), params, n, adapter.id, f"{job_id}-{i}", tenant=tenant
            )
            streams.append(engine.submit(request))
    except BaseException as exc:
        for stream in streams:  # all prompts or none
            stream.abort()
        if isinstance(exc, AdapterNotFoundError):  # deleted since we looked: name the field the client used
            raise _model_not_found(engine, exc.adapter_id, adapter.param) from exc
        raise
    choices = [_ChoiceState(p * n + i, prompt.echo) for p, prompt in enumerate(prompts) for i in range(n)]
    return _Job(
        id=job_id,
        model=adapter.id or engine.model_name,
        n=n,
        streams=streams,
        choices=choices,
        include_usage=body.include_usage,
        want_logprobs=params.logprobs is not None,
    )


async def merge_streams(streams: Sequence[RequestStreamAPI]) -> AsyncGenerator[tuple[int, ChoiceDelta], None]:
    """Yields `(stream position, delta)` from all streams as soon as any has output, so one slow prompt
    does not hold back the others. Streams not yet finished when the consumer stops (client gone,
    cancellation, an error) are aborted, which frees their engine resources."""
    queue: asyncio.Queue[tuple[int, ChoiceDelta | BaseException | None]] = asyncio.Queue()

    async def pump(position: int, stream: RequestStreamAPI) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((position, delta))
            queue.put_nowait((position, None))
        except Exception as exc:  # handed to the consumer, which re-raises it in the request's task
            queue.put_nowait((position, exc))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    live = set(range(len(streams)))
    try:
        while live:
            position, item = await queue.get()
            if item is None:
                live.discard(position)
            elif isinstance(item, BaseException):
                live.discard(position)
                raise item
            else:
                yield position, item
    finally:
        for position in live:
            streams[position].abort()
        for task in pumps:
            task.cancel()


async def _collect(job: _Job) -> list[_ChoiceState]:
    async with aclosing(merge_streams(job.streams)) as deltas:
        async for position, delta in deltas:
            choice = job.choice(position, delta)
            choice.parts.append(delta.text)
            choice.logprobs.extend(delta.logprobs or ())
            choice.finish_reason = delta.finish_reason or choice.finish_reason
    unfinished = [c.index for c in job.choices if c.finish_reason is None]
    if unfinished:
        raise RuntimeError(
            f"engine streams of {job.id} ended without a finish_reason for choices {unfinished}"
        )
    return job.choices


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Runs `work`, cancelling it (and so aborting its engine streams) if the client disconnects first:
    uvicorn does not cancel a handler whose client left, so a non-streamed generation would otherwise
    run to `max_tokens` for nobody. Returns None if the client left."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()  # the client left first
        await asyncio.wait((task,))  # let its cleanup (aborting the engine streams) run now
        return None
    finally:
        watcher.cancel()
        task.cancel()  # a no-op when done; covers this handler being cancelled itself


class _EventStream(StreamingResponse):
    """`text/event-stream` whose generator is always closed when the response ends.

    Starlette stops iterating when the client disconnects, but if that happens while a chunk is being
    sent it leaves the generator suspended at its `yield`; closing it here runs its `finally` (which
    aborts the engine streams) now rather than whenever the garbage collector gets to it.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


# --------------------------------------------------------------------------------------------------
# Endpoint-specific shapes


class _Renderer(ABC):
    """Builds one endpoint's chunks and final response from the shared per-choice state."""

    ID_PREFIX: ClassVar[str]
    # Completions put the last text and the finish_reason in one chunk; chat sends the finish in its own
    # chunk with an empty delta, as OpenAI does.
    FINISH_WITH_TEXT: ClassVar[bool]

    def __init__(self, job: _Job, tokenizer: TokenizerAPI) -> None:
        self.job = job
        self.tokenizer = tokenizer

    @abstractmethod
    def opening_chunk(self, choice: _ChoiceState) -> BaseModel | None: ...

    @abstractmethod
    def chunk(
        self, choice: _ChoiceState, text: str, logprobs: list[TokenLogprob], finish: FinishReason | None
    ) -> BaseModel: ...

    @abstractmethod
    def usage_chunk(self) -> BaseModel: ...

    @abstractmethod
    def response(self) -> BaseModel: ...

    def sse(self, chunk: BaseModel) -> str:
        # `usage` is present on every chunk (null until the last) only if the client asked for it.
        exclude = None if self.job.include_usage else {"usage"}
        return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"

    async def events(self) -> AsyncGenerator[str, None]:
        job = self.job
        try:
            async with aclosing(merge_streams(job.streams)) as deltas:
                async for position, delta in deltas:
                    for chunk in self._chunks_for(job.choice(position, delta), delta):
                        yield self.sse(chunk)
            if job.include_usage:
                yield self.sse(self.usage_chunk())
        # The 200 and its headers are gone already; report in-band, as OpenAI's SDKs expect.
        except RequestError as exc:  # ended by the server's state (a drain ran out of time, a broken adapter)
            yield f"data: {request_error_response(exc).body.decode()}\n\n"
        except EngineStepError as exc:  # the engine logged the cause under the id this body carries
            yield f"data: {engine_error_response(exc).body.decode()}\n\n"
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("stream %s failed (error id %s)", job.id, error_id)
            yield f"data: {json.dumps(internal_error_body(error_id))}\n\n"
        yield "data: [DONE]\n\n"

    def _chunks_for(self, choice: _ChoiceState, delta: ChoiceDelta) -> list[BaseModel]:
        chunks: list[BaseModel] = []
        text = delta.text
        if not choice.started:
            choice.started = True
            opening = self.opening_chunk(choice)
            chunks += [opening] if opening is not None else []
            text = choice.prefix + text
        # Tokens whose text the engine holds back (a possible stop string) report their logprobs with
        # the next text we do send, so no chunk has to go out empty.
        choice.unsent_logprobs.extend(delta.logprobs or ())
        finish = delta.finish_reason
        if text and finish and self.FINISH_WITH_TEXT:
            return [*chunks, self.chunk(choice, text, choice.take_unsent_logprobs(), finish)]
        if text:
            chunks.append(self.chunk(choice, text, choice.take_unsent_logprobs(), None))
        if finish:
            chunks.append(self.chunk(choice, "", choice.take_unsent_logprobs(), finish))
        return chunks

    def _token(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


class _CompletionRenderer(_Renderer):
    ID_PREFIX = "cmpl"
    FINISH_WITH_TEXT = True

    def opening_chunk(self, choice: _ChoiceState) -> None:
        return None  # the echoed prompt rides on the first text chunk

    def chunk(
        self, choice: _ChoiceState, text: str, logprobs: list[TokenLogprob], finish: FinishReason | None
    ) -> CompletionResponse:
        item = CompletionChoice(
            index=choice.index, text=text, logprobs=self._logprobs(choice, logprobs), finish_reason=finish
        )
        return self._envelope([item], None)

    def usage_chunk(self) -> CompletionResponse:
        return self._envelope([], self.job.usage())

    def response(self) -> CompletionResponse:
        choices = [
            CompletionChoice(
                index=c.index,
                text=c.prefix + "".join(c.parts),
                logprobs=self._logprobs(c, c.logprobs),
                finish_reason=c.finish_reason,
            )
            for c in self.job.choices
        ]
        return self._envelope(choices, self.job.usage())

    def _envelope(self, choices: list[CompletionChoice], usage: UsageInfo | None) -> CompletionResponse:
        job = self.job
        return CompletionResponse(
            id=job.id, created=job.created, model=job.model, choices=choices, usage=usage
        )

    def _logprobs(self, choice: _ChoiceState, logprobs: list[TokenLogprob]) -> CompletionLogprobs | None:
        if not self.job.want_logprobs:
            return None
        out = CompletionLogprobs()
        for lp in logprobs:
            token = self._token(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(_finite(lp.logprob))
            out.top_logprobs.append({self._token(t): _finite(v) for t, v in lp.top})
            out.text_offset.append(choice.text_offset)
            choice.text_offset += len(token)
        return out


class _ChatRenderer(_Renderer):
    ID_PREFIX = "chatcmpl"
    FINISH_WITH_TEXT = False

    def opening_chunk(self, choice: _ChoiceState) -> ChatCompletionChunk:
        return self._envelope(
            [ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))]
        )

    def chunk(
        self, choice: _ChoiceState, text: str, logprobs: list[TokenLogprob], finish: FinishReason | None
    ) -> ChatCompletionChunk:
        delta = ChatDelta(content=text) if text else ChatDelta()
        item = ChatChunkChoice(
            index=choice.index,
            delta=delta,
            logprobs=self._logprobs(logprobs) if logprobs else None,
            finish_reason=finish,
        )
        return self._envelope([item])

    def usage_chunk(self) -> ChatCompletionChunk:
        return self._envelope([], self.job.usage())

    def response(self) -> ChatCompletionResponse:
        job = self.job
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content="".join(c.parts)),
                logprobs=self._logprobs(c.logprobs),
                finish_reason=c.finish_reason or "stop",  # never None: _collect checked
            )
            for c in job.choices
        ]
        return ChatCompletionResponse(
            id=job.id, created=job.created, model=job.model, choices=choices, usage=job.usage()
        )

    def _envelope(
        self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None
    ) -> ChatCompletionChunk:
        job = self.job
        return ChatCompletionChunk(
            id=job.id, created=job.created, model=job.model, choices=choices, usage=usage
        )

    def _logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.job.want_logprobs:
            return None
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    **self._top(lp.token_id, lp.logprob).model_dump(),
                    top_logprobs=[self._top(t, v) for t, v in lp.top],
                )
                for lp in logprobs
            ]
        )

    def _top(self, token_id: int, logprob: float) -> ChatTopLogprob:
        return ChatTopLogprob(
            token=self._token(token_id), logprob=_finite(logprob), bytes=self.tokenizer.token_bytes(token_id)
        )


# --------------------------------------------------------------------------------------------------
# The shared request flow


async def _generate(
    request: Request,
    engine: EngineAPI,
    access: AdapterAccess,
    body: BaseGenerationRequest,
    adapter: _Adapter,
    prompts: list[_Prompt],
    params: SamplingParams,
    renderer_class: type[_Renderer],
) -> Response:
    job = _submit(engine, access.principal.tenant, body, adapter, prompts, params, renderer_class.ID_PREFIX)
    renderer = renderer_class(job, engine.tokenizer)
    if body.stream:
        return _EventStream(renderer.events())
    if await _unless_disconnected(request, _collect(job)) is None:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return Response(renderer.response().model_dump_json(), media_type="application/json")
