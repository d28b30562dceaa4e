"""A deterministic stand-in for `server.engine.Engine`, for testing the HTTP layer without a model.

`FakeTokenizer` has one token per character (id = `ord(c)`) plus BOS/EOS ids just past Unicode, and the
same method names as `server.tokenizer.Tokenizer`. `FakeEngine.submit` records every
`GenerationRequest` and returns a `FakeStream` whose choice `i` writes `text` rotated left by `i`
(choice 0: "abcd...", choice 1: "bcde..."), one character per token, honouring `max_tokens`
("length"), stop strings ("stop", with the engine's hold-back of a possible stop-string prefix), an
EOS after `eos_after` tokens unless `ignore_eos`, `logprobs`, and an optional delay per step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.requests import (
    AdapterNotFoundError,
    AdapterStatus,
    ChoiceDelta,
    FinishReason,
    GenerationRequest,
    RequestError,
    TokenLogprob,
)
from server.tokenizer import ChatTemplateError

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE_ERROR_TRIGGER = "<<break the template>>"


class FakeTokenizer:
    BOS = 0x110000
    EOS = 0x110001
    vocab_size = 0x110002
    max_input_bytes_per_token = 4  # one character per token
    eos_token_ids = (EOS,)
    _SPECIAL = {BOS: "<s>", EOS: "</s>"}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.BOS] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(
            ("" if skip_special_tokens else self._SPECIAL[i]) if i in self._SPECIAL else chr(i) for i in ids
        )

    def token_text(self, token_id: int) -> str:
        return self._SPECIAL.get(token_id) or chr(token_id)

    def token_bytes(self, token_id: int) -> list[int]:
        return list(self.token_text(token_id).encode("utf-8", "surrogatepass"))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if any(TEMPLATE_ERROR_TRIGGER in m["content"] for m in messages):
            raise ChatTemplateError("This conversation cannot be rendered by the chat template.")
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


def choice_text(text: str, choice: int, length: int) -> str:
    """What choice `choice` writes in its first `length` tokens."""
    rotated = text[choice % len(text) :] + text[: choice % len(text)]
    return (rotated * (length // len(rotated) + 1))[:length]


@dataclass
class _Choice:
    index: int
    generated: str = ""
    sent: int = 0  # characters of `generated` already delivered
    tokens: int = 0
    done: bool = False


class FakeStream:
    def __init__(self, engine: FakeEngine, request: GenerationRequest, delay: float):
        self.request = request
        self.request_id = request.request_id
        self.prompt_tokens = len(request.prompt_token_ids)
        self.completion_tokens = 0
        self.abort_calls = 0
        self.aborted = threading.Event()  # set from the server's thread, awaited from the test's
        self.finished = False
        self._engine = engine
        self._delay = delay
        self._iterator = self._run()

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        return self._iterator

    def abort(self) -> None:
        self.abort_calls += 1
        self.aborted.set()

    async def _run(self) -> AsyncIterator[ChoiceDelta]:
        choices = [_Choice(i) for i in range(self.request.n)]
        step = 0
        while not all(c.done for c in choices):
            await asyncio.sleep(self._delay)
            if self.aborted.is_set():
                return
            step += 1
            if self._engine.fail_after is not None and step > self._engine.fail_after:
                raise RuntimeError("fake engine failure")
            for choice in choices:
                if not choice.done:
                    yield self._advance(choice)
        self.finished = True

    def _advance(self, choice: _Choice) -> ChoiceDelta:
        params = self.request.params
        engine = self._engine
        eos = engine.eos_after is not None and choice.tokens == engine.eos_after and not params.ignore_eos
        token = (
            FakeTokenizer.EOS if eos else ord(choice_text(engine.text, choice.index, choice.tokens + 1)[-1])
        )
        choice.tokens += 1
        self.completion_tokens += 1
        finish: FinishReason | None = None
        if eos:
            finish = "stop"
        else:
            choice.generated += chr(token)
        visible = len(choice.generated)
        hits = [(choice.generated.find(s), s) for s in params.stop if s in choice.generated]
        if finish is None and hits:
            position, stop = min(hits)
            visible = position + (len(stop) if params.include_stop_str_in_output else 0)
            finish = "stop"
        elif finish is None and choice.tokens >= params.max_tokens:
            finish = "length"
        elif finish is None:
            # Hold back the longest tail that could still grow into a stop string.
            held = max(
                (k for s in params.stop for k in range(1, len(s)) if choice.generated.endswith(s[:k])),
                default=0,
            )
            visible = len(choice.generated) - held
        text = choice.generated[choice.sent : max(visible, choice.sent)]
        choice.sent = max(visible, choice.sent)
        choice.done = finish is not None
        logprobs = None
        if params.logprobs is not None:
            logprob = -0.25 - 0.01 * choice.tokens
            top = tuple((token if r == 0 else ord("A") + r, logprob - r) for r in range(params.logprobs))
            logprobs = [TokenLogprob(token, logprob, top)]
        return ChoiceDelta(choice.index, text, [token], logprobs, finish)


@dataclass
class FakeEngine:
    model_name: str = "fake-base"
    max_model_len: int = 128
    adapters: list[str] = field(default_factory=lambda: ["alpha", "beta"])
    text: str = ALPHABET
    eos_after: int | None = None  # emit EOS as token number eos_after + 1
    delay: float = 0.0  # seconds before each step
    delay_for: Callable[[GenerationRequest], float] | None = None  # per-request delay, overrides `delay`
    fail_after: int | None = None  # the stream raises after this many steps
    submit_error: Exception | None = None  # raised by submit
    model_description: str = "fake engine for API tests (deterministic text, not a model)"
    base_config: dict[str, Any] | None = None  # not a model: its card publishes no dims
    created: int = 1_700_000_000
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    requests: list[GenerationRequest] = field(default_factory=list)
    streams: list[FakeStream] = field(default_factory=list)

    def adapter_ids(self) -> list[str]:
        return list(self.adapters)

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self.adapters

    def adapter_status(self, adapter_id: str) -> tuple[AdapterStatus, str | None] | None:
        return ("ready", None) if adapter_id in self.adapters else None

    def submit(self, request: GenerationRequest) -> FakeStream:
        if self.submit_error is not None:
            raise self.submit_error
        if request.adapter_id is not None and request.adapter_id not in self.adapters:
            raise AdapterNotFoundError(request.adapter_id)
        if not request.prompt_token_ids:
            raise RequestError("The prompt is empty.", param="prompt")
        self.requests.append(request)
        delay = self.delay_for(request) if self.delay_for is not None else self.delay
        stream = FakeStream(self, request, delay)
        self.streams.append(stream)
        return stream
