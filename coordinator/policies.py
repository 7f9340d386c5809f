"""Cache replacement policies. A policy ranks eviction candidates; the cache directory decides what may be evicted.

- ``ondemand``: nothing is kept: when a layer's gate reports, every other expert that is resident and not in use
  is released, so each layer loads what it needs.
- ``lru``: one global LRU over all cache slots (not per layer): a use is a gate choosing the expert; the least
  recently used candidate is evicted.
- ``lfu``: the least frequently chosen candidate is evicted (ties: least recently used), after seeds/003.
- ``promoe``: LRU in which a prefetch counts as a use (as in the ProMoE paper), plus prediction-driven prefetching
  (the only policy that prefetches). The cache directory never evicts an expert predicted for the window. A
  prefetched expert that the gate of its layer then did not choose loses its recency: it goes first, so that wrong
  guesses do not push out experts that were really used.
"""

from __future__ import annotations

from typing import Protocol

from protocol.ids import ExpertId


class CachePolicy(Protocol):
    name: str
    keeps_experts: bool
    """False for ``ondemand``: experts not chosen by the current gate are released at once."""
    prefetches: bool
    """True if predictions turn into speculative loads."""

    def record_use(self, experts: list[ExpertId]) -> None: ...

    def record_load(self, expert: ExpertId) -> None: ...

    def record_unused_prefetch(self, expert: ExpertId) -> None:
        """The gate of the layer ``expert`` was prefetched for did not choose it."""

    def choose_victim(self, candidates: list[ExpertId]) -> ExpertId: ...


class OnDemandPolicy:
    name = "ondemand"
    keeps_experts = False
    prefetches = False

    def record_use(self, experts: list[ExpertId]) -> None:
        pass

    def record_load(self, expert: ExpertId) -> None:
        pass

    def record_unused_prefetch(self, expert: ExpertId) -> None:
        pass

    def choose_victim(self, candidates: list[ExpertId]) -> ExpertId:
        return candidates[0]


class LruPolicy:
    name = "lru"
    keeps_experts = True
    prefetches = False

    def __init__(self) -> None:
        self._clock = 0
        self._last_use: dict[ExpertId, int] = {}

    def _touch(self, expert: ExpertId) -> None:
        self._clock += 1
        self._last_use[expert] = self._clock

    def record_use(self, experts: list[ExpertId]) -> None:
        for expert in experts:
            self._touch(expert)

    def record_load(self, expert: ExpertId) -> None:
        if expert not in self._last_use:
            self._touch(expert)

    def record_unused_prefetch(self, expert: ExpertId) -> None:
        pass

    def choose_victim(self, candidates: list[ExpertId]) -> ExpertId:
        return min(candidates, key=lambda e: self._last_use.get(e, 0))


class LfuPolicy(LruPolicy):
    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._uses: dict[ExpertId, int] = {}

    def record_use(self, experts: list[ExpertId]) -> None:
        super().record_use(experts)
        for expert in experts:
            self._uses[expert] = self._uses.get(expert, 0) + 1

    def choose_victim(self, candidates: list[ExpertId]) -> ExpertId:
        return min(candidates, key=lambda e: (self._uses.get(e, 0), self._last_use.get(e, 0)))


class PromoePolicy(LruPolicy):
    name = "promoe"
    prefetches = True

    def record_load(self, expert: ExpertId) -> None:
        self._touch(expert)  # a prefetch counts as a use

    def record_unused_prefetch(self, expert: ExpertId) -> None:
        self._last_use[expert] = 0  # a wrong guess, never used: first to go


def make_policy(name: str) -> CachePolicy:
    policies: dict[str, type] = {"ondemand": OnDemandPolicy, "lru": LruPolicy, "lfu": LfuPolicy,
                                 "promoe": PromoePolicy}
    if name not in policies:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(policies)})")
    policy: CachePolicy = policies[name]()
    return policy
