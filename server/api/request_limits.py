"""The operator's limits on one generation request: prompt tokens, `max_tokens`, `n`, stop strings.

Each refusal is a 400 whose `param` is the request field and whose message names the server flag, so a
client learns both what to change and that the limit is this server's, not OpenAI's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from server.api.protocol import BaseGenerationRequest
from server.config import Settings
from server.requests import RequestError

LIMIT_EXCEEDED = "limit_exceeded"


def flag(setting: str) -> str:
    """The command-line flag of a `Settings` field (the CLI generates them the same way)."""
    return "--" + setting.replace("_", "-")


def _refuse(what: str, value: int, setting: str, limit: int, param: str) -> RequestError:
    return RequestError(
        f"{what} is {value}, which exceeds this server's {flag(setting)} of {limit}.", param=param, code=LIMIT_EXCEEDED
    )


def utf8_size(text: str) -> int:
    """`text`'s size in UTF-8, without copying an ASCII text (a lone surrogate counts its three bytes)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_tokens: int | None
    max_tokens_limit: int | None
    max_n: int
    max_stop_strings: int
    # Of the served model: the most input bytes one token stands for (None: no bound, see
    # Tokenizer.max_input_bytes_per_token) and the context length, for refusing prompts by size.
    bytes_per_token: int | None = None
    max_model_len: int | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, bytes_per_token: int | None = None, max_model_len: int | None = None
    ) -> RequestLimits:
        return cls(settings.max_prompt_tokens, settings.max_tokens_limit, settings.max_n, settings.max_stop_strings,
                   bytes_per_token, max_model_len)

    def check_shape(self, body: BaseGenerationRequest) -> None:
        """The limits the request body alone decides (checked before any tokenizing)."""
        if body.num_choices > self.max_n:
            raise _refuse("'n'", body.num_choices, "max_n", self.max_n, "n")
        stops = len(body.stop or ())
        if stops > self.max_stop_strings:
            raise _refuse("The number of 'stop' strings", stops, "max_stop_strings", self.max_stop_strings, "stop")

    def check_prompt_bytes(self, sizes: list[int], param: str) -> None:
        """Refuse, before tokenizing, prompts whose UTF-8 sizes (`sizes`, one per text prompt) alone prove them
        too long: a prompt of more than n * bytes_per_token bytes has more than n tokens. Tokenizing a 20 MB
        prompt only to count its tokens would hold a thread for seconds and gigabytes of memory."""
        if self.bytes_per_token is None or not sizes:
            return
        total, longest = sum(sizes), max(sizes)
        if self.max_prompt_tokens is not None and total > self.max_prompt_tokens * self.bytes_per_token:
            raise RequestError(
                f"The prompt is {total} bytes, more than {self.max_prompt_tokens} tokens of this model can hold (no "
                f"token stands for more than {self.bytes_per_token} bytes), so it exceeds this server's "
                f"{flag('max_prompt_tokens')} of {self.max_prompt_tokens}; shorten it.",
                param=param,
                code=LIMIT_EXCEEDED,
            )
        if self.max_model_len is not None and longest > (self.max_model_len - 1) * self.bytes_per_token:
            raise RequestError(
                f"The prompt is {longest} bytes, more than {self.max_model_len - 1} tokens of this model can hold (no "
                f"token stands for more than {self.bytes_per_token} bytes), so it does not fit this model's maximum "
                f"context length of {self.max_model_len} tokens with room for the completion; shorten it.",
                param=param,
                code="context_length_exceeded",
            )

    def check_prompt_tokens(self, tokens: int, param: str) -> None:
        """`tokens`: the request's prompt tokens, all prompts of a batch together."""
        if self.max_prompt_tokens is not None and tokens > self.max_prompt_tokens:
            raise _refuse("The prompt length in tokens", tokens, "max_prompt_tokens", self.max_prompt_tokens, param)

    def check_max_tokens(self, requested: int | None, param: str) -> None:
        """A `max_tokens` the client asked for (None: it did not ask)."""
        if requested is not None and self.max_tokens_limit is not None and requested > self.max_tokens_limit:
            raise _refuse(f"'{param}'", requested, "max_tokens_limit", self.max_tokens_limit, param)

    def cap_max_tokens(self, max_tokens: int) -> int:
        """A default `max_tokens` (the client left it out) brought within the limit instead of refused."""
        return max_tokens if self.max_tokens_limit is None else min(max_tokens, self.max_tokens_limit)


def get_request_limits(request: Request) -> RequestLimits:
    return request.app.state.request_limits


RequestLimitsDep = Annotated[RequestLimits, Depends(get_request_limits)]
