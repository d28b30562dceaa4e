"""Prometheus metrics: one `Metrics` object per engine, on its own `CollectorRegistry` (no global state,
so one process can host several servers, as the tests do).

Names follow `lorahive_<thing>_<unit>`; durations are in seconds, counters end in `_total`. Latency
histograms never carry an adapter label. Per-adapter counters are bounded: the `top_adapters` adapters
with the most requests keep their own `adapter` label; every other adapter's traffic counts as
`adapter="other"` (an increment is attributed when it happens, so every exported series only grows).
Requests for the base model alone carry no adapter and appear only in the totals.

Writers: the API layer (`observe_http`), the engine thread (request timing, steps, tokens), the
scheduler and the registry (adapter tier events). Gauges that merely mirror state (requests running and
waiting, KV blocks, adapters and bytes per tier) and the tiers' load/eviction counters are read at scrape
time by a custom collector, so nothing has to keep them up to date.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adapters_store import ADAPTER_KINDS
from server.gateway_metrics import GatewayCollector

if TYPE_CHECKING:
    from server.engine import Engine

OTHER_ADAPTERS = "other"
TIERS = ("gpu", "host", "disk")
TRANSITIONS = ("disk_to_host", "host_to_gpu")
FINISH_REASONS = ("stop", "length", "abort", "error")
REJECT_REASONS = ("queue_full", "draining")  # 429 past --max-waiting-requests; 503 while draining after SIGTERM
REQUEST_KINDS = ("base", *ADAPTER_KINDS)  # the kind of adapter a request uses; base: none

# LLM latencies: from a millisecond to a minute for the first token and the whole request.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 60.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                       0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOAD_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DISK_STATS_TTL_S = 5.0  # the disk tier's totals are read from the store at most this often


class TopAdapters:
    """Per-adapter counters whose label set stays bounded: the `limit` adapters with most requests
    (ranked continuously) keep their own label; increments for any other adapter go to `other`.

    `collect()` yields, per counter, at most `limit + 1` series: the current top adapters and `other`.
    An adapter that drops out of the top keeps its accumulated value (hidden) and resumes it if it comes
    back, so no exported series ever decreases."""

    FIELDS = ("requests", "prompt_tokens", "generation_tokens")

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError("the number of labelled adapters must be >= 0")
        self.limit = limit
        self._lock = threading.Lock()
        self._traffic: dict[str, int] = {}  # adapter -> requests ever (the ranking)
        self._top: set[str] = set()
        self._own: dict[str, list[int]] = {}  # adapter -> increments made while it was in the top
        self._other = [0, 0, 0]

    def add(self, adapter_id: str, requests: int = 0, prompt_tokens: int = 0, generation_tokens: int = 0) -> None:
        with self._lock:
            if requests:
                self._traffic[adapter_id] = self._traffic.get(adapter_id, 0) + requests
                self._rank(adapter_id)
            target = self._own.setdefault(adapter_id, [0, 0, 0]) if adapter_id in self._top else self._other
            target[0] += requests
            target[1] += prompt_tokens
            target[2] += generation_tokens

    def _rank(self, adapter_id: str) -> None:
        """Lock held. Let `adapter_id` into the top if it now beats the weakest member."""
        if adapter_id in self._top or adapter_id == OTHER_ADAPTERS or self.limit == 0:
            return
        if len(self._top) < self.limit:
            self._top.add(adapter_id)
            return
        weakest = min(self._top, key=lambda a: (self._traffic[a], a))
        if self._traffic[adapter_id] > self._traffic[weakest]:
            self._top.discard(weakest)
            self._top.add(adapter_id)

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        """Exported values by label: the top adapters and `other`."""
        with self._lock:
            values = {a: tuple(self._own.get(a, (0, 0, 0))) for a in self._top}
            values[OTHER_ADAPTERS] = tuple(self._other)
        return values  # type: ignore[return-value]

    def collect(self) -> Iterator[Metric]:
        values = self.snapshot()
        docs = (
            "Generation requests per adapter (top adapters by requests; the rest as adapter=\"other\").",
            "Prompt tokens per adapter (top adapters by requests; the rest as adapter=\"other\").",
            "Generated tokens per adapter (top adapters by requests; the rest as adapter=\"other\").",
        )
        for index, (field, doc) in enumerate(zip(self.FIELDS, docs, strict=True)):
            family = CounterMetricFamily(f"lorahive_adapter_{field}", doc, labels=["adapter"])
            for adapter, counts in sorted(values.items()):
                family.add_metric([adapter], counts[index])
            yield family


class _StateCollector(Collector):
    """Gauges and counters read at scrape time from the engine's `stats()` snapshot and the registry's."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics
        self._disk: tuple[float, int, int] = (-DISK_STATS_TTL_S, 0, 0)  # (read at, adapters, bytes)

    def collect(self) -> Iterable[Metric]:
        yield from self._metrics.top_adapters.collect()
        engine = self._metrics.engine
        if engine is None:
            return
        engine_stats, registry = engine.stats(), engine.registry
        yield _gauge("lorahive_requests_running", "Sequences (request choices) admitted and being decoded.",
                     engine_stats.running)
        yield _gauge("lorahive_requests_waiting", "Sequences waiting for admission (KV blocks, adapter slot, "
                     "budget).", engine_stats.waiting)
        yield _gauge("lorahive_kv_cache_used_blocks", "KV-cache blocks in use.", engine_stats.kv_blocks_used)
        yield _gauge("lorahive_kv_cache_capacity_blocks", "KV-cache blocks in all.", engine_stats.kv_blocks_total)
        disk_count, disk_bytes = self._disk_stats(registry)
        stats = registry.stats
        resident = GaugeMetricFamily("lorahive_adapters_resident", "Adapters held per tier (disk: stored).",
                                     labels=["tier"])
        size = GaugeMetricFamily("lorahive_adapter_resident_bytes", "Adapter weight bytes held per tier (stacks: "
                                 "the copies a CPU model runner reads a batch of many adapters from).", labels=["tier"])
        gpu = ("gpu", engine_stats.adapters_resident, engine_stats.adapter_bytes_resident)
        for tier, count, nbytes in (gpu,
                                    ("host", stats.host_adapters, stats.host), ("disk", disk_count, disk_bytes)):
            resident.add_metric([tier], count)
            size.add_metric([tier], nbytes)
        # Copies, not a tier: on a CPU server they share --max-host-adapter-bytes with the host tier.
        size.add_metric(["stacks"], engine_stats.adapter_stack_bytes)
        yield resident
        yield size
        loads = CounterMetricFamily("lorahive_adapter_loads", "Adapters loaded into a tier (gpu: into a device "
                                    "slot; host: read from disk into host memory).", labels=["tier"])
        loads.add_metric(["gpu"], engine_stats.adapter_loads)
        loads.add_metric(["host"], stats.loads_from_disk)
        yield loads
        evictions = CounterMetricFamily("lorahive_adapter_evictions", "Adapters evicted from a tier to make room "
                                        "(least recently used first).", labels=["tier"])
        evictions.add_metric(["gpu"], engine_stats.adapter_evictions)
        evictions.add_metric(["host"], stats.host_evictions)
        yield evictions

    def _disk_stats(self, registry) -> tuple[int, int]:
        read_at, count, nbytes = self._disk
        now = time.monotonic()
        if now - read_at >= DISK_STATS_TTL_S:
            try:
                versions = [registry.version(i) for i in registry.ids()]
                count = sum(1 for v in versions if v is not None)
                nbytes = sum(v.manifest.num_bytes for v in versions if v is not None)
            except OSError:  # a store being swept: keep the last reading
                pass
            self._disk = (now, count, nbytes)
        return count, nbytes


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _zeroed(metric: Counter | Histogram, label_values: tuple[str, ...]) -> Counter | Histogram:
    """`metric` with a series for each of `label_values` from the start, so that each shows (at zero) from the first
    scrape rather than after its first event."""
    for value in label_values:
        metric.labels(value)
    return metric


