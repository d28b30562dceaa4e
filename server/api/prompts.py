"""From a request body to prompt tokens: the completion prompts (text or token ids, one or a batch), the chat
prompt (through the model's chat template), token id checks, and fitting `max_tokens` into the context.

The routes run `completion_prompts` and `chat_prompt` on the tokenization pool (server/api/tokenization_pool.py):
tokenizing a long prompt must not stall the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.api.dependencies import TokenizerAPI
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.requests import RequestError
from server.tokenizer import ChatTemplateError


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    echo: str = ""  # text shown ahead of the completion when the client asked for `echo`


def prompt_batch(body: CompletionRequest) -> list[str] | list[list[int]]:
    raw = body.prompt
    # One prompt (a string or one token list) or a batch of them; the validator has checked the shapes.
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw[0], int):
        return [raw]  # type: ignore[list-item]
    return raw  # type: ignore[return-value]


def completion_prompts(tokenizer: TokenizerAPI, body: CompletionRequest) -> list[Prompt]:
    prompts = []
    for item in prompt_batch(body):
        if isinstance(item, str):
            prompts.append(Prompt(tokenizer.encode(item), item if body.echo else ""))
        else:
            check_token_ids(item, tokenizer.vocab_size, "prompt")
            prompts.append(Prompt(list(item), tokenizer.decode(item) if body.echo else ""))
    return prompts


def chat_prompt(tokenizer: TokenizerAPI, body: ChatCompletionRequest) -> Prompt:
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
    return Prompt(tokenizer.encode(text, add_special_tokens=False))


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(
            f"Token id {bad} in '{param}' is outside the vocabulary [0, {vocab_size}).", param=param,
            code="invalid_value",
        )


def fit_context(
    max_model_len: int,
    prompts: list[Prompt],
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
