"""lorahive on Ray Serve: N replicas behind one OpenAI-compatible endpoint, each adapter's requests routed to the
replicas that already hold it.

Two deployments (`lorahive serve-ray`, or `application()` for `serve.run`):

* `LorahiveReplica`, N of them: each runs one lorahive server (its own engine, model runner and adapter tiers,
  every flag of `lorahive serve` applying per replica) in the replica's process, and hands the requests it gets
  straight to the server's ASGI app (no socket), streaming the answer back as the app sends it. Its
  `@serve.multiplexed` function records that a request for an adapter succeeded here; from then on Ray Serve
  routes that adapter's requests to this replica (model multiplexing, keyed by the adapter id), until the replica
  has served `adapters_per_replica` newer ones (Ray's LRU, which only stops the preference: lorahive's own tiers
  keep what fits). Ray health-checks it (lorahive's liveness: its model runner alive) and replaces it when it
  fails; shutting it down drains it as SIGTERM drains `lorahive serve`.
* `Router`, the ingress: reads which adapter a generation request names (`adapter_id`, else `model` when it is
  not the base model: what lorahive itself resolves) and hands it to a replica with that id as the multiplexed
  model id; base-model requests and every other route (models, adapter uploads and deletes: the replicas share one
  store) go to whichever replica Ray picks by load. Each answer carries `x-lorahive-replica`, the replica that
  served it; `GET /metrics` answers with every replica's metrics, labelled by replica (`server/ray_metrics.py`).
  A replica that dies before answering is retried once on another for generation; one that dies
  mid-stream ends the stream with an error event, and a request it never answered gets a 503 in OpenAI's shape.

The replicas must share `--store` (a directory every node mounts), so that an adapter uploaded through one is
served by all: lorahive's store is safe for several writers (`adapters_store/store.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable

from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server import ray_metrics
from server.api.errors import SERVER_ERROR, error_response
from server.asgi_call import asgi_answer
from server.config import Settings
from server.draining_server import CUT_GRACE_S
from server.requests import ServerDrainingError
from server.runtime import served_model_name

log = logging.getLogger("lorahive.ray")

REPLICA_HEADER = "x-lorahive-replica"
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# Headers that describe one hop, which the proxying sets again for its own.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade",
                        "proxy-connection", "te", "trailer"})


def adapter_of(path: str, body: bytes, base_model: str) -> str | None:
    """The adapter a generation request names, as lorahive resolves it: `adapter_id`, else `model` unless it is
    the base model. None for the base model, for other routes, and for a body that is not a JSON object (the
    replica answers that one with its 400)."""
    if path not in GENERATION_PATHS:
        return None
    try:
        request = json.loads(body)
    except ValueError:
        return None
    if not isinstance(request, dict):
        return None
    for field in ("adapter_id", "model"):
        value = request.get(field)
        if isinstance(value, str) and value and value != base_model:
            return value
    return None


def _forwarded(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name.lower() not in HOP_BY_HOP]


async def _adapter_served(adapter_id: str) -> str:
    """What Ray's multiplexing "loads": nothing but the id; lorahive loads the adapter itself, into its tiers."""
    return adapter_id


