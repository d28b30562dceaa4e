"""`lorahive serve-ray`: lorahive replicas on Ray Serve behind one endpoint (server/ray_serving.py).

Every `lorahive serve` flag applies to each replica; `--host` and `--port` are the endpoint's (Ray Serve's HTTP
proxy). Ray itself is the local one this command starts, or the cluster `--ray-address` names.
"""

from __future__ import annotations

import argparse
import logging
import signal

from server.config import Settings

log = logging.getLogger("lorahive.ray")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=2, help="lorahive replicas (default 2)")
    parser.add_argument("--adapters-per-replica", type=int, default=64,
                        help="adapters whose requests Ray prefers to send to the replica that served them last, per "
                             "replica (its LRU; default 64)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    parser.add_argument("--replica-gpus", type=float, default=0.0,
                        help="GPUs each replica reserves (default 0; 1 to give each its own GPU)")
    parser.add_argument("--ray-address", default=None,
                        help="a running Ray cluster to join (e.g. auto, ray://head:10001); default: start one here")


def run(namespace: argparse.Namespace, settings: Settings) -> None:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit("error: serve-ray needs Ray Serve: pip install 'lorahive[ray]'") from None
    from server.ray_serving import application

    for flag in ("replicas", "adapters_per_replica"):
        if getattr(namespace, flag) < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be at least 1")
    ray.init(address=namespace.ray_address)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    # SIGTERM as Ctrl-C: the replicas are shut down below, each draining first.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.run(application(settings, namespace.replicas, namespace.adapters_per_replica, namespace.replica_cpus,
                              namespace.replica_gpus), name="lorahive", route_prefix="/")
        log.info("serving %d replicas on http://%s:%d", namespace.replicas, settings.host, settings.port)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        # A second signal must not cut the shutdown short, which would leave replicas running.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log.info("stopping: each replica drains its requests first (at most --drain-timeout %g s)",
                 settings.drain_timeout)
        serve.shutdown()
