"""``DescribeCache``: a snapshot of the expert cache for the live view (``GET /`` of the gateway).

Built only when a client asks (the gateway asks a few times a second while a browser watches), from what the cache
directory holds anyway: nothing here runs per token. Its cost is linear in the slots (resident and loading experts),
the predictions held (a few layers' top-k) and the recent evictions (at most a cache's worth).

The running request's hit rate is live (counted at every gate from ``GateDecided.ready_experts``, as the inference
worker counts it); its stall is not: the worker reports stall only when the request ends, so the page shows the
stall of finished requests.
"""

from __future__ import annotations

from collections.abc import Iterable

from coordinator.cache import CacheDirectory
from coordinator.metrics import Metrics, Totals, cache_metrics
from protocol.ids import ExpertId, RequestId
from protocol.messages import CacheDescribed


def by_layer(experts: Iterable[ExpertId], n_layers: int, experts_per_layer: int) -> list[list[int]]:
    """Flat expert ids -> per MoE layer, each layer's indexes in ascending order."""
    layers: list[list[int]] = [[] for _ in range(n_layers)]
    for expert in experts:
        layers[expert // experts_per_layer].append(expert % experts_per_layer)
    for layer in layers:
        layer.sort()
    return layers


def describe_cache(cache: CacheDirectory, totals: Totals, link_gbps: float | None, running: RequestId | None,
                   running_s: float, uptime_s: float) -> CacheDescribed:
    """The snapshot: ``running`` is the running request (None: none) and ``running_s`` how long it has run."""
    layout = cache.layout
    n_layers, per_layer = len(layout.moe_layers), layout.experts_per_layer
    resident = cache.resident_experts()
    loading = [load.expert for load in cache.loads_in_flight()]
    present = set(resident) | set(loading)
    evicted = {e for e in cache.evicted_recently if e not in present}
    prefetches = cache.policy.prefetches
    request: Metrics = {}
    step, layer = -1, -1
    if running is not None:
        counters = cache.request_counters
        request = cache_metrics(counters, prefetches, running_s, link_gbps)
        request["expert_uses"] = counters.expert_uses  # counted at every gate: live, not only at the end
        request["hit_rate"] = counters.expert_hits / counters.expert_uses if counters.expert_uses else None
        step, layer = cache.position

    def layers(experts: Iterable[ExpertId]) -> list[list[int]]:
        return by_layer(experts, n_layers, per_layer)

    return CacheDescribed(
        policy=cache.policy.name, experts_per_layer=per_layer, cache_experts=cache.n_slots,
        resident=layers(resident), loading=layers(loading), predicted=layers(cache.predicted_ahead()),
        evicted=layers(evicted),
        request_id=running, step=step, layer=layer, request=request,
        totals=totals.report(cache.counters, prefetches, link_gbps), uptime_s=uptime_s, link_gbps=link_gbps)
