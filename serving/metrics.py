"""Prometheus metrics per model: requests, tokens, time to first token, latency, queue, slots.

Counters and histograms are updated by the handlers; queue depth and busy slots are
read from each engine's ``stats()`` at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class _EngineGauges(Collector):
    """Queue depth, busy slots and status of every model, from ``stats()`` at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        queue = GaugeMetricFamily("mrs_queue_depth", "Requests waiting for a slot", labels=["model"])
        busy = GaugeMetricFamily("mrs_busy_slots", "Decode slots in use", labels=["model"])
        slots = GaugeMetricFamily("mrs_slots", "Decode slots in total", labels=["model"])
        loaded = GaugeMetricFamily("mrs_model_loaded", "1 when the model serves requests", labels=["model"])
        size = GaugeMetricFamily("mrs_model_loaded_bytes", "Parameter and KV cache bytes a loaded model holds",
                                 labels=["model"])
        events = {name: CounterMetricFamily(f"mrs_model_{name}", help_, labels=["model"]) for name, help_ in (
            ("loads", "Completed model loads"), ("unloads", "Unloads (requested, expired, removed)"),
            ("evictions", "Unloads to make room for another model"), ("load_seconds", "Seconds spent loading"))}
        for model, stats in self._stats().items():
            queue.add_metric([model], stats.get("queue_depth", 0))
            busy.add_metric([model], stats.get("busy_slots", 0))
            slots.add_metric([model], stats.get("slots", 0))
            loaded.add_metric([model], 1 if stats.get("status") == "loaded" else 0)
            size.add_metric([model], stats.get("loaded_bytes", 0))
            for name, family in events.items():
                family.add_metric([model], stats.get(name, 0))
        yield from (queue, busy, slots, loaded, size, *events.values())


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mrs_requests", "Requests by model, endpoint and HTTP status",
                                ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mrs_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generated_tokens = Counter("mrs_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("mrs_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("mrs_request_latency_seconds", "Request latency (to the last token)",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineGauges(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
