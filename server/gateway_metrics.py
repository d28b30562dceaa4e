"""What routers read off `/metrics`: the Gateway API Inference Extension's model-server protocol in vLLM's names,
and which adapters each tier holds.

The Kubernetes inference gateway's endpoint picker (and llm-d's) scrapes every model server and routes by these
gauges, parsing them as vLLM exports them:

* `vllm:num_requests_running`, `vllm:num_requests_waiting`: sequences (a request's choices count one each, as
  vLLM V1 fans `n` out into requests) admitted into the batch / waiting for admission.
* `vllm:kv_cache_usage_perc`: KV-cache blocks in use over all of them, from 0 to 1 (a fraction, despite the name).
* `vllm:cache_config_info{block_size, num_gpu_blocks}`: 1; the labels carry the KV cache's shape.
* `vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}`: its value is the unix time
  the labels last changed (the picker keeps the series with the largest value). `running_lora_adapters`: the
  adapters of running sequences, each resident on the device; `waiting_lora_adapters`: the adapters waiting
  sequences ask for (vLLM once put the running set under both labels). Comma-separated without spaces, as the
  picker splits on ",". `max_lora`: how many distinct adapters of `--max-lora-rank` one batch can mix (the
  sequences of a batch and the device tier's memory allow), so that the picker can tell a server with room for
  one more. One series: the current one.

`lorahive_adapter_residency{adapter, tier, rank, kind, pinned}`: one series for every adapter with weights on the
device or in host memory, idle ones included (vLLM shows only adapters with requests); its value is the
sequences using it now. Adapters held on disk alone are counted, not listed (`lorahive_adapters_resident`), so
the series stay as few as the tiers' memory holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.engine import Engine


class GatewayCollector(Collector):
    """The gauges above, read at scrape time from the engine (`engine_of()`; None: nothing to report yet)."""

    def __init__(self, engine_of: Callable[[], Engine | None], clock: Callable[[], float] = time.time):
        self._engine_of = engine_of
        self._clock = clock
        self._lora_labels: tuple[str, str, str] | None = None
        self._lora_changed_at = 0.0

    def collect(self) -> Iterable[Metric]:
        engine = self._engine_of()
        if engine is None:
            return
        stats = engine.stats()
        model = engine.model_name
        yield _labelled("vllm:num_requests_running", "Sequences admitted into the batch.", model, stats.running)
        yield _labelled("vllm:num_requests_waiting", "Sequences waiting for admission.", model, stats.waiting)
        yield _labelled("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 means all).", model,
                        stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0)
        config = GaugeMetricFamily("vllm:cache_config_info", "The KV cache's shape, in the labels.",
                                   labels=["block_size", "num_gpu_blocks"])
        config.add_metric([str(stats.block_size), str(stats.kv_blocks_total)], 1)
        yield config
        labels = (str(stats.max_batch_adapters), ",".join(stats.running_adapters), ",".join(stats.waiting_adapters))
        if labels != self._lora_labels:
            self._lora_labels, self._lora_changed_at = labels, self._clock()
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info", "Adapters serving running sequences and adapters waiting sequences ask "
            "for; the value is the unix time these labels last changed.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        lora.add_metric(list(labels), self._lora_changed_at)
        yield lora
        residency = GaugeMetricFamily(
            "lorahive_adapter_residency", "Every adapter with weights on the device (tier=gpu) or only in host "
            "memory (tier=host), idle ones included, with its rank, kind (lora, dora, ia3) and whether --pin keeps "
            "it; the value is the sequences using it now.", labels=["adapter", "tier", "rank", "kind", "pinned"])
        for adapter_id, held in sorted(engine.adapter_residency().items()):
            residency.add_metric([adapter_id, held.tier, str(held.rank), held.kind, str(held.pinned).lower()],
                                 held.sequences)
        yield residency


def _labelled(name: str, doc: str, model: str, value: float) -> GaugeMetricFamily:
    """A gauge with vLLM's `model_name` label, which dashboards made for vLLM filter on."""
    gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
    gauge.add_metric([model], value)
    return gauge
