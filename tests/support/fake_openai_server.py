"""A small OpenAI-compatible server with known, injected timings, for testing the load-test harness.

Every streamed response sends its first token `ttft_s` after the request arrived and one more every
`itl_s`, on an absolute schedule (token k at arrival + ttft + k * itl), so a client's measured TTFT and
inter-token latency can be checked against the injected values. It also implements the adapter upload
contract (`POST /v1/adapters` multipart with `id`, `adapter_config`, `adapter_model`; 409 on a
duplicate id; `DELETE /v1/adapters/{id}`; `GET /v1/adapters`) and validates what it receives: the PEFT
config and the safetensors header, tensor names and shapes against its base model's dims.

    python -m tests.support.fake_openai_server --port 8001 --ttft-ms 50 --itl-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TENSOR_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"\.lora_([AB])\.weight"
)
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4}
# The default dims are the lorahive demo model's.
DEMO_DIMS = {"hidden_size": 256, "intermediate_size": 688, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4,
             "head_dim": 32}


@dataclass
class FakeConfig:
    base_model: str = "fake-base"
    adapters: list[str] = field(default_factory=list)
    ttft_s: float = 0.05
    itl_s: float = 0.01
    dims: dict[str, int] | None = field(default_factory=lambda: dict(DEMO_DIMS))  # None: the card has none
    send_usage: bool = True  # honour stream_options.include_usage
    upload_api: bool = True  # False: the adapter routes do not exist (404), like a plain OpenAI server
    stream_error_adapters: set[str] = field(default_factory=set)  # these fail in-band after 2 tokens
    tokens_per_chunk: int = 1  # >1: each chunk carries several tokens (usage counts them all)


@dataclass
class FakeState:
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> upload metadata (or {} if preset)
    requests: list[dict[str, Any]] = field(default_factory=list)  # every generation request body received
    uploads: int = 0
    deletes: int = 0


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def build_fake_app(config: FakeConfig | None = None) -> FastAPI:
    config = config or FakeConfig()
    state = FakeState(adapters={a: {} for a in config.adapters})
    app = FastAPI()
    app.state.fake = state
    app.state.config = config

    def card(model_id: str, parent: str | None) -> dict[str, Any]:
        data: dict[str, Any] = {"id": model_id, "object": "model", "created": 0, "owned_by": "fake",
                                "root": config.base_model, "parent": parent}
        return data

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [card(config.base_model, None)] + [card(a, config.base_model) for a in state.adapters]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> Response:
        if model_id == config.base_model:
            data = card(model_id, None)
            if config.dims is not None:
                data["dims"] = config.dims
            return JSONResponse(data)
        if model_id in state.adapters:
            return JSONResponse(card(model_id, config.base_model))
        return _error(404, f"The model '{model_id}' does not exist", "model_not_found", "model")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _generate(request, chat=True)

    async def _generate(request: Request, chat: bool) -> Response:
        arrived = time.perf_counter()
        body = await request.json()
        state.requests.append(body)
        adapter = body.get("adapter_id") or body.get("model") or config.base_model
        if adapter != config.base_model and adapter not in state.adapters:
            return _error(404, f"The model '{adapter}' does not exist", "model_not_found", "model")
        if not body.get("stream"):
            return _error(400, "this fake server only streams", param="stream")
        max_tokens = int(body.get("max_tokens") or 16)
        usage = config.send_usage and bool((body.get("stream_options") or {}).get("include_usage"))
        fail_in_band = adapter in config.stream_error_adapters
        return StreamingResponse(_events(arrived, max_tokens, chat, usage, fail_in_band),
                                 media_type="text/event-stream")

    async def _events(arrived: float, max_tokens: int, chat: bool, usage: bool, fail: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        if chat:  # OpenAI opens a chat stream with an empty assistant delta: not a token
            yield _sse({"object": obj, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        per = max(config.tokens_per_chunk, 1)
        chunks = (max_tokens + per - 1) // per
        for k in range(chunks):
            due = arrived + config.ttft_s + k * config.itl_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if fail and k == 2:
                yield _sse({"error": {"message": "injected failure", "type": "server_error", "code": None}})
                yield "data: [DONE]\n\n"
                return
            text = "".join(f" t{i}" for i in range(k * per, min((k + 1) * per, max_tokens)))
            last = k == chunks - 1
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": None} if chat else
                      {"index": 0, "text": text, "finish_reason": "length" if last else None})
            yield _sse({"object": obj, "choices": [choice]})
        if chat:
            yield _sse({"object": obj, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        if usage:
            yield _sse({"object": obj, "choices": [],
                        "usage": {"prompt_tokens": 7, "completion_tokens": max_tokens, "total_tokens": 7 + max_tokens}})
        yield "data: [DONE]\n\n"

    if config.upload_api:
        @app.post("/v1/adapters")
        async def upload(request: Request) -> Response:
            try:
                fields = _multipart(request.headers.get("content-type", ""), await request.body())
            except ValueError as exc:
                return _error(400, f"bad multipart body: {exc}")
            adapter_id = fields.get("id", (None, b""))[1].decode()
            if not ID_PATTERN.match(adapter_id):
                return _error(400, f"bad adapter id {adapter_id!r}", param="id")
            for name in ("adapter_config", "adapter_model"):
                if name not in fields or fields[name][0] is None:
                    return _error(400, f"missing file field '{name}'", param=name)
            if adapter_id in state.adapters:
                return _error(409, f"adapter '{adapter_id}' exists", "adapter_exists", "id")
            try:
                meta = _validate_adapter(fields["adapter_config"][1], fields["adapter_model"][1], config.dims)
            except ValueError as exc:
                return _error(400, str(exc))
            state.adapters[adapter_id] = meta
            state.uploads += 1
            return JSONResponse({"id": adapter_id, "object": "adapter", **meta}, 201)

        @app.get("/v1/adapters")
        async def list_adapters() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": a, "object": "adapter", **m} for a, m in state.adapters.items()]}

        @app.delete("/v1/adapters/{adapter_id}")
        async def delete(adapter_id: str) -> Response:
            if state.adapters.pop(adapter_id, None) is None:
                return _error(404, f"adapter '{adapter_id}' does not exist", "model_not_found")
            state.deletes += 1
            return Response(status_code=204)

    return app


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename or None, bytes): a strict little multipart/form-data parser (no dependency)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/form-data") or not match:
        raise ValueError(f"expected multipart/form-data with a boundary, got {content_type!r}")
    delimiter = b"--" + match.group(1).encode()
    parts = body.split(delimiter)
    if len(parts) < 3 or not parts[-1].startswith(b"--"):
        raise ValueError("no closing boundary")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in parts[1:-1]:
        if not part.startswith(b"\r\n") or not part.endswith(b"\r\n"):
            raise ValueError("a part is not framed by CRLF")
        head, sep, content = part[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part has no header/body separator")
        disposition = next((line for line in head.decode().split("\r\n")
                            if line.lower().startswith("content-disposition:")), "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        if not name:
            raise ValueError("a part has no name")
        fields[name.group(1)] = (filename.group(1) if filename else None, content)
    return fields


def _validate_adapter(config_bytes: bytes, weights: bytes, dims: dict[str, int] | None) -> dict[str, Any]:
    config = json.loads(config_bytes)
    if config.get("peft_type") != "LORA":
        raise ValueError("peft_type must be LORA")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError("r must be a positive integer")
    if not isinstance(config.get("lora_alpha"), int | float):
        raise ValueError("lora_alpha must be a number")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise ValueError("target_modules must be a non-empty list")
    if len(weights) < 8:
        raise ValueError("adapter_model is too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", weights[:8])
    if 8 + header_len > len(weights):
        raise ValueError("the safetensors header runs past the end of the file")
    header = json.loads(weights[8 : 8 + header_len])
    header.pop("__metadata__", None)
    data_len = len(weights) - 8 - header_len
    covered = 0
    module_dims = _module_dims(dims) if dims else None
    layers = set()
    for name, info in header.items():
        match = TENSOR_NAME.fullmatch(name)
        if not match:
            raise ValueError(f"unexpected tensor name {name}")
        layer, _, module, kind = match.groups()
        if module not in targets:
            raise ValueError(f"tensor {name} adapts {module}, not in target_modules")
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {name}: dtype {dtype}")
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * DTYPE_BYTES[dtype] or not 0 <= begin <= end <= data_len:
            raise ValueError(f"tensor {name}: data offsets do not match its shape")
        covered += end - begin
        if module_dims is not None:
            d_in, d_out = module_dims[module]
            expected = [rank, d_in] if kind == "A" else [d_out, rank]
            if shape != expected:
                raise ValueError(f"tensor {name} has shape {shape}, expected {expected}")
            if int(layer) >= dims["num_layers"]:  # type: ignore[index]
                raise ValueError(f"tensor {name}: the base model has {dims['num_layers']} layers")  # type: ignore[index]
        layers.add(int(layer))
    if covered != data_len:
        raise ValueError("the tensors do not cover the data section exactly")
    return {"rank": rank, "target_modules": targets, "num_tensors": len(header), "bytes": len(weights),
            "layers": len(layers)}


def _module_dims(d: dict[str, int]) -> dict[str, tuple[int, int]]:
    q, kv = d["num_heads"] * d["head_dim"], d["num_kv_heads"] * d["head_dim"]
    h, i = d["hidden_size"], d["intermediate_size"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--adapters", type=int, default=0, help="adapters a0..aN-1 served from the start")
    args = parser.parse_args()
    config = FakeConfig(adapters=[f"a{i}" for i in range(args.adapters)], ttft_s=args.ttft_ms / 1000,
                        itl_s=args.itl_ms / 1000)
    uvicorn.run(build_fake_app(config), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
