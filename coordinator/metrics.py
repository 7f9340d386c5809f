"""Metrics of one request and totals since start (DESIGN.md section 6), as the coordinator reports them.

Hit rate and stall come from the inference worker (it sees the gate and the wait); loads, bytes, waste and the
prediction counts from the cache directory; wall time and messages from the coordinator itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from coordinator.cache_counters import CacheCounters
from protocol.messages import GenerationFinished

Metrics = dict[str, float | int | None]


def prefetch_metrics(counters: CacheCounters, enabled: bool) -> Metrics:
    """Precision (= the paper's accuracy), recall, FetchRate and GoodPred = accuracy x FetchRate.

    Without prefetching they are undefined (None), not zero.
    """
    if not enabled:
        return {"prefetch_precision": None, "prefetch_recall": None, "fetch_rate": None, "goodpred": None}
    predicted, correct = counters.predicted, counters.predicted_chosen
    ready, chosen = counters.predicted_ready, counters.chosen
    precision = correct / predicted if predicted else None
    fetch_rate = ready / predicted if predicted else None
    return {
        "prefetch_precision": precision,
        "prefetch_recall": correct / chosen if chosen else None,
        "fetch_rate": fetch_rate,
        "goodpred": precision * fetch_rate if precision is not None and fetch_rate is not None else None,
    }


def link_utilisation(bytes_loaded: float, wall_s: float, link_gbps: float | None) -> float | None:
    """Bytes loaded / (wall time x link bandwidth); None where the link's bandwidth is not known."""
    if not link_gbps or wall_s <= 0:
        return None
    return bytes_loaded / (wall_s * link_gbps * 1e9)


def cache_metrics(counters: CacheCounters, prefetches: bool, wall_s: float, link_gbps: float | None) -> Metrics:
    return {
        "experts_loaded": counters.experts_loaded,
        "bytes_loaded": counters.bytes_loaded,
        "wasted_bytes": counters.wasted_bytes,
        "loads_preempted": counters.preempted,
        "evictions": counters.evictions,
        "link_utilisation": link_utilisation(counters.bytes_loaded, wall_s, link_gbps),
        **prefetch_metrics(counters, prefetches),
    }


@dataclass
class Totals:
    """Inference-side sums over every request since start."""

    requests_done: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    expert_uses: int = 0
    expert_hits: int = 0
    stall_ms: float = 0.0
    busy_s: float = 0.0
    """Wall time with a request running."""
    requests_rejected: int = 0
    """Refused on admission (``bad_request``, ``busy``)."""
    predictions_received: int = 0
    """``ExpertsPredicted`` of the running request (older ones are dropped)."""
    outlooks_received: int = 0
    """``OutlookPredicted`` of the running request (``--routing-predictor``)."""
    abandoned: Counter[str] = field(default_factory=Counter)
    """Requests ended early, by why: ``cancelled``, ``deadline_exceeded``, ``peer_gone`` (client left)."""

    def count_abandoned(self, code: str) -> None:
        self.abandoned[code] += 1

    def add(self, msg: GenerationFinished, wall_s: float, abandoned: str | None = None) -> None:
        """A request the inference worker finished; ``abandoned``: it was stopped early, and why."""
        if abandoned is None:
            self.requests_done += 1
        else:
            self.count_abandoned(abandoned)
        self.tokens_generated += len(msg.token_ids)
        self.expert_uses += msg.expert_uses
        self.expert_hits += msg.expert_hits
        self.stall_ms += msg.stall_ms
        self.busy_s += wall_s

    def report(self, counters: CacheCounters, prefetches: bool, link_gbps: float | None) -> Metrics:
        return {
            "requests_done": self.requests_done,
            "requests_failed": self.requests_failed,
            "requests_rejected": self.requests_rejected,
            **{f"requests_{code}": self.abandoned[code] for code in ("cancelled", "deadline_exceeded", "peer_gone")},
            "tokens_generated": self.tokens_generated,
            "hit_rate": self.expert_hits / self.expert_uses if self.expert_uses else None,
            "stall_ms": self.stall_ms,
            "expert_uses": self.expert_uses,
            "busy_s": self.busy_s,
            "predictions_received": self.predictions_received,
            "outlooks_received": self.outlooks_received,
            **cache_metrics(counters, prefetches, self.busy_s, link_gbps),
        }
