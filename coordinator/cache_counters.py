"""What the cache did, counted: the totals since start and the running request's share.

A load is charged to the request that issued it, wherever it completes: a load still in flight when its request
ends counts in the totals only, never in the next request's figures (``coordinator/metrics.py`` turns these into
the per-request metrics and the totals clients read).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.ids import RequestId


@dataclass
class CacheCounters:
    """What the cache did: since start (``CacheLedger.totals``) or for one request (``CacheLedger.request``)."""

    loads_issued: int = 0
    experts_loaded: int = 0
    bytes_loaded: int = 0
    wasted_bytes: int = 0
    evictions: int = 0
    preempted: int = 0
    predicted: int = 0
    """Experts predicted for gates that then reported."""
    predicted_chosen: int = 0
    """... of which the gate chose."""
    predicted_ready: int = 0
    """... of which were in the cache, every chunk landed, when the gate reported."""
    chosen: int = 0
    """Experts chosen by gates (while prefetching)."""
    expert_uses: int = 0
    """Experts chosen by gates (every gate, prefetching or not): the hit rate's denominator."""
    expert_hits: int = 0
    """... of which were fully landed when the gate decided (``GateDecided.ready_experts``): the live hit rate the
    inference worker reports at the request's end (``GenerationFinished.expert_hits``)."""


class CacheLedger:
    def __init__(self) -> None:
        self.totals = CacheCounters()
        """Totals since start."""
        self.request = CacheCounters()
        """The current request's share: what it issued, wherever it completes (not an earlier request's)."""
        self.request_id: RequestId | None = None

    def begin_request(self, request_id: RequestId) -> None:
        self.request_id = request_id
        self.request = CacheCounters()

    def charge(self, request_id: RequestId | None, **amounts: int) -> None:
        """Add ``amounts`` (counter name -> amount) to the totals and, if ``request_id`` is current, to its share."""
        for counters in (self.totals, self.request) if request_id == self.request_id else (self.totals,):
            for name, amount in amounts.items():
                setattr(counters, name, getattr(counters, name) + amount)