class Metrics:
    """Every metric of one server. Methods are cheap and thread-safe (prometheus-client locks per value)."""

    def __init__(self, top_adapters: int = 20):
        self.registry = CollectorRegistry()
        self.engine: Engine | None = None
        self.top_adapters = TopAdapters(top_adapters)
        r = self.registry
        self.http_requests = Counter(
            "lorahive_http_requests", "HTTP requests by endpoint (route template), method and status code.",
            ["endpoint", "method", "status_code"], registry=r)
        self.adapter_uploads = Counter(
            "lorahive_adapter_uploads", "Adapter uploads (POST create and PUT replace) that succeeded.", registry=r)
        self.adapter_upload_failures = Counter(
            "lorahive_adapter_upload_failures", "Adapter uploads refused or failed (any 4xx/5xx).", registry=r)
        self.adapter_deletes = Counter("lorahive_adapter_deletes", "Adapter deletions that succeeded.", registry=r)
        self.adapter_delete_failures = Counter(
            "lorahive_adapter_delete_failures", "Adapter deletions refused or failed (any 4xx/5xx).", registry=r)
        self.finished = _zeroed(Counter(
            "lorahive_requests_finished", "Sequences (request choices) finished, by finish reason "
            "(stop, length, abort: client gone or cut at the end of a drain, error: engine or adapter failure).",
            ["finish_reason"], registry=r), FINISH_REASONS)
        self.rejected = _zeroed(Counter(
            "lorahive_requests_rejected", "Requests refused before any work, by reason (queue_full: the waiting "
            "queue is full and the tenant holds its share, 429; draining: the server is shutting down, 503).",
            ["reason"], registry=r), REJECT_REASONS)
        self.prompt_tokens = Counter("lorahive_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.kind_requests = _zeroed(Counter(
            "lorahive_adapter_kind_requests", "Requests admitted, by the kind of adapter they use (base: none).",
            ["kind"], registry=r), REQUEST_KINDS)
        self.kind_generation_tokens = _zeroed(Counter(
            "lorahive_adapter_kind_generation_tokens", "Tokens generated, by the kind of adapter that made them "
            "(base: none).", ["kind"], registry=r), REQUEST_KINDS)
        self.generation_tokens = Counter("lorahive_generation_tokens", "Tokens generated.", registry=r)
        self.queue_time = Histogram(
            "lorahive_request_queue_time_seconds", "Arrival to first admission into a batch, per sequence.",
            buckets=TTFT_BUCKETS, registry=r)
        self.ttft = Histogram(
            "lorahive_time_to_first_token_seconds", "Arrival to first generated token, per sequence.",
            buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram(
            "lorahive_inter_token_latency_seconds", "Time between consecutive tokens of a sequence, one per token.",
            buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.tpot = Histogram(
            "lorahive_time_per_output_token_seconds", "Mean time per output token after the first, one per "
            "finished sequence of 2+ tokens.", buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram(
            "lorahive_e2e_request_latency_seconds", "Arrival to the last token, per finished sequence.",
            buckets=REQUEST_BUCKETS, registry=r)
        self.step_time = Histogram(
            "lorahive_step_duration_seconds", "Engine step: forward pass of the batch plus sampling.",
            buckets=STEP_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "lorahive_step_batch_size_sequences", "Sequences in one engine step.", buckets=COUNT_BUCKETS, registry=r)
        self.step_tokens = Histogram(
            "lorahive_step_tokens", "Tokens fed to the model in one engine step (prefill chunks + decodes).",
            buckets=COUNT_BUCKETS, registry=r)
        self.cache_hits = _zeroed(Counter(
            "lorahive_adapter_cache_hits", "Adapter lookups served by a tier (gpu: slot resident; host: weights in "
            "host memory; disk: read from the store).", ["tier"], registry=r), TIERS)
        self.cache_misses = _zeroed(Counter(
            "lorahive_adapter_cache_misses", "Adapter lookups a tier could not serve (gpu, host: go to the colder "
            "tier; disk: the read or parse failed).", ["tier"], registry=r), TIERS)
        self.load_time = _zeroed(Histogram(
            "lorahive_adapter_load_duration_seconds", "Time to move an adapter between tiers "
            "(disk_to_host: read + parse; host_to_gpu: slot write, eviction included).", ["transition"],
            buckets=LOAD_BUCKETS, registry=r), TRANSITIONS)
        self.broken_loads = Counter(
            "lorahive_adapter_broken_loads", "Adapter versions found broken when read from the store (a file missing "
            "or failing its checksum, or weights that no longer parse); each is read once, then refused until "
            "replaced.", registry=r)
        self._finish_counters = {reason: self.finished.labels(reason) for reason in FINISH_REASONS}
        self.registry.register(_StateCollector(self))
        self.registry.register(GatewayCollector(lambda: self.engine))

    def attach(self, engine: Engine) -> None:
        """Let the scrape-time collector read `engine.stats()` and its adapter registry."""
        self.engine = engine

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # ---- API layer ---------------------------------------------------------------------------------

    def observe_http(self, endpoint: str, method: str, status_code: int) -> None:
        self.http_requests.labels(endpoint, method, str(status_code)).inc()
        if endpoint.startswith("/v1/adapters"):
            failed = status_code >= 400
            if method in ("POST", "PUT") and endpoint in ("/v1/adapters", "/v1/adapters/{adapter_id}"):
                (self.adapter_upload_failures if failed else self.adapter_uploads).inc()
            elif method == "DELETE":
                (self.adapter_delete_failures if failed else self.adapter_deletes).inc()

    # ---- engine ------------------------------------------------------------------------------------

    def request_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def request_submitted(self, adapter_id: str | None, prompt_tokens: int, kind: str = "base") -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.kind_requests.labels(kind).inc()
        if adapter_id is not None:
            self.top_adapters.add(adapter_id, requests=1, prompt_tokens=prompt_tokens)

    def admitted(self, waited_s: float) -> None:
        self.queue_time.observe(waited_s)

    def step(self, duration_s: float, num_sequences: int, num_tokens: int) -> None:
        self.step_time.observe(duration_s)
        self.batch_size.observe(num_sequences)
        self.step_tokens.observe(num_tokens)

    def tokens_generated(self, adapter_id: str | None, count: int, kind: str = "base") -> None:
        self.generation_tokens.inc(count)
        self.kind_generation_tokens.labels(kind).inc(count)
        if adapter_id is not None:
            self.top_adapters.add(adapter_id, generation_tokens=count)

    def first_token(self, since_arrival_s: float) -> None:
        self.ttft.observe(since_arrival_s)

    def next_token(self, since_previous_s: float) -> None:
        self.inter_token.observe(since_previous_s)

    def sequence_finished(self, reason: str, e2e_s: float | None = None, tpot_s: float | None = None) -> None:
        self._finish_counters[reason].inc()
        if e2e_s is not None:
            self.e2e.observe(e2e_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    # ---- adapter tiers -----------------------------------------------------------------------------

    def adapter_lookup(self, on_gpu: bool, in_host: bool) -> None:
        """A sequence's first look for its adapter: the gpu tier, then (on a miss) the host tier."""
        if on_gpu:
            self.cache_hits.labels("gpu").inc()
            return
        self.cache_misses.labels("gpu").inc()
        (self.cache_hits if in_host else self.cache_misses).labels("host").inc()

    def disk_read(self, ok: bool) -> None:
        (self.cache_hits if ok else self.cache_misses).labels("disk").inc()

    def adapter_broken(self) -> None:
        self.broken_loads.inc()

    def adapter_loaded(self, transition: str, duration_s: float) -> None:
        self.load_time.labels(transition).observe(duration_s)
