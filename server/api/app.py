"""`build_app(engine, settings)`: the FastAPI application around one engine."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api.adapter_routes import router as adapter_router
from server.api.auth import Authentication, KeyRing, load_api_keys
from server.api.body_limit import BodyLimit, BodySizeLimit, is_adapter_upload
from server.api.body_timeout import BodyTimeout
from server.api.dependencies import AdapterTiers, EngineAPI
from server.api.errors import install_error_handlers
from server.api.lifecycle_routes import DrainGate, Lifecycle
from server.api.lifecycle_routes import router as lifecycle_router
from server.api.metrics_routes import HTTPMetrics
from server.api.metrics_routes import router as metrics_router
from server.api.openai_routes import EVENT_STREAMS, router
from server.api.openapi import Guards, install_openapi
from server.api.request_limits import RequestLimits, flag
from server.api.tenant_concurrency import TenantConcurrencyLimit, UploadConcurrencyLimit
from server.api.tenant_quotas import TenantQuotas
from server.api.tokenization_pool import TokenizationPool
from server.config import Settings
from server.metrics import Metrics
from server.torch_threads import single_threaded_executor

MULTIPART_OVERHEAD_BYTES = 2**20  # form boundaries, headers and the config file beside the weights
ROUTE_EXECUTOR_WORKERS = min(32, (os.cpu_count() or 1) + 4)  # asyncio's own default size


@asynccontextmanager
async def single_threaded_route_executor(app: FastAPI) -> AsyncIterator[None]:
    """Routes hand blocking work (unpacking and parsing uploads, store writes) to `asyncio.to_thread`, the loop's
    default executor: its threads run torch with one thread, leaving the cores to the engine thread."""
    asyncio.get_running_loop().set_default_executor(single_threaded_executor(ROUTE_EXECUTOR_WORKERS,
                                                                             "lorahive-route"))
    yield


def build_app(engine: EngineAPI, settings: Settings | None = None, keys: KeyRing | None = None) -> FastAPI:
    """The HTTP face of `engine`. The engine lives on `app.state` and reaches routes through the
    `get_engine` dependency, so one process can host several apps (tests do) without globals.

    `settings` gives the limits (default: `Settings()`'s); `keys` the accepted API keys, read from
    `settings.api_keys` when not given (no key file: the server runs open)."""
    settings = settings or Settings()
    keys = keys if keys is not None else load_api_keys(settings.api_keys)
    app = FastAPI(title="lorahive", summary="Multi-tenant LoRA inference server (OpenAI-compatible API)",
                  lifespan=single_threaded_route_executor)
    app.state.engine = engine
    app.state.lifecycle = Lifecycle()  # draining after SIGTERM: server/draining_server.py flips it
    app.state.request_limits = RequestLimits.from_settings(
        settings, engine.tokenizer.max_input_bytes_per_token, engine.max_model_len
    )
    app.state.tokenization_pool = TokenizationPool.from_settings(settings)
    app.state.tenant_quotas = TenantQuotas.from_settings(settings)
    # The engine's metrics (request timing, adapter tiers); an engine without any (a test double) gets HTTP ones.
    app.state.metrics = engine.metrics if isinstance(engine, AdapterTiers) else Metrics()
    install_error_handlers(app)
    app.include_router(lifecycle_router)
    app.include_router(router)
    app.include_router(adapter_router)
    app.include_router(metrics_router)
    # Middleware added last runs first: metrics, the drain gate, the body deadline, authentication, then the
    # per-tenant and size limits.
    upload_limit = BodyLimit(settings.max_adapter_bytes + MULTIPART_OVERHEAD_BYTES, flag("max_adapter_bytes"))
    json_limit = BodyLimit(settings.max_request_bytes, flag("max_request_bytes"))
    app.add_middleware(BodySizeLimit, limit_for=lambda scope: upload_limit if is_adapter_upload(scope) else json_limit)
    app.add_middleware(UploadConcurrencyLimit, per_tenant=settings.max_concurrent_uploads_per_tenant,
                       in_all=settings.max_concurrent_uploads, is_upload=is_adapter_upload)
    if settings.max_concurrent_requests_per_tenant is not None:
        app.add_middleware(TenantConcurrencyLimit, limit=settings.max_concurrent_requests_per_tenant)
    metrics_key = settings.metrics_api_key.get_secret_value() if settings.metrics_api_key is not None else None
    app.add_middleware(Authentication, keys=keys, metrics_key=metrics_key, metrics_public=settings.metrics_public)
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout, min_rate=settings.body_min_rate)
    # While draining, new requests get 503 before anything else runs; in flight ones are counted till they end.
    app.add_middleware(DrainGate, lifecycle=app.state.lifecycle, metrics=app.state.metrics)
    app.add_middleware(HTTPMetrics, metrics=app.state.metrics)  # outermost: sees every status
    guards = Guards(keys_required=not keys.is_open, concurrency_limited=settings.max_concurrent_requests_per_tenant
                    is not None)
    install_openapi(app, guards, EVENT_STREAMS)
    return app
