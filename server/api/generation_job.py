"""One HTTP generation request's engine work: submitting an engine request per prompt, the per-choice state the
renderers (server/api/rendering.py) build their output from, and collecting a non-streamed answer.
"""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

from server.api.adapter_resolution import ResolvedAdapter, model_not_found
from server.api.dependencies import EngineAPI, RequestStreamAPI
from server.api.prompts import Prompt, check_token_ids
from server.api.protocol import BaseGenerationRequest, UsageInfo
from server.api.streaming import merge_streams
from server.requests import (
    AdapterNotFoundError,
    ChoiceDelta,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)


@dataclass
class ChoiceState:
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
class GenerationJob:
    """One HTTP request's engine work: an engine stream per prompt, each with the same `n` choices."""

    id: str
    model: str  # what serves the request: the adapter's id, or the base model's name
    n: int
    streams: list[RequestStreamAPI]
    choices: list[ChoiceState]
    include_usage: bool
    want_logprobs: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def choice(self, stream_index: int, delta: ChoiceDelta) -> ChoiceState:
        return self.choices[stream_index * self.n + delta.index]

    def usage(self) -> UsageInfo:
        prompt = sum(s.prompt_tokens for s in self.streams)
        completion = sum(s.completion_tokens for s in self.streams)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def submit_job(
    engine: EngineAPI,
    tenant: str | None,
    body: BaseGenerationRequest,
    adapter: ResolvedAdapter,
    prompts: list[Prompt],
    params: SamplingParams,
    id_prefix: str,
) -> GenerationJob:
    vocab_size = engine.tokenizer.vocab_size
    check_token_ids(body.stop_token_ids or (), vocab_size, "stop_token_ids")
    check_token_ids([token for token, _ in params.logit_bias], vocab_size, "logit_bias")
    job_id = f"{id_prefix}-{uuid.uuid4().hex}"
    n = body.num_choices
    streams: list[RequestStreamAPI] = []
    try:
        for i, prompt in enumerate(prompts):
            request = GenerationRequest(
                tuple(prompt.token_ids), params, n, adapter.id, f"{job_id}-{i}", tenant=tenant,
                incremental=bool(body.stream),
            )
            streams.append(engine.submit(request))
    except BaseException as exc:
        for stream in streams:  # all prompts or none
            stream.abort()
        if isinstance(exc, AdapterNotFoundError):  # deleted since we looked: name the field the client used
            raise model_not_found(engine, exc.adapter_id, adapter.param) from exc
        raise
    choices = [ChoiceState(p * n + i, prompt.echo) for p, prompt in enumerate(prompts) for i in range(n)]
    return GenerationJob(
        id=job_id,
        model=adapter.id or engine.model_name,
        n=n,
        streams=streams,
        choices=choices,
        include_usage=body.include_usage,
        want_logprobs=params.logprobs is not None,
    )


async def collect_choices(job: GenerationJob) -> list[ChoiceState]:
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
