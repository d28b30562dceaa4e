"""OpenAI-compatible routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

The two generation routes differ only in how they turn a request into prompt tokens (server/api/prompts.py)
and in the JSON shapes of their answers (server/api/rendering.py). Everything else is shared: adapter
resolution (server/api/adapter_resolution.py), the context-length check, submission (one engine request per
prompt, each with the same `n`: server/api/generation_job.py), and the streams' output, SSE framing and
aborting engine work when the client goes away (server/api/streaming.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from server.api.adapter_access import AccessDep, AdapterAccess
from server.api.adapter_resolution import ResolvedAdapter, model_not_found, resolve_adapter
from server.api.dependencies import EngineAPI, EngineDep
from server.api.errors import error_responses
from server.api.generation_job import collect_choices, submit_job
from server.api.prompts import Prompt, chat_prompt, completion_prompts, fit_context, prompt_batch
from server.api.protocol import (
    BaseGenerationRequest,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelDims,
    ModelList,
)
from server.api.rendering import ChatRenderer, CompletionRenderer, Renderer
from server.api.request_limits import RequestLimitsDep, utf8_size
from server.api.streaming import EventStream, unless_disconnected
from server.api.tokenization_pool import TokenizationPoolDep
from server.requests import SamplingParams

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
    raise model_not_found(engine, model_id, "model")


@router.post("/v1/completions", response_model=CompletionResponse, responses=_GENERATION_ERRORS)
async def create_completion(
    body: CompletionRequest, request: Request, engine: EngineDep, access: AccessDep, limits: RequestLimitsDep,
    tokenization: TokenizationPoolDep,
) -> Response:
    limits.check_shape(body)
    limits.check_max_tokens(body.max_tokens, "max_tokens")
    adapter = resolve_adapter(engine, access, body)
    batch = prompt_batch(body)
    text_sizes = [utf8_size(item) for item in batch if isinstance(item, str)]
    limits.check_prompt_bytes(text_sizes, "prompt")
    size = sum(text_sizes) + sum(len(item) for item in batch if not isinstance(item, str))
    prompts = await tokenization.run(access.principal.tenant, size, completion_prompts, engine.tokenizer, body)
    limits.check_prompt_tokens(sum(len(p.token_ids) for p in prompts), "prompt")
    max_tokens = fit_context(
        engine.max_model_len, prompts, limits.cap_max_tokens(body.resolved_max_tokens()), "prompt", "max_tokens"
    )
    params = body.sampling_params(max_tokens)
    return await _generate(request, engine, access, body, adapter, prompts, params, CompletionRenderer)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_GENERATION_ERRORS)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, access: AccessDep, limits: RequestLimitsDep,
    tokenization: TokenizationPoolDep,
) -> Response:
    limits.check_shape(body)
    limit = body.requested_max_tokens()  # None: whatever room the context leaves, within the server's limit
    limits.check_max_tokens(limit, body.max_tokens_field)
    adapter = resolve_adapter(engine, access, body)
    # The chat template writes every message's text into the prompt, so their sizes together bound its size.
    size = sum(utf8_size(m.text()) + utf8_size(m.name or "") for m in body.messages)
    limits.check_prompt_bytes([size], "messages")
    prompts = [await tokenization.run(access.principal.tenant, size, chat_prompt, engine.tokenizer, body)]
    limits.check_prompt_tokens(len(prompts[0].token_ids), "messages")
    max_tokens = fit_context(engine.max_model_len, prompts, limit, "messages", body.max_tokens_field)
    params = body.sampling_params(limits.cap_max_tokens(max_tokens))
    return await _generate(request, engine, access, body, adapter, prompts, params, ChatRenderer)


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
# The shared request flow


async def _generate(
    request: Request,
    engine: EngineAPI,
    access: AdapterAccess,
    body: BaseGenerationRequest,
    adapter: ResolvedAdapter,
    prompts: list[Prompt],
    params: SamplingParams,
    renderer_class: type[Renderer],
) -> Response:
    job = submit_job(engine, access.principal.tenant, body, adapter, prompts, params, renderer_class.ID_PREFIX)
    renderer = renderer_class(job, engine.tokenizer)
    if body.stream:
        return EventStream(renderer.events())
    if await unless_disconnected(request, collect_choices(job)) is None:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return Response(renderer.response().model_dump_json(), media_type="application/json")
