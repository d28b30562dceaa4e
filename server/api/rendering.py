"""The JSON shapes of the two generation endpoints: a renderer builds one endpoint's streamed chunks (as
server-sent events) and its final response from a job's per-choice state (server/api/generation_job.py).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import ClassVar

from pydantic import BaseModel

from server.api.dependencies import TokenizerAPI
from server.api.errors import engine_error_response, internal_error_body, request_error_response
from server.api.generation_job import ChoiceState, GenerationJob
from server.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    UsageInfo,
)
from server.api.streaming import merge_streams
from server.requests import ChoiceDelta, EngineStepError, FinishReason, RequestError, TokenLogprob

log = logging.getLogger("lorahive.api")

# OpenAI's stand-in for "too unlikely to report" (JSON has no -Infinity).
_MIN_LOGPROB = -9999.0


class Renderer(ABC):
    """Builds one endpoint's chunks and final response from the shared per-choice state."""

    ID_PREFIX: ClassVar[str]
    # Completions put the last text and the finish_reason in one chunk; chat sends the finish in its own
    # chunk with an empty delta, as OpenAI does.
    FINISH_WITH_TEXT: ClassVar[bool]

    def __init__(self, job: GenerationJob, tokenizer: TokenizerAPI) -> None:
        self.job = job
        self.tokenizer = tokenizer

    @abstractmethod
    def opening_chunk(self, choice: ChoiceState) -> BaseModel | None: ...

    @abstractmethod
    def chunk(
        self, choice: ChoiceState, text: str, logprobs: list[TokenLogprob], finish: FinishReason | None
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

    def _chunks_for(self, choice: ChoiceState, delta: ChoiceDelta) -> list[BaseModel]:
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


class CompletionRenderer(Renderer):
    ID_PREFIX = "cmpl"
    FINISH_WITH_TEXT = True

    def opening_chunk(self, choice: ChoiceState) -> None:
        return None  # the echoed prompt rides on the first text chunk

    def chunk(
        self, choice: ChoiceState, text: str, logprobs: list[TokenLogprob], finish: FinishReason | None
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

    def _logprobs(self, choice: ChoiceState, logprobs: list[TokenLogprob]) -> CompletionLogprobs | None:
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


class ChatRenderer(Renderer):
    ID_PREFIX = "chatcmpl"
    FINISH_WITH_TEXT = False

    def opening_chunk(self, choice: ChoiceState) -> ChatCompletionChunk:
        return self._envelope(
            [ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))]
        )

    def chunk(
        self, choice: ChoiceState, text: str, logprobs: list[TokenLogprob], finish: FinishReason | None
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
                finish_reason=c.finish_reason or "stop",  # never None: collect_choices checked
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
