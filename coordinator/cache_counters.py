"""What the cache did, counted: the totals since start and each running request's share.

A load is charged to the request that issued it, wherever it completes: a load still in flight when its request
ends counts in the totals only, never in the next request's figures (``coordinator/metrics.py`` turns these into
the per-request metrics and the totals clients read).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.ids import RequestId


@dataclass
class CacheCounters:
    """What the cache did: since start (``CacheLedger.totals``: whole numbers) or for one request
    (``CacheLedger.shares``: fractions where several requests shared a step)."""

    loads_issued: float = 0
    experts_loaded: float = 0
    bytes_loaded: float = 0
    wasted_bytes: float = 0
    evictions: float = 0
    preempted: float = 0
    predicted: float = 0
    """Experts predicted for gates that then reported."""
    predicted_chosen: float = 0
    """... of which the gate chose."""
    predicted_ready: float = 0
    """... of which were in the cache, every chunk landed, when the gate reported."""
    chosen: float = 0
    """Experts chosen by gates (while prefetching)."""
    expert_uses: int = 0
    """Experts chosen by gates (every gate, prefetching or not): the hit rate's denominator."""
    expert_hits: int = 0
    """... of which were fully landed when the gate decided (``GateDecided.ready_experts``): the live hit rate the
    inference worker reports at the request's end (``GenerationFinished.expert_hits``)."""


class CacheLedger:
    """Totals, and each running request's share. Several requests may run together (``--max-batch``): a charge of
    the running batch is divided equally among the requests its current step serves (``members``, from the gate
    reports), so a load that served four requests' tokens costs each a quarter."""

    def __init__(self) -> None:
        self.totals = CacheCounters()
        """Totals since start."""
        self.shares: dict[RequestId, CacheCounters] = {}
        """Each running request's share: what it issued, wherever it completes (not an earlier request's)."""
        self.request_id: RequestId | None = None
        """The running batch's key (its first request; with one request at a time, that request)."""
        self.members: list[RequestId] = []
        """The requests charges are divided among (the current step's)."""

    @property
    def request(self) -> CacheCounters:
        """The share of the request ``request_id`` (with one request at a time: the current request's)."""
        assert self.request_id is not None
        return self.shares.setdefault(self.request_id, CacheCounters())

    def begin_request(self, request_id: RequestId) -> None:
        """A new batch, keyed by ``request_id`` (its share starts at zero unless it is already running)."""
        self.request_id = request_id
        self.shares.setdefault(request_id, CacheCounters())
        self.members = [request_id]

    def join(self, request_id: RequestId) -> None:
        """Another request runs in the batch."""
        self.shares.setdefault(request_id, CacheCounters())
        if request_id not in self.members:
            self.members.append(request_id)

    def step_serves(self, request_ids: list[RequestId]) -> None:
        """The current step serves these requests: what it costs is theirs."""
        members = [r for r in request_ids if r in self.shares]
        if members:
            self.members = members

    def take(self, request_id: RequestId) -> CacheCounters:
        """The share of a request that ended (no longer charged)."""
        if request_id in self.members:
            self.members.remove(request_id)
        return self.shares.pop(request_id, None) or CacheCounters()

    def charge(self, request_id: RequestId | None, **amounts: int) -> None:
        """Add ``amounts`` (counter name -> amount) to the totals and, if ``request_id`` keys the running batch,
        to its members' shares, divided equally (whole amounts when one request runs)."""
        for name, amount in amounts.items():
            setattr(self.totals, name, getattr(self.totals, name) + amount)
        members = [self.shares[r] for r in self.members if r in self.shares] if request_id == self.request_id else []
        for counters in members:
            for name, amount in amounts.items():
                share = amount if len(members) == 1 else amount / len(members)
                setattr(counters, name, getattr(counters, name) + share)
