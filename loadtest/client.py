"""One streamed request to an OpenAI-compatible server, timed from the client's side.

Timings use `time.perf_counter()` at the moment each server-sent event is parsed:
- TTFT: from just before the request is sent to the first chunk with non-empty text;
- ITL: one sample per later chunk with non-empty text (a chunk carrying several tokens is one sample,
  as in `vllm bench serve`);
- E2EL: to the end of the stream (`data: [DONE]` or the connection closing after it);
- output tokens: `usage.completion_tokens` from the final chunk when the server sends it (we ask with
  `stream_options.include_usage`), else the number of non-empty chunks.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

from loadtest.workload import RequestSpec

Endpoint = Literal["completions", "chat"]
AdapterField = Literal["model", "adapter_id"]


@dataclass
class RequestResult:
    """Everything measured about one request. Times are seconds; `start` is relative to the run's t0."""

    index: int
    adapter: str | None
    input_len: int | None  # what the workload asked for
    max_tokens: int
    start: float = 0.0
    finish: float = 0.0  # when the outcome was known, success or not (relative to t0)
    success: bool = False
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2el: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from the server's usage, when it reports it
    tokens_from_usage: bool = False
    error_kind: str | None = None
    error: str | None = None
    status: int | None = None
    warmup: bool = False
    served_by: str | None = None  # the `served_by_header` of the answer: which replica behind a router served it

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (E2EL - TTFT) / (output tokens - 1)."""
        if not self.success or self.ttft is None or self.e2el is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tpot"] = self.tpot
        return data


@dataclass(frozen=True)
class ClientConfig:
    url: str  # server root, e.g. http://127.0.0.1:8000
    base_model: str  # the base model's id, sent as `model` for base requests
    endpoint: Endpoint = "completions"
    adapter_field: AdapterField = "model"  # how an adapter is named: `model` (vLLM, lorahive) or `adapter_id`
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    # The response header that names the replica which answered (lorahive serve-ray's; another router's works too).
    served_by_header: str = "x-lorahive-replica"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.base_model,
            "max_tokens": spec.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if spec.adapter is not None:
            if self.adapter_field == "model":
                body["model"] = spec.adapter
            else:
                body["adapter_id"] = spec.adapter
        if self.endpoint == "chat":
            # Chat has no token-id prompts: a token list is sent as the characters it stands for.
            text = spec.prompt if isinstance(spec.prompt, str) else "".join(chr(t) for t in spec.prompt)
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = spec.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM's and lorahive's extension: generate exactly max_tokens
        body.update(self.extra_body)
        return body


def make_http_client(timeout_s: float, max_connections: int | None = None) -> httpx.AsyncClient:
    """One pooled client per run. httpx caps a pool at 100 connections by default, which would
    silently cap concurrency; the default here is no cap."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    return httpx.AsyncClient(timeout=timeout, limits=limits)


async def send_request(
    http: httpx.AsyncClient, config: ClientConfig, spec: RequestSpec, t0: float
) -> RequestResult:
    """Sends `spec`, reads its stream to the end, and returns what was measured. Never raises for a
    failure of the server or the network: those are results too, classified by `error_kind`."""
    result = await _send(http, config, spec, t0)
    result.finish = time.perf_counter() - t0
    return result


async def _send(http: httpx.AsyncClient, config: ClientConfig, spec: RequestSpec, t0: float) -> RequestResult:
    result = RequestResult(spec.index, spec.adapter, spec.input_len, spec.max_tokens)
    payload = config.payload(spec)
    chunks = 0
    last: float | None = None
    start = time.perf_counter()
    result.start = start - t0
    try:
        async with http.stream("POST", config.url + config.path, json=payload, headers=config.headers()) as response:
            result.status = response.status_code
            result.served_by = response.headers.get(config.served_by_header)
            if response.status_code != 200:
                body = await response.aread()
                return _fail(result, f"http_{response.status_code}", _error_message(body))
            done = False
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    return _fail(result, "protocol", f"a server-sent event that is not JSON: {data[:200]!r}")
                if not isinstance(chunk, dict):
                    return _fail(result, "protocol", f"a server-sent event that is not an object: {data[:200]!r}")
                if chunk.get("error"):  # an in-band error after the 200 went out
                    return _fail(result, "stream_error", _error_message(json.dumps(chunk).encode()))
                if _chunk_text(chunk, config.endpoint):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    if isinstance(usage.get("completion_tokens"), int):
                        result.output_tokens = usage["completion_tokens"]
                        result.tokens_from_usage = True
                    if isinstance(usage.get("prompt_tokens"), int):
                        result.prompt_tokens = usage["prompt_tokens"]
            end = time.perf_counter()
            if not done:
                return _fail(result, "incomplete", "the stream ended without data: [DONE]")
    except httpx.TimeoutException as exc:
        return _fail(result, "timeout", f"{type(exc).__name__}: {exc}")
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        return _fail(result, "connection", f"{type(exc).__name__}: {exc}")
    except httpx.HTTPError as exc:
        return _fail(result, "http_client", f"{type(exc).__name__}: {exc}")
    result.e2el = end - start
    if not result.tokens_from_usage:
        result.output_tokens = chunks
    result.success = True
    return result


def _chunk_text(chunk: dict[str, Any], endpoint: Endpoint) -> str:
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    if endpoint == "chat":
        delta = choices[0].get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content") or ""
    else:
        text = choices[0].get("text") or ""
    return text if isinstance(text, str) else ""


def _fail(result: RequestResult, kind: str, message: str) -> RequestResult:
    result.success = False
    result.error_kind = kind
    result.error = message[:500]
    return result


def _error_message(body: bytes) -> str:
    """OpenAI's `{"error": {"message": ...}}` when the server sends it, else the start of the body."""
    text = body.decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except (json.JSONDecodeError, AttributeError):
        pass
    return text[:500] or "(empty body)"
