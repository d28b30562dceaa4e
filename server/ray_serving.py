"""lorahive on Ray Serve: N replicas behind one OpenAI-compatible endpoint, each adapter's requests routed to the
replicas that already hold it.

Two deployments (`lorahive serve-ray`, or `application()` for `serve.run`):

* `LorahiveReplica`, N of them: each runs one `lorahive serve` (its own engine, model runner and adapter tiers,
  every flag of `lorahive serve` applying per replica) as a child process on a local port, and forwards the
  requests it is handed to it over HTTP, streaming the answer back as it comes. Its `@serve.multiplexed` method
  records that a request for an adapter succeeded here; from then on Ray Serve routes that adapter's requests to
  this replica (model multiplexing, keyed by the adapter id), until the replica has served
  `adapters_per_replica` newer ones (Ray's LRU, which only stops the preference: lorahive's own tiers keep what
  fits). Ray health-checks it (the child must be alive) and replaces it when it dies.
* `Router`, the ingress: reads which adapter a generation request names (`adapter_id`, else `model` when it is
  not the base model: what lorahive itself resolves) and hands it to a replica with that id as the multiplexed
  model id; base-model requests and every other route (models, adapter uploads and deletes: the replicas share one
  store) go to whichever replica Ray picks by load. Each answer carries `x-lorahive-replica`, the replica that
  served it. A replica that dies before answering is retried once on another for generation; one that dies
  mid-stream ends the stream with an error event, and a request it never answered gets a 503 in OpenAI's shape.

The replicas must share `--store` (a directory every node mounts), so that an adapter uploaded through one is
served by all: lorahive's store is safe for several writers (`adapters_store/store.py`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping

import httpx
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.api.errors import SERVER_ERROR, error_response
from server.cli.serve_command import settings_environment
from server.config import Settings
from server.runtime import served_model_name

log = logging.getLogger("lorahive.ray")

REPLICA_HEADER = "x-lorahive-replica"
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# Headers that describe one hop, which the proxying sets again for its own.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade",
                        "proxy-connection", "te", "trailer"})
_PR_SET_PDEATHSIG = 1  # prctl(2)


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


def _forwarded(headers: Mapping[str, str] | httpx.Headers) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers.items() if name.lower() not in HOP_BY_HOP]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when the replica's process dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def _adapter_served(adapter_id: str) -> str:
    """What Ray's multiplexing "loads": nothing but the id; lorahive loads the adapter itself, into its tiers."""
    return adapter_id


@serve.deployment(health_check_period_s=2, health_check_timeout_s=10)
class LorahiveReplica:
    """One `lorahive serve` child on a local port, and the forwarding to it."""

    def __init__(self, environment: dict[str, str], adapters_per_replica: int, ready_timeout_s: float = 600.0):
        port = _free_port()
        child_environment = os.environ | environment | {"LORAHIVE_HOST": "127.0.0.1", "LORAHIVE_PORT": str(port)}
        self.process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=child_environment,
                                        preexec_fn=_die_with_parent)
        self.url = f"http://127.0.0.1:{port}"
        self.drain_timeout_s = float(environment.get("LORAHIVE_DRAIN_TIMEOUT", 30.0))
        self._wait_until_ready(ready_timeout_s)
        self.client = httpx.AsyncClient(base_url=self.url, timeout=None)
        self.name = serve.get_replica_context().replica_id.unique_id
        # Ray keeps, per replica, the ids its multiplexed function was called with (LRU, bounded) and routes by
        # them. Made here for its bound from the settings; Ray finds such a function among the instance's attributes.
        self.serves = serve.multiplexed(max_num_models_per_replica=adapters_per_replica)(_adapter_served)

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lorahive serve exited with status {self.process.returncode} before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=5.0).status_code == 200:
                    return
            time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"lorahive serve was not ready after {timeout_s:g} s")

    async def forward(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes) -> AsyncIterator[tuple[int, list[tuple[str, str]]] | bytes]:
        """The child's answer to the request: first (status, headers), then the body as it streams."""
        adapter_id = serve.get_multiplexed_model_id()
        async with self.client.stream(method, target, headers=headers, content=body) as response:
            if adapter_id and response.status_code < 400:  # a name that is no adapter must not attract its traffic
                await self.serves(adapter_id)
            yield response.status_code, [*_forwarded(response.headers), (REPLICA_HEADER, self.name)]
            async for chunk in response.aiter_raw():
                yield chunk

    def check_health(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"lorahive serve exited with status {self.process.returncode}")

    def __del__(self) -> None:
        """SIGTERM: the child drains (its running requests finish, new ones get 503), then exits."""
        if getattr(self, "process", None) is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(self.drain_timeout_s + 5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()


@serve.deployment(max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class Router:
    """The ingress: one endpoint in front of the replicas, routing each generation request by its adapter."""

    def __init__(self, replicas: DeploymentHandle, base_model: str):
        self.replicas = replicas
        self.base_model = base_model

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        adapter_id = adapter_of(path, body, self.base_model)
        target = path + (f"?{request.url.query}" if request.url.query else "")
        headers = _forwarded(request.headers)
        attempts = 2 if path in GENERATION_PATHS else 1  # nothing was generated yet: another replica may answer
        for attempt in range(attempts):
            handle = self.replicas.options(stream=True, multiplexed_model_id=adapter_id or "")
            parts: DeploymentResponseGenerator = handle.forward.remote(request.method, target, headers, body)
            try:
                status, response_headers = await parts.__anext__()
                break
            except Exception:  # the replica died, or its child did, before answering
                log.warning("a replica failed before answering %s %s (attempt %d of %d)", request.method, path,
                            attempt + 1, attempts, exc_info=True)
        else:
            return error_response(503, "The replica serving this request went away before answering; retry it.",
                                  error_type=SERVER_ERROR, code="replica_unavailable")
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
    return Router.bind(replica.bind(settings_environment(settings), adapters_per_replica), served_model_name(settings))
