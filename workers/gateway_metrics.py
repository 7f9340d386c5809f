"""``GET /metrics``: the runtime in Prometheus' text format (``prometheus_client``).

Two sources: the coordinator's totals and health (``get_stats`` and ``get_health``, asked at every scrape: requests
by outcome, tokens, hit rate, stall, loads, bytes, link use, prefetch quality, restarts per role, queue depth), and
what the gateway itself observed of the requests it served (TTFT and TPOT histograms from each request's metrics,
HTTP responses by status). The registry is the gateway's own, not prometheus_client's global one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from protocol.messages import HealthReported

OUTCOMES = ("done", "failed", "rejected", "cancelled", "deadline_exceeded", "peer_gone")
"""``requests_<outcome>`` of the coordinator's totals."""
COUNTERS = {
    "tokens_generated": ("promoe_tokens_generated", "Tokens generated since start"),
    "experts_loaded": ("promoe_experts_loaded", "Experts loaded into the cache since start"),
    "bytes_loaded": ("promoe_bytes_loaded", "Bytes copied into the cache since start"),
    "wasted_bytes": ("promoe_wasted_bytes", "Bytes loaded for experts never used before eviction"),
    "evictions": ("promoe_evictions", "Experts evicted from the cache since start"),
    "loads_preempted": ("promoe_loads_preempted", "Speculative loads preempted since start"),
    "busy_s": ("promoe_busy_seconds", "Wall time with a request running"),
}
RATIOS = {
    "hit_rate": ("promoe_hit_rate", "Share of expert uses found in the cache, since start"),
    "goodpred": ("promoe_goodpred", "GoodPred = prefetch precision x fetch rate, since start (promoe policy)"),
    "prefetch_precision": ("promoe_prefetch_precision", "Share of predicted experts the gate then chose"),
    "prefetch_recall": ("promoe_prefetch_recall", "Share of chosen experts that were predicted"),
    "fetch_rate": ("promoe_fetch_rate", "Share of predicted experts in the cache when the gate reported"),
    "link_utilisation": ("promoe_link_utilisation", "Bytes loaded / (busy time x link bandwidth)"),
}
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class CoordinatorCollector(Collector):
    """The coordinator's last reported totals and health, as metric families (``snapshot`` before each scrape)."""

    def __init__(self) -> None:
        self.totals: dict[str, Any] | None = None
        self.health: HealthReported | None = None

    def snapshot(self, totals: dict[str, Any] | None, health: HealthReported | None) -> None:
        self.totals, self.health = totals, health

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("promoe_coordinator_up", "Whether the coordinator answered this scrape")
        up.add_metric([], float(self.totals is not None and self.health is not None))
        yield up
        if self.totals is not None:
            yield from self._totals(self.totals)
        if self.health is not None:
            yield from self._health(self.health)

    @staticmethod
    def _totals(totals: dict[str, Any]) -> Iterator[Metric]:
        requests = CounterMetricFamily("promoe_requests", "Requests since start by outcome (all clients)",
                                       labels=["outcome"])
        for outcome in OUTCOMES:
            requests.add_metric([outcome], float(totals.get(f"requests_{outcome}") or 0))
        yield requests
        for key, (name, doc) in COUNTERS.items():
            if totals.get(key) is not None:
                yield CounterMetricFamily(name, doc, value=float(totals[key]))
        stall = totals.get("stall_ms")
        if stall is not None:
            yield CounterMetricFamily("promoe_stall_seconds", "Time the model waited for experts, since start",
                                      value=float(stall) / 1e3)
        for key, (name, doc) in RATIOS.items():
            if totals.get(key) is not None:  # None: undefined (nothing predicted, link speed unknown), not zero
                yield GaugeMetricFamily(name, doc, value=float(totals[key]))

    @staticmethod
    def _health(health: HealthReported) -> Iterator[Metric]:
        yield GaugeMetricFamily("promoe_queue_depth", "Requests waiting behind the running one",
                                value=float(health.queued))
        yield GaugeMetricFamily("promoe_request_running", "Whether a request is running",
                                value=float(health.running is not None))
        yield GaugeMetricFamily("promoe_draining", "Whether the runtime is draining", value=float(health.draining))
        workers = GaugeMetricFamily("promoe_worker_up", "Whether the worker answers pings", labels=["role"])
        for role, answering in sorted(health.workers.items()):
            workers.add_metric([role], float(answering))
        yield workers
        restarts = CounterMetricFamily("promoe_worker_restarts", "Restarts by the supervisor since start",
                                       labels=["role"])
        for role, n in sorted(health.restarts.items()):
            restarts.add_metric([role], float(n))
        yield restarts


class GatewayMetrics:
    """The gateway's registry: the coordinator's figures plus the requests this gateway served."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.coordinator = CoordinatorCollector()
        self.registry.register(self.coordinator)
        self.responses = Counter("promoe_http_responses", "HTTP generation responses by endpoint and status",
                                 ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("promoe_http_ttft_seconds", "Time to first token of HTTP requests (coordinator's "
                              "metrics)", buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.tpot = Histogram("promoe_http_tpot_seconds", "Time per output token of HTTP requests (coordinator's "
                              "metrics)", buckets=LATENCY_BUCKETS_S, registry=self.registry)

    def track(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge of the gateway's own state, read at each scrape."""
        Gauge(name, doc, registry=self.registry).set_function(read)

    def observe(self, endpoint: str, status: int, metrics: dict[str, Any] | None = None) -> None:
        self.responses.labels(endpoint, str(status)).inc()
        if metrics:
            if metrics.get("ttft_ms") is not None:
                self.ttft.observe(float(metrics["ttft_ms"]) / 1e3)
            if metrics.get("tpot_ms") is not None:
                self.tpot.observe(float(metrics["tpot_ms"]) / 1e3)

    def render(self, totals: dict[str, Any] | None, health: HealthReported | None) -> bytes:
        self.coordinator.snapshot(totals, health)
        return generate_latest(self.registry)
