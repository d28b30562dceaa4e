"""`build_app(engine)`: the FastAPI application around one engine."""

from __future__ import annotations

from fastapi import FastAPI

from server.api.errors import install_error_handlers
from server.api.openai_routes import EngineAPI, router


def build_app(engine: EngineAPI) -> FastAPI:
    """The HTTP face of `engine`. The engine lives on `app.state` and reaches routes through the
    `get_engine` dependency, so one process can host several apps (tests do) without globals."""
    app = FastAPI(title="lorahive", summary="Multi-tenant LoRA inference server (OpenAI-compatible API)")
    app.state.engine = engine
    install_error_handlers(app)
    app.include_router(router)
    return app
