"""`build_app(engine)`: the FastAPI application around one engine."""

from __future__ import annotations

from fastapi import FastAPI

from server.api.adapter_routes import router as adapter_router
from server.api.body_limit import BodySizeLimit
from server.api.errors import install_error_handlers
from server.api.metrics_routes import HTTPMetrics
from server.api.metrics_routes import router as metrics_router
from server.api.openai_routes import EngineAPI, router
from server.metrics import Metrics

MAX_JSON_BODY_BYTES = 32 * 2**20  # generous for prompts; uploads have their own limit
MULTIPART_OVERHEAD_BYTES = 2**20  # form boundaries, headers and the config file beside the weights


def build_app(engine: EngineAPI, max_adapter_bytes: int = 512 * 2**20) -> FastAPI:
    """The HTTP face of `engine`. The engine lives on `app.state` and reaches routes through the
    `get_engine` dependency, so one process can host several apps (tests do) without globals."""
    app = FastAPI(title="lorahive", summary="Multi-tenant LoRA inference server (OpenAI-compatible API)")
    app.state.engine = engine
    # The engine's metrics (request timing, adapter tiers); an engine without any (a test double) gets HTTP ones.
    app.state.metrics = getattr(engine, "metrics", None) or Metrics()
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(adapter_router)
    app.include_router(metrics_router)
    upload_limit = max_adapter_bytes + MULTIPART_OVERHEAD_BYTES
    app.add_middleware(
        BodySizeLimit,
        limit_for=lambda path: upload_limit if path.startswith("/v1/adapters") else MAX_JSON_BODY_BYTES,
    )
    app.add_middleware(HTTPMetrics, metrics=app.state.metrics)  # outermost: sees every status
    return app
