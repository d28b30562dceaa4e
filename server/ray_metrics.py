"""Every replica's `/metrics` through the one Ray Serve endpoint, each series labelled with its replica.

A replica's server is not reachable from outside Ray, and a request through the router reaches one replica. So each
replica posts its exposition every `POST_INTERVAL_S` to a board actor the router owns, and the router answers
`GET /metrics` (once the replica the request reached has authorized it: the keys stay lorahive's) with every
replica's exposition posted in the last `STALE_AFTER_S`, merged, with a `replica` label on every sample.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger("lorahive.ray")

POST_INTERVAL_S = 5.0
STALE_AFTER_S = 3 * POST_INTERVAL_S  # a replica silent this long is gone (its series stop, as a dead target's do)
BOARD_NAME, BOARD_NAMESPACE = "lorahive-metrics-board", "lorahive"


@ray.remote(num_cpus=0)
class MetricsBoard:
    """The latest exposition of each replica, and when it came."""

    def __init__(self) -> None:
        self._posted: dict[str, tuple[str, float]] = {}

    def post(self, replica: str, exposition: str) -> None:
        self._posted[replica] = (exposition, time.monotonic())

    def fresh(self) -> dict[str, str]:
        now = time.monotonic()
        self._posted = {r: (text, at) for r, (text, at) in self._posted.items() if now - at < STALE_AFTER_S}
        return {replica: text for replica, (text, _) in self._posted.items()}


def board() -> ray.actor.ActorHandle:
    """The board, made by the first caller (the router) and found by the others."""
    return MetricsBoard.options(name=BOARD_NAME, namespace=BOARD_NAMESPACE, get_if_exists=True).remote()


def start_posting(replica: str, exposition: Callable[[], bytes], stop: threading.Event) -> None:
    """Post `exposition()` as `replica`'s every `POST_INTERVAL_S` until `stop` is set, on a daemon thread."""

    def run() -> None:
        target = None
        while not stop.wait(POST_INTERVAL_S if target is not None else 0.5):
            try:
                target = target or ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
                ray.get(target.post.remote(replica, exposition().decode()), timeout=10)
            except Exception:  # no board yet, or the router (its owner) was replaced: find it again
                target = None

    threading.Thread(target=run, name="lorahive-metrics-post", daemon=True).start()


def merged(expositions: dict[str, str]) -> bytes:
    """One exposition of every replica's series, a `replica` label added to each sample."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(expositions.items()):
        for family in text_string_to_metric_families(text):
            into = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                           family.unit))
            for point in family.samples:
                into.add_sample(point.name, {**point.labels, "replica": replica}, point.value, point.timestamp)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]):
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families
