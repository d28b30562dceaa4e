"""The server's lifecycle over HTTP: `/health` (the process answers), `/ready` (it can serve), and the gate
that turns new requests away with 503 while the server drains after SIGTERM (server/draining_server.py).
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import request_error_response
from server.metrics import Metrics
from server.requests import ServerDrainingError

# Answered while draining, and not counted as work to wait for: probes, and the metrics of the drain itself.
UNGATED_PATHS = frozenset({"/health", "/ready", "/metrics"})

router = APIRouter()


class Lifecycle:
    """Whether the server is draining, and how many requests it is still answering (the gated ones).

    Touched only on the event loop's thread (the middleware, the server's tick and its signal handler,
    which Python runs on the main thread between bytecodes), so plain attributes suffice."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0


class ReadinessProbe(Protocol):
    def readiness_problems(self) -> list[str]: ...


@runtime_checkable
class LivenessProbe(Protocol):
    def liveness_problems(self) -> list[str]: ...


class Health(BaseModel):
    status: Literal["ok", "failed"] = "ok"
    reasons: list[str] | None = None  # what the server can never recover from; only when failed


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    reasons: list[str] | None = None  # what stops the server from serving; only when not ready


@router.get("/health", response_model=Health,
            responses={503: {"model": Health, "description": "Failed for good (restart it); `reasons` says why."}})
async def health(request: Request) -> JSONResponse:
    """200 while the process answers HTTP and can serve, now or once busy (a liveness probe must not fail on load);
    503 once it never can again: its model runner's process exited."""
    engine = request.app.state.engine
    reasons = engine.liveness_problems() if isinstance(engine, LivenessProbe) else []
    if reasons:
        return JSONResponse(Health(status="failed", reasons=reasons).model_dump(), status_code=503)
    return JSONResponse(Health().model_dump(exclude_none=True))


@router.get("/ready", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Not ready; `reasons` says why."}})
async def ready(request: Request) -> JSONResponse:
    """200 when the server can take requests: not draining, the engine thread alive and stepping, the
    adapter store readable (the model is loaded before the app exists). Otherwise 503 with the reasons."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    engine: ReadinessProbe = request.app.state.engine
    reasons = []
    if lifecycle.draining:
        reasons.append("the server is draining (SIGTERM): it finishes running requests and takes no new ones")
    reasons += engine.readiness_problems()
    if reasons:
        return JSONResponse(Readiness(status="not_ready", reasons=reasons).model_dump(), status_code=503)
    return JSONResponse(Readiness(status="ready").model_dump(exclude_none=True))


class DrainGate:
    """Counts the requests in flight and, once the server drains, answers every new one with 503
    `server_draining` (and `Connection: close`), except the `UNGATED_PATHS`; a refusal also counts in
    `lorahive_requests_rejected_total{reason="draining"}`."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, metrics: Metrics) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNGATED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            self.metrics.request_rejected("draining")
            error = ServerDrainingError("The server is shutting down and takes no new requests; send this one to "
                                        "another replica or retry once it is back.")
            response = request_error_response(error)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1