@serve.deployment(health_check_period_s=2, health_check_timeout_s=10)
class LorahiveReplica:
    """One lorahive server (engine, model runner and app) in this replica's process; requests are handed to its
    ASGI app directly, without a socket."""

    def __init__(self, settings: Settings, adapters_per_replica: int):
        from server.api.app import build_app
        from server.api.auth import load_api_keys
        from server.runtime import build_engine

        keys = load_api_keys(settings.api_keys)  # a bad key file stops the replica before the model loads
        self.engine = build_engine(settings)
        self.engine.start()
        self.app = build_app(self.engine, settings, keys)
        self.drain_timeout_s = settings.drain_timeout
        self._lifespan: contextlib.AbstractAsyncContextManager | None = None  # entered on the replica's loop
        self._started = asyncio.Lock()
        self.name = serve.get_replica_context().replica_id.unique_id
        self._stop_posting = threading.Event()
        ray_metrics.start_posting(self.name, self.app.state.metrics.exposition, self._stop_posting)
        # Ray keeps, per replica, the ids its multiplexed function was called with (LRU, bounded) and routes by
        # them. Made here for its bound from the settings; Ray finds such a function among the instance's attributes.
        self.serves = serve.multiplexed(max_num_models_per_replica=adapters_per_replica)(_adapter_served)

    async def forward(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes) -> AsyncIterator[tuple[int, list[tuple[str, str]]] | bytes]:
        """The app's answer to the request: first (status, headers), then the body as it streams."""
        async with self._started:
            if self._lifespan is None:  # the app's startup, on the loop its requests run on
                self._lifespan = self.app.router.lifespan_context(self.app)
                await self._lifespan.__aenter__()
        adapter_id = serve.get_multiplexed_model_id()
        answer = asgi_answer(self.app, method, target, headers, body)
        try:
            status, response_headers = await anext(answer)
            if adapter_id and status < 400:  # a name that is no adapter must not attract its traffic
                await self.serves(adapter_id)
            yield status, [*_forwarded(response_headers), (REPLICA_HEADER, self.name)]
            async for chunk in answer:
                yield chunk
        finally:  # also when the caller left early: the app then sees its client disconnect now
            await answer.aclose()

    def check_health(self) -> None:
        problems = self.engine.liveness_problems()
        if problems:
            raise RuntimeError("; ".join(problems))

    async def __del__(self) -> None:
        """Drain as `lorahive serve` does on SIGTERM: new requests get 503, running ones `drain_timeout` seconds to
        finish, then those left are cut with an error and the engine stops. Ray awaits it on the replica's event
        loop, the loop those requests run on, when it shuts the replica down."""
        self._stop_posting.set()
        lifecycle = self.app.state.lifecycle
        lifecycle.draining = True
        deadline = time.monotonic() + self.drain_timeout_s
        while lifecycle.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if lifecycle.in_flight:
            self.engine.abort_all(ServerDrainingError(
                f"The replica shut down before this request finished (it had {self.drain_timeout_s:g} s, "
                "--drain-timeout); retry it."))
            await asyncio.sleep(CUT_GRACE_S)  # their clients get the error
        self.engine.shutdown()
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)


@serve.deployment(max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class Router:
    """The ingress: one endpoint in front of the replicas, routing each generation request by its adapter."""

    def __init__(self, replicas: DeploymentHandle, base_model: str):
        self.replicas = replicas
        self.base_model = base_model
        self.metrics_board = ray_metrics.board()

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        adapter_id = adapter_of(path, body, self.base_model)
        target = path + (f"?{request.url.query}" if request.url.query else "")
        headers = _forwarded(request.headers.items())
        attempts = 2 if path in GENERATION_PATHS else 1  # nothing was generated yet: another replica may answer
        for attempt in range(attempts):
            handle = self.replicas.options(stream=True, multiplexed_model_id=adapter_id or "")
            parts: DeploymentResponseGenerator = handle.forward.remote(request.method, target, headers, body)
            try:
                status, response_headers = await parts.__anext__()
                break
            except Exception:  # the replica died, or failed, before answering
                log.warning("a replica failed before answering %s %s (attempt %d of %d)", request.method, path,
                            attempt + 1, attempts, exc_info=True)
        else:
            return error_response(503, "The replica serving this request went away before answering; retry it.",
                                  error_type=SERVER_ERROR, code="replica_unavailable")
        if path == "/metrics" and status == 200:  # that replica let the caller see metrics: show every replica's
            own = b"".join([chunk async for chunk in parts])
            expositions = await self.metrics_board.fresh.remote()
            content = ray_metrics.merged(expositions) if expositions else own  # none posted yet: the one it has
            return Response(content, media_type=CONTENT_TYPE_LATEST)
        streamed = dict(response_headers).get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(_rest(parts, streamed), status_code=status, headers=dict(response_headers))


async def _rest(parts: DeploymentResponseGenerator, streamed: bool) -> AsyncIterator[bytes]:
    try:
        async for chunk in parts:
            yield chunk
    except Exception:
        log.warning("a replica failed in the middle of an answer", exc_info=True)
        if not streamed:
            raise  # the client sees its connection cut: a truncated body is never mistaken for a whole one
        error = error_response(503, "The replica serving this stream went away; retry the request.",
                               error_type=SERVER_ERROR, code="replica_unavailable")
        yield f"data: {error.body.decode()}\n\n".encode()


def application(settings: Settings, replicas: int, adapters_per_replica: int, replica_cpus: float = 1.0,
                replica_gpus: float = 0.0) -> serve.Application:
    """The Ray Serve application: the router in front of `replicas` lorahive replicas with `settings` each, every
    replica reserving `replica_cpus` and `replica_gpus` of its node (Ray places it where they are free)."""
    replica = LorahiveReplica.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        # lorahive queues and refuses (429) fairly per tenant itself: Ray should hand it what it may hold
        max_ongoing_requests=settings.max_num_seqs + settings.max_waiting_requests,
        graceful_shutdown_timeout_s=settings.drain_timeout + 5.0,
    )
    return Router.bind(replica.bind(settings, adapters_per_replica), served_model_name(settings))
